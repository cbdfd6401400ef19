//! Both experts of a Wan2.2 A14B pair in one `flowstep train` job (`--expert-artifacts`) on
//! the committed tiny-a14b exports: the expert of each micro-step, equality with the
//! single-expert run over the same draws, exact resume, the LoRA files, samples with the pair,
//! and the refusal of a mismatched pair.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use flowstep::metrics::read_jsonl;

fn expert(role: &str) -> PathBuf {
    repo().join("models/tiny-a14b").join(role).join("artifacts")
}

/// `flowstep train` on the pair (high noise given as --artifacts, low noise as the expert).
fn train_pair(data: &Path, out: &Path, steps: u64, extra: &[&str]) -> std::process::Output {
    train_cmd(&expert("high_noise"), data, out, steps, &[&["--expert-artifacts", path_str(&expert("low_noise"))], extra].concat())
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn metrics(out: &Path) -> Vec<flowstep::metrics::StepRecord> {
    read_jsonl(&out.join("metrics.jsonl")).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn each_micro_step_trains_the_expert_its_timestep_falls_in() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 3, 2);
    let out = dir.path().join("pair");
    let r = train_pair(&data, &out, 12, &[]);
    assert!(r.status.success(), "{}", stderr(&r));
    let lines = metrics(&out);
    assert_eq!(lines.len(), 12);
    // T2V A14B: the high-noise expert trains t ≥ 875 (table indices below 417).
    for m in &lines {
        let want = if m.timestep >= 875.0 { "high_noise" } else { "low_noise" };
        assert_eq!(m.expert.as_deref(), Some(want), "step {} at t = {}", m.step, m.timestep);
        assert_eq!(m.experts.keys().collect::<Vec<_>>(), [want], "step {}", m.step);
        assert!(m.applied && m.experts[want].applied && m.experts[want].micro_steps == 1);
    }
    let roles: std::collections::BTreeSet<_> = lines.iter().filter_map(|m| m.expert.clone()).collect();
    assert_eq!(roles.len(), 2, "12 uniform draws over the table reach both experts: {roles:?}");
    // Two LoRAs named as ComfyUI users name the pair, each with its expert and range, loaded
    // by the existing loader for its own export and refused by the other's.
    for (role, range) in [("high_noise", "[0, 0.417)"), ("low_noise", "[0.417, 1)")] {
        let lora = out.join(format!("lora_{role}.safetensors"));
        let (_, meta) = lora_contents(&lora);
        assert_eq!(meta.get("flowstep.expert").map(String::as_str), Some(role));
        assert_eq!(meta.get("flowstep.timestep_boundaries").map(String::as_str), Some(range));
        let per_save = out.join(format!("loras/pair-{role}-step-000012.safetensors"));
        assert!(per_save.is_file(), "{} missing", per_save.display());
        let manifest = flowstep::artifacts::Artifacts::open(&expert(role)).unwrap_or_else(|e| panic!("{e}")).manifest;
        flowstep::lora_io::load_for(&lora, &manifest, None).unwrap_or_else(|e| panic!("{role}: {e}"));
        let other = if role == "high_noise" { "low_noise" } else { "high_noise" };
        let other_manifest = flowstep::artifacts::Artifacts::open(&expert(other)).unwrap_or_else(|e| panic!("{e}")).manifest;
        assert!(flowstep::lora_io::load_for(&lora, &other_manifest, None).is_err(), "the {role} LoRA is refused by the {other} export");
    }
    assert!(!out.join("lora.safetensors").exists());
    let summary: serde_json::Value = serde_json::from_slice(&read(&out.join("summary.json"))).unwrap_or_else(|e| panic!("{e}"));
    let experts = summary["experts"].as_array().cloned().unwrap_or_default();
    assert_eq!(experts.iter().map(|e| e["role"].as_str().unwrap_or("")).collect::<Vec<_>>(), ["high_noise", "low_noise"]);
    let steps: u64 = experts.iter().filter_map(|e| e["steps"].as_u64()).sum();
    assert_eq!(steps, 12, "every step trained one expert: {experts:?}");
    // export-lora writes one expert's LoRA from the pair's checkpoint.
    let ckpt = out.join("checkpoints/step-000012");
    let exported = dir.path().join("low.safetensors");
    let r = flowstep(&["-q", "export-lora", path_str(&ckpt), "--out", path_str(&exported), "--expert", "low_noise"]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(lora_contents(&exported).0 == lora_contents(&out.join("lora_low_noise.safetensors")).0);
    let r = flowstep(&["-q", "export-lora", path_str(&ckpt), "--out", path_str(&dir.path().join("x.safetensors"))]);
    assert!(error_line(&r).contains("holds a Wan2.2 expert pair (high_noise, low_noise); pass --expert ROLE"), "{}", stderr(&r));
}

#[test]
fn switch_every_n_trains_one_expert_at_a_time_as_alone() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 3, 2);
    // 4 micro-steps per expert, 2 per optimizer step: steps 1-2 high noise, 3-4 low, 5-6 high.
    let out = dir.path().join("pair");
    let r = train_pair(&data, &out, 6, &["--switch-expert-every", "4", "--grad-accum", "2"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let lines = metrics(&out);
    let experts: Vec<&str> = lines.iter().map(|m| m.expert.as_deref().unwrap_or("")).collect();
    assert_eq!(experts, ["high_noise", "high_noise", "low_noise", "low_noise", "high_noise", "high_noise"]);
    // Each expert draws only in its own range.
    for m in &lines {
        assert_eq!(m.timestep >= 875.0, m.expert.as_deref() == Some("high_noise"), "step {} at t = {}", m.step, m.timestep);
    }
    // Its first window is micro-steps 0-3, as a run of the high-noise expert alone: the same
    // draws, data order and updates, so the same LoRA, bit for bit.
    let short = dir.path().join("short");
    let r = train_pair(&data, &short, 2, &["--switch-expert-every", "4", "--grad-accum", "2"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let alone = dir.path().join("alone");
    let r = train_cmd(&expert("high_noise"), &data, &alone, 2, &["--grad-accum", "2"]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(lora_contents(&short.join("lora_high_noise.safetensors")).0 == lora_contents(&alone.join("lora_high_noise.safetensors")).0, "the pair's high-noise steps differ from the expert alone");
    let (pair_lines, alone_lines) = (metrics(&short), metrics(&alone));
    let strip = |v: &[flowstep::metrics::StepRecord]| v.iter().map(|m| (m.loss, m.timestep, m.grad_norm)).collect::<Vec<_>>();
    assert_eq!(strip(&pair_lines), strip(&alone_lines));
    // The low-noise expert took no step: its parameters are its export's initial LoRA.
    let manifest = flowstep::artifacts::Artifacts::open(&expert("low_noise")).unwrap_or_else(|e| panic!("{e}")).manifest;
    let init = flowstep::lora_io::load_for(&expert("low_noise").join("lora_init.safetensors"), &manifest, None).unwrap_or_else(|e| panic!("{e}")).0;
    let state = flowstep::tensor_file::TensorFile::open(&short.join("checkpoints/step-000002/state.safetensors")).unwrap_or_else(|e| panic!("{e}"));
    let (_, low) = state.read_f32("low_noise.params").unwrap_or_else(|e| panic!("{e}"));
    let (_, moments) = state.read_f32("low_noise.exp_avg").unwrap_or_else(|e| panic!("{e}"));
    let same = low == init && moments.iter().all(|&m| m == 0.0);
    assert!(same, "the untrained low-noise LoRA is not its initial one");
}

#[test]
fn a_pair_resumes_bit_identically() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 3, 3);
    for (name, extra) in [("by-timestep", vec!["--grad-accum", "3"]), ("switch", vec!["--switch-expert-every", "3", "--grad-accum", "2"])] {
        let (straight, resumed) = (dir.path().join(name).join("straight"), dir.path().join(name).join("resumed"));
        let extra = [&extra[..], &["--save-every", "2"]].concat();
        let r = train_pair(&data, &straight, 6, &extra);
        assert!(r.status.success(), "{}", stderr(&r));
        let r = train_pair(&data, &resumed, 6, &[&extra[..], &["--stop-after", "3"]].concat());
        assert!(r.status.success(), "{}", stderr(&r));
        let r = train_pair(&data, &resumed, 6, &[&extra[..], &["--resume"]].concat());
        assert!(r.status.success(), "{}", stderr(&r));
        let state = |root: &Path| read(&root.join("checkpoints/step-000006/state.safetensors"));
        assert!(state(&straight) == state(&resumed), "{name}: both experts' parameters and moments differ after resume");
        for role in ["high_noise", "low_noise"] {
            let lora = format!("lora_{role}.safetensors");
            assert!(lora_contents(&straight.join(&lora)).0 == lora_contents(&resumed.join(&lora)).0, "{name}: {lora} differs after resume");
        }
        let strip = |v: Vec<flowstep::metrics::StepRecord>| v.into_iter().map(|m| (m.step, m.loss, m.timestep, m.grad_norm, m.expert, m.experts)).collect::<Vec<_>>();
        assert_eq!(strip(metrics(&straight)), strip(metrics(&resumed)), "{name}");
        // OUT/config.toml records the pair, so that `--resume --out OUT` alone continues it.
        let config = String::from_utf8_lossy(&read(&resumed.join("config.toml"))).into_owned();
        assert!(config.contains(&format!("expert-artifacts = \"{}\"", path_str(&expert("low_noise")))), "{config}");
    }
    // A pair's checkpoint does not resume as one expert alone (an empty --config instead of
    // OUT/config.toml, which names the other expert).
    let resumed = dir.path().join("switch/resumed");
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap_or_else(|e| panic!("{e}"));
    let r = train_cmd(&expert("high_noise"), &data, &resumed, 8, &["--resume", "--config", path_str(&empty)]);
    let line = error_line(&r);
    assert!(line.contains("is a checkpoint of a Wan2.2 expert pair (high_noise, low_noise), but this run trains one model"), "{line}");
}

#[test]
fn samples_during_training_use_the_pair() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 4);
    write_sample(&dir.path().join("prompt.safetensors"), &[tensor("context", &[16, 64], values(16 * 64, 9))]);
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "prompt.safetensors seed=1 steps=4\n").unwrap_or_default();
    let out = dir.path().join("pair");
    let r = train_pair(&data, &out, 2, &["--sample-every", "2", "--sample-prompts", path_str(&prompts)]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(!stderr(&r).contains("expert alone"), "a pair job samples with both experts: {}", stderr(&r));
    let latents = |p: &Path| flowstep::tensor_file::TensorFile::open(p).and_then(|f| f.read_f32("latents")).unwrap_or_else(|e| panic!("{e}")).1;
    let trained = latents(&out.join("samples/step-000002/00-prompt/samples.safetensors"));
    // flowstep sample with the pair's two LoRAs, switching at t = 875, gives the same latents
    // (f32 LoRAs, so that the files hold the trained parameters exactly).
    let f32_out = dir.path().join("f32");
    let r = train_pair(&data, &f32_out, 2, &["--lora-dtype", "f32", "--eval-data", path_str(&data), "--eval-timesteps", "4"]);
    assert!(r.status.success(), "{}", stderr(&r));
    // The pair's eval loss is each expert's over its own range (as flowstep eval of the
    // expert), weighted by the range's share of the table: 417 and 583 of 1000 entries.
    let eval = |role: &str| {
        let lora = f32_out.join(format!("lora_{role}.safetensors"));
        let r = flowstep(&["eval", "--artifacts", path_str(&expert(role)), "--lora", path_str(&lora), "--data", path_str(&data), "--seed", "5", "--timesteps", "4", "--json"]);
        assert!(r.status.success(), "{}", stderr(&r));
        serde_json::from_slice::<serde_json::Value>(&r.stdout).ok().and_then(|v| v["eval_loss"].as_f64()).unwrap_or(f64::NAN)
    };
    let want = 0.417 * eval("high_noise") + 0.583 * eval("low_noise");
    let got = metrics(&f32_out).last().and_then(|m| m.eval_loss).unwrap_or(f64::NAN);
    assert!((got - want).abs() <= 1e-12 * want.abs(), "pair eval loss {got}, experts' weighted {want}");
    let sampled = dir.path().join("sampled");
    let r = flowstep(&["-q", "sample", "--artifacts", path_str(&expert("high_noise")), "--lora", path_str(&f32_out.join("lora_high_noise.safetensors")),
        "--expert-artifacts", path_str(&expert("low_noise")), "--expert-lora", path_str(&f32_out.join("lora_low_noise.safetensors")),
        "--context", path_str(&dir.path().join("prompt.safetensors")), "--shape", "2,8,8", "--steps", "4", "--cfg-scale", "1", "--seed", "1", "--num-samples", "1",
        "--out", path_str(&sampled)]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(trained == latents(&sampled.join("samples.safetensors")), "training-time samples are not the pair's");
}

#[test]
fn a_mismatched_pair_is_refused_in_one_line() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 1, 1);
    let copy = |role: &str, name: &str| {
        let dest = dir.path().join(name);
        std::fs::create_dir_all(&dest).unwrap_or_else(|e| panic!("{e}"));
        for entry in std::fs::read_dir(expert(role)).unwrap_or_else(|e| panic!("{e}")).flatten() {
            std::fs::copy(entry.path(), dest.join(entry.file_name())).unwrap_or_else(|e| panic!("{e}"));
        }
        dest
    };
    let try_pair = |low: &Path, extra: &[&str]| {
        let out = dir.path().join("out");
        train_cmd(&expert("high_noise"), &data, &out, 1, &[&["--expert-artifacts", path_str(low)], extra].concat())
    };
    let same = try_pair(&expert("high_noise"), &[]);
    assert_error(&same, &["--expert-artifacts", "both exports are the high_noise expert"]);
    let renamed = copy("low_noise", "renamed");
    patch_manifest(&renamed, |m| m["model"]["name"] = serde_json::json!("other-a14b"));
    assert_error(&try_pair(&renamed, &[]), &["--expert-artifacts", "base model other-a14b differs from tiny-a14b"]);
    let moved = copy("low_noise", "moved");
    patch_manifest(&moved, |m| m["expert"]["min_timestep_boundary"] = serde_json::json!(0.358));
    assert_error(&try_pair(&moved, &[]), &["--expert-artifacts", "different boundaries"]);
    let ranked = copy("low_noise", "ranked");
    patch_manifest(&ranked, |m| m["lora"]["alpha"] = serde_json::json!(4.0));
    assert_error(&try_pair(&ranked, &[]), &["--expert-artifacts", "LoRA rank 8, alpha 4"]);
    assert_error(&try_pair(&expert("low_noise"), &["--max-timestep-boundary", "0.5"]), &["--max-timestep-boundary", "each expert over its own manifest's range"]);
    assert_error(&try_pair(&expert("low_noise"), &["--switch-expert-every", "0"]), &["--switch-expert-every", "at least 1"]);
    assert!(!dir.path().join("out").exists(), "a refused pair writes nothing");
}

/// The low-noise expert's window of a `--switch-expert-every` job, replayed alone through the
/// library: its own graphs from its initial LoRA, the job's micro-step counters (data order,
/// draws in its range, noise) and its own AdamW step count (1, 2, not the job's 3, 4).
#[test]
fn the_low_noise_window_equals_its_micro_steps_alone() {
    use flowstep::data::{DataOrder, Dataset, SampleSpec};
    use flowstep::executor::{AdamW, Batch, TrainingGraphs, load_base_weights};
    use flowstep::sft::{SftConfig, SftSampler};
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 3, 2);
    let out = dir.path().join("pair");
    // Micro-steps 0-3 (steps 1-2) train the high-noise expert, 4-7 (steps 3-4) the low-noise one.
    let r = train_pair(&data, &out, 4, &["--switch-expert-every", "4", "--grad-accum", "2"]);
    assert!(r.status.success(), "{}", stderr(&r));
    init_ort();
    let artifacts = flowstep::artifacts::Artifacts::open(&expert("low_noise")).unwrap_or_else(|e| panic!("{e}"));
    let a = artifacts.clone();
    let options = flowstep::runtime::SessionOptions::cpu();
    let (mut graphs, _base) = TrainingGraphs::load(&artifacts, &options, artifacts.manifest.lora.scale(), |m| load_base_weights(&a, None, m)).unwrap_or_else(|e| panic!("{e}"));
    let init = flowstep::lora_io::load_for(&expert("low_noise").join("lora_init.safetensors"), &artifacts.manifest, None).unwrap_or_else(|e| panic!("{e}")).0;
    let zeros = vec![0.0; init.len()];
    graphs.set_state(&init, &zeros, &zeros).unwrap_or_else(|e| panic!("{e}"));
    let dataset = Dataset::open(&data, SampleSpec::for_model(&artifacts.manifest.model)).unwrap_or_else(|e| panic!("{e}"));
    let order = DataOrder { seed: 5, len: dataset.len(), repeat: 1 };
    let sampler = SftSampler::new(SftConfig { min_boundary: 0.417, max_boundary: 1.0, ..SftConfig::default() }, 5).unwrap_or_else(|e| panic!("{e}"));
    for (update, window) in [(1, 4..6), (2, 6..8)] {
        for counter in window {
            let sample = dataset.load(order.sample(counter)).unwrap_or_else(|e| panic!("{e}"));
            let mut batch = Batch::new(&sample.latent_shape, &sample.context_shape).unwrap_or_else(|e| panic!("{e}"));
            batch.context.extract_tensor_mut().1.copy_from_slice(&sample.context);
            let draw = batch.prepare(|x_t, target| sampler.prepare_into(counter, &sample.latents, x_t, target)).unwrap_or_else(|e| panic!("{e}"));
            batch.set_scalars(draw.timestep, draw.weight);
            graphs.accumulate(&batch).unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(graphs.apply(update, 2e-3, &AdamW::default(), 2).unwrap_or_else(|e| panic!("{e}")).applied);
    }
    let (params, m, v) = graphs.state().unwrap_or_else(|e| panic!("{e}"));
    let state = flowstep::tensor_file::TensorFile::open(&out.join("checkpoints/step-000004/state.safetensors")).unwrap_or_else(|e| panic!("{e}"));
    let saved = |name: &str| state.read_f32(&format!("low_noise.{name}")).unwrap_or_else(|e| panic!("{e}")).1;
    assert!(saved("params") == params, "the pair's low-noise parameters differ from its micro-steps alone");
    assert!(saved("exp_avg") == m && saved("exp_avg_sq") == v, "the pair's low-noise AdamW moments differ");
}
