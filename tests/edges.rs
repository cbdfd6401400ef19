//! Tests at the edges (issue 26): every threshold at its value and one step either side,
//! checked against the rule of the reference it follows; the nearest invalid value of each
//! validated option next to the nearest valid one; the trainer's data order itself; and
//! the other tools' LoRA layouts through `flowstep eval`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use flowstep::data::DataOrder;
use flowstep::optim::LrSchedule;
use flowstep::scheduler::FlowMatchScheduler;
use flowstep::tensor_file::TensorFile;

fn a14b(role: &str) -> PathBuf {
    repo().join("models/tiny-a14b").join(role).join("artifacts")
}

fn copy_dir(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{e}"));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{e}")) {
        let p = entry.unwrap_or_else(|e| panic!("{e}")).path();
        std::fs::copy(&p, to.join(p.file_name().unwrap_or_default())).unwrap_or_else(|e| panic!("{e}"));
    }
    to.to_path_buf()
}

/// Latents of `flowstep sample` with the tiny A14B pair whose manifests say `switch`.
fn pair_sample(dir: &Path, switch: f32, steps: usize) -> Vec<f32> {
    let (high, low) = (copy_dir(&a14b("high_noise"), &dir.join("high")), copy_dir(&a14b("low_noise"), &dir.join("low")));
    for art in [&high, &low] {
        patch_manifest(art, |m| m["expert"]["switch_timestep"] = serde_json::json!(switch));
    }
    let ctx = dir.join("prompt.safetensors");
    write_sample(&ctx, &[tensor("context", &[16, 64], values(16 * 64, 9))]);
    let out = dir.join("samples");
    let steps = steps.to_string();
    let r = flowstep(&["-q", "sample", "--artifacts", path_str(&high), "--expert-artifacts", path_str(&low), "--context", path_str(&ctx),
        "--shape", "2,8,8", "--num-samples", "1", "--steps", &steps, "--out", path_str(&out)]);
    assert!(r.status.success(), "{}", stderr(&r));
    TensorFile::open(&out.join("samples.safetensors")).and_then(|f| f.read_f32("latents")).unwrap_or_else(|e| panic!("{e}")).1
}

fn next_up(x: f32) -> f32 {
    f32::from_bits(x.to_bits() + 1)
}

fn next_down(x: f32) -> f32 {
    f32::from_bits(x.to_bits() - 1)
}

/// Reference: DiffSynth's WanVideoPipeline (diffsynth/pipelines/wan_video.py) switches to
/// dit2 when `timestep.item() < switch_DiT_boundary * 1000`: the high-noise expert keeps
/// every step with t ≥ the switch, t = switch included. At shift 5, 12 steps have a timestep
/// of exactly 875.0 (T2V's 0.875) and 14 steps one of exactly 900.0 (I2V's 0.9), in torch's
/// float32 as here. With the switch one float32 step below, the high-noise expert takes the
/// same steps (same latents); one step above, the step at t = switch goes to the low-noise
/// expert (other latents).
#[test]
fn expert_switch_at_its_timestep_follows_diffsynth() {
    assert_eq!(FlowMatchScheduler::new(12, 1.0, 5.0).timesteps[5], 875.0);
    assert_eq!(FlowMatchScheduler::new(14, 1.0, 5.0).timesteps[5], 900.0);
    let dir = tempdir();
    for (steps, switch) in [(12, 875.0f32), (14, 900.0)] {
        let run = |name: &str, s: f32| pair_sample(&dir.path().join(format!("{steps}-{name}")), s, steps);
        let (at, below, above) = (run("at", switch), run("below", next_down(switch)), run("above", next_up(switch)));
        assert_eq!(at, below, "{steps} steps: t = {switch} must use the high-noise expert");
        let moved = rel_err(&above, &at);
        assert!(moved > 1e-3, "{steps} steps: the expert at t = {switch} must matter for this test to mean anything ({moved:.1e})");
    }
}

/// Reference: DiffSynth's FlowMatchSFTLoss draws `torch.randint(int(min·1000), int(max·1000))`:
/// indices from ⌊min·1000⌋ (included) to ⌊max·1000⌋ (excluded). The A14B experts' defaults
/// (0.417 for T2V, 0.358 for I2V) split the training table exactly where sampling switches:
/// the high-noise expert trains t ≥ 875 (900), the low-noise one below.
#[test]
fn timestep_boundaries_floor_like_diffsynth() {
    let table = FlowMatchScheduler::training(1000, 1.0, 5.0).timesteps;
    for (boundary, switch) in [(417, 875.0), (358, 900.0)] {
        assert!(table[boundary - 1] >= switch && table[boundary] < switch, "index {boundary}: {} | {}", table[boundary - 1], table[boundary]);
    }
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 1);
    let draws = |name: &str, min: &str, max: &str| -> ((f32, f32), Vec<f32>) {
        let out = dir.path().join(format!("{name}.safetensors"));
        let r = flowstep(&["draws", "--artifacts", path_str(&tiny_artifacts()), "--data", path_str(&data), "--out", path_str(&out),
            "--micro-steps", "64", "--seed", "1", "--min-timestep-boundary", min, "--max-timestep-boundary", max]);
        assert!(r.status.success(), "{}", stderr(&r));
        let f = TensorFile::open(&out).unwrap_or_else(|e| panic!("{e}"));
        let range = f.read_f32("timestep_range").unwrap_or_else(|e| panic!("{e}")).1;
        ((range[0], range[1]), f.read_f32("timestep_index").unwrap_or_else(|e| panic!("{e}")).1)
    };
    // 0.4169999999999999 is one f64 step below 0.417: ⌊416.99999999999994⌋ = 416 (Python's
    // int() gives the same); 0.417·1000 rounds to exactly 417.0.
    let (range, indices) = draws("at", "0.417", "0.418");
    assert_eq!(range, (417.0, 418.0));
    assert!(indices.iter().all(|&i| i == 417.0), "the upper boundary is excluded: {indices:?}");
    let (range, indices) = draws("below", "0.4169999999999999", "0.418");
    assert_eq!(range, (416.0, 418.0));
    assert!(indices.contains(&416.0) && indices.contains(&417.0) && !indices.contains(&418.0), "{indices:?}");
    let (range, indices) = draws("ends", "0", "1");
    assert_eq!(range, (0.0, 1000.0));
    assert!(indices.iter().all(|&i| (0.0..1000.0).contains(&i)));
    // One index wide at the top of the table: max = 1 is allowed and 999 is drawn.
    let (range, indices) = draws("top", "0.999", "1");
    assert_eq!(range, (999.0, 1000.0));
    assert!(indices.iter().all(|&i| i == 999.0), "{indices:?}");
    // Boundaries that floor to the same index select nothing: an error, not an empty draw.
    let r = flowstep(&["draws", "--artifacts", path_str(&tiny_artifacts()), "--data", path_str(&data), "--out", path_str(&dir.path().join("x")),
        "--micro-steps", "1", "--min-timestep-boundary", "0.417", "--max-timestep-boundary", "0.4179999999999999"]);
    assert!(error_line(&r).contains("select no timestep"), "{}", stderr(&r));
}

/// Reference: torch's LinearLR warm-up (the independent loop's) reaches the base rate at
/// its last warm-up step and keeps it; DiffSynth's ConstantLR (factor 1/3, total_iters 5)
/// applies the factor while the step count is below 5, so step index 5 is the first at lr.
#[test]
fn warmup_ends_exactly_at_its_step() {
    let base = 3e-3;
    for n in [1u64, 2, 5] {
        for s in [LrSchedule::Warmup { warmup: n }, LrSchedule::Cosine { warmup: n, min_ratio: 0.1 }] {
            let lr = |step| s.lr(base, step, 20);
            for step in 0..n {
                let want = base * (step + 1) as f64 / n as f64;
                assert!((lr(step) - want).abs() <= 1e-15 * want, "{s}: step {step}: {} vs {want}", lr(step));
            }
            assert_eq!(lr(n), base, "{s}: the first step after the warm-up uses the base rate");
            match s {
                LrSchedule::Warmup { .. } => assert_eq!(lr(n + 1), base, "{s}"),
                _ => assert!(lr(n + 1) < base && lr(n + 1) > 0.1 * base, "{s}: the decay starts after the warm-up: {}", lr(n + 1)),
            }
        }
    }
    let d = LrSchedule::Diffsynth;
    assert_eq!([d.lr(base, 4, 20), d.lr(base, 5, 20), d.lr(base, 6, 20)], [base * (1.0 / 3.0), base, base]);
    assert_eq!(LrSchedule::Cosine { warmup: 2, min_ratio: 0.1 }.lr(base, 20, 20), base * 0.1, "the cosine ends at MIN_RATIO·lr");
}

/// The one error line of a refused value, which must name the flag.
fn refused(r: &Output, flag: &str, value: &str) {
    let line = error_line(r);
    assert!(line.contains(flag), "{flag} {value}: the error must name the flag: {line}");
}

/// An accepted value gets past the option checks: the run fails later, on `later` (a missing
/// input the test leaves out on purpose), not on the flag.
fn accepted(r: &Output, flag: &str, value: &str, later: &str) {
    let line = error_line(r);
    assert!(line.contains(later) && !line.contains(flag), "{flag} {value} must be accepted: {line}");
}

/// The nearest invalid value of each `flowstep train` option beside its nearest valid one.
#[test]
fn train_options_refuse_the_nearest_invalid_values() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let (missing, out) = (dir.path().join("missing-data"), dir.path().join("out"));
    let train = |extra: &[&str]| flowstep(&[&["-q", "train", "--artifacts", path_str(&art), "--data", path_str(&missing), "--out", path_str(&out)][..], extra].concat());
    let later = "dataset directory does not exist";
    let steps = ["--steps", "1"];
    let cases: &[(&str, &[&str], &[&str])] = &[
        // (flag, accepted, refused)
        ("--steps", &["1"], &["0"]),
        ("--epochs", &["1"], &["0"]),
        ("--lr", &["5e-324", "1e300"], &["0", "-5e-324", "inf"]),
        ("--beta1", &["0", "0.9999999999999999"], &["1", "-5e-324"]),
        ("--beta2", &["0", "0.9999999999999999"], &["1", "-5e-324"]),
        ("--eps", &["5e-324"], &["0", "-5e-324"]),
        ("--weight-decay", &["0"], &["-5e-324", "inf"]),
        ("--grad-accum", &["1"], &["0"]),
        ("--repeat", &["1"], &["0"]),
        ("--shift", &["1e-45"], &["0", "-1e-45"]),
        ("--noise-scale", &["0"], &["-1e-45", "inf"]),
        ("--min-timestep-boundary", &["0", "0.999"], &["-5e-324", "1.0000000000000002"]),
        ("--max-timestep-boundary", &["1", "0.001"], &["1.0000000000000002", "0"]),
        ("--save-every", &["1"], &["0"]),
        ("--eval-timesteps", &["1", "1000"], &["0", "1001"]),
        ("--threads", &["1", "1024"], &["0", "1025"]),
        ("--gpu-mem-limit", &["1e-9", "999999"], &["0", "1000000"]),
        ("--lr-schedule", &["cosine:3:1", "cosine:3:0", "warmup:0"], &["cosine:3:1.0000000000000002", "cosine:3:-5e-324"]),
    ];
    for (flag, ok, bad) in cases {
        // `--flag=value`, so that a negative value is a value.
        let with = |v: &str| -> Output {
            let arg = format!("{flag}={v}");
            let length: &[&str] = if *flag == "--steps" || *flag == "--epochs" { &[] } else { &steps };
            train(&[&[arg.as_str()][..], length].concat())
        };
        for v in *ok {
            accepted(&with(v), flag, v, later);
        }
        for v in *bad {
            refused(&with(v), flag, v);
        }
    }
    // The maximum boundary must lie above the minimum: equal is refused, the next f64 is not.
    refused(&train(&["--steps", "1", "--min-timestep-boundary", "0.5", "--max-timestep-boundary", "0.5"]), "--max-timestep-boundary", "0.5");
    accepted(&train(&["--steps", "1", "--min-timestep-boundary", "0.5", "--max-timestep-boundary", "0.5000000000000001"]), "--max-timestep-boundary", "0.5+", later);
    // --sample-steps (with --sample-every and prompts): 1 to 10,000, as `flowstep sample --steps`.
    let prompts = dir.path().join("prompts.txt");
    for (v, ok) in [("1", true), ("10000", true), ("0", false), ("10001", false)] {
        let steps = format!("--sample-steps={v}");
        let r = train(&["--steps", "1", "--sample-every", "1", "--sample-prompts", path_str(&prompts), &steps]);
        if ok { accepted(&r, "--sample-steps", v, later) } else { refused(&r, "--sample-steps", v) }
    }
    // --eval-every needs --eval-data; at 1 with it, the run goes on.
    let eval_data = path_str(&missing);
    accepted(&train(&["--steps", "1", "--eval-every", "1", "--eval-data", eval_data]), "--eval-every", "1", later);
    refused(&train(&["--steps", "1", "--eval-every", "0", "--eval-data", eval_data]), "--eval-every", "0");
}

/// The same for `flowstep sample`, `eval` and `schedule`.
#[test]
fn sample_eval_and_schedule_options_refuse_the_nearest_invalid_values() {
    let dir = tempdir();
    let (missing, out) = (dir.path().join("missing-artifacts"), dir.path().join("out"));
    let ctx = dir.path().join("prompt.safetensors");
    write_sample(&ctx, &[tensor("context", &[16, 64], values(16 * 64, 9))]);
    let later = "missing-artifacts";
    let sample = |extra: &[&str]| {
        let base = ["-q", "sample", "--artifacts", path_str(&missing), "--context", path_str(&ctx), "--out", path_str(&out)];
        let shape: &[&str] = if extra.contains(&"--shape") { &[] } else { &["--shape", "2,8,8"] };
        flowstep(&[&base[..], shape, extra].concat())
    };
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("--steps", &["1", "10000"], &["0", "10001"]),
        ("--num-samples", &["1"], &["0"]),
        ("--shift", &["1e-45"], &["0", "-1e-45"]),
        ("--fps", &["1", "240"], &["0", "241"]),
    ];
    for (flag, ok, bad) in cases {
        for v in *ok {
            accepted(&sample(&[&format!("{flag}={v}")]), flag, v, later);
        }
        for v in *bad {
            refused(&sample(&[&format!("{flag}={v}")]), flag, v);
        }
    }
    let max = u64::MAX.to_string();
    let last_seed = (u64::MAX - 1).to_string();
    accepted(&sample(&["--seed", &last_seed, "--num-samples", "1"]), "--seed", "2^64-2", later);
    refused(&sample(&["--seed", &max, "--num-samples", "1"]), "--seed", "2^64-1");

    // --shape is checked against the model, so these need real artifacts; the prompt is then
    // the input left out (a missing context file).
    let toy = repo().join("models/toy/artifacts");
    let no_ctx = dir.path().join("no-context.safetensors");
    let shaped = |shape: &str, n: &str| flowstep(&["-q", "sample", "--artifacts", path_str(&toy), "--context", path_str(&no_ctx), "--out", path_str(&out),
        "--shape", shape, "--num-samples", n]);
    for ok in ["1,2,2", "9,8,8"] {
        accepted(&shaped(ok, "1"), "--shape", ok, "no-context");
    }
    for bad in ["0,8,8", "1,8,7", "1,7,8", "1,8,9", "2,8", "2,8,8,8", "2,8,-8"] {
        refused(&shaped(bad, "1"), "--shape", bad);
    }
    // Limits: 2^28 values per sample, 2^30 in all (the toy model has 16 latent channels),
    // checked before anything is allocated.
    accepted(&shaped("1,2,8388608", "1"), "--shape", "2^28 values", "no-context");
    refused(&shaped("1,2,8388610", "1"), "--shape", "2^28 + 32 values");
    accepted(&shaped("1,2,2", "16777216"), "--num-samples", "2^30 values", "no-context");
    refused(&shaped("1,2,2", "16777217"), "--num-samples", "2^30 + 64 values");

    // --vae-tile: at least 2 latent pixels a side.
    for (tile, ok) in [("2,2", true), ("1,2", false), ("2,1", false)] {
        let r = sample(&["--vae-decoder", path_str(&dir.path().join("no-vae")), "--vae-tile", tile]);
        if ok { accepted(&r, "--vae-tile", tile, later) } else { refused(&r, "--vae-tile", tile) }
    }

    let eval = |extra: &[&str]| flowstep(&[&["eval", "--artifacts", path_str(&missing), "--data", path_str(&dir.path().join("d"))][..], extra].concat());
    for v in ["1", "1000"] {
        accepted(&eval(&["--timesteps", v]), "--timesteps", v, later);
    }
    for v in ["0", "1001"] {
        refused(&eval(&["--timesteps", v]), "--timesteps", v);
    }
    refused(&eval(&["--shift", "0"]), "--shift", "0");
    accepted(&eval(&["--shift", "1e-45"]), "--shift", "1e-45", later);

    // schedule has no input to leave out: an accepted value prints the table.
    let schedule = |extra: &[&str]| flowstep(&[&["schedule", "--csv"][..], extra].concat());
    // One entry, or a strength so small that every timestep is 0, leaves DiffSynth's loss weights
    // undefined (it normalises by their spread): refused, not a NaN column.
    let cases: [(&str, &[&str], &[&str]); 3] = [("--steps", &["2"], &["0", "1", "1000001"]),
        ("--denoising-strength", &["1", "1e-3"], &["0", "1.0000000000000002", "5e-324"]), ("--shift", &["1e-45", "1"], &["0", "-1e-45"])];
    for (flag, ok, bad) in cases {
        for v in ok {
            let r = schedule(&[&format!("{flag}={v}")]);
            assert!(r.status.success(), "schedule {flag} {v} must be accepted: {}", stderr(&r));
        }
        for v in bad {
            let r = schedule(&[&format!("{flag}={v}")]);
            let line = error_line(&r);
            assert!(line.contains(flag), "schedule {flag} {v}: {line}");
        }
    }
}

/// The order in which `flowstep train` visits the samples, observed from the run itself:
/// with `--skip-bad-samples`, every visit to one of three non-finite samples is a
/// `skipping` line and every visit to the one good sample a step line. Each epoch is a
/// permutation, the order is the library's `DataOrder` for the run's seed, and another seed
/// gives another order (the LoRA bytes differ anyway, from the timesteps and noise).
#[test]
fn train_visits_samples_in_the_seeded_order() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 4, 3);
    for i in 1..4 {
        write_sample(&data.join(format!("sample-{i:03}.safetensors")),
            &[tensor("latents", &[16, 2, 8, 8], vec![f32::NAN; 2048]), tensor("context", &[16, 64], values(1024, i))]);
    }
    let order_of = |seed: &str| -> Vec<usize> {
        let out = dir.path().join(format!("run-{seed}"));
        let r = flowstep(&["train", "--artifacts", path_str(&tiny_artifacts()), "--data", path_str(&data), "--out", path_str(&out),
            "--steps", "4", "--seed", seed, "--skip-bad-samples"]);
        assert!(r.status.success(), "{}", stderr(&r));
        stderr(&r).lines().filter_map(|l| {
            if l.starts_with("step ") && l.contains(" loss ") {
                Some(0)
            } else if l.starts_with("skipping ") {
                (1..4).find(|i| l.contains(&format!("sample-{i:03}.safetensors")))
            } else {
                None
            }
        }).collect()
    };
    let (a, b) = (order_of("3"), order_of("4"));
    for (seed, order) in [(3u64, &a), (4, &b)] {
        // 4 steps of the one good sample: 4 epochs, the last one up to the good sample.
        assert!(order.len() > 12 && order.len() <= 16 && order.last() == Some(&0), "seed {seed}: {order:?}");
        assert_eq!(order.iter().filter(|&&i| i == 0).count(), 4, "seed {seed}: {order:?}");
        for epoch in order[..12].chunks(4) {
            let mut sorted = epoch.to_vec();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2, 3], "seed {seed}: each epoch visits every sample once: {order:?}");
        }
        let want: Vec<usize> = (0..order.len() as u64).map(|c| DataOrder { seed, len: 4, repeat: 1 }.sample(c)).collect();
        assert_eq!(order, &want, "seed {seed}: the trainer's order is DataOrder's");
    }
    assert_ne!(a, b, "another seed must visit the samples in another order");
}

/// The same LoRA in each layout flowstep reads, written here from each tool's key names and
/// scale convention, with a file alpha other than the export's (the tiny export has rank 8,
/// alpha 8) where the layout has one: `flowstep eval` gives exactly the loss of the default
/// file flowstep writes (lora_io::save). Scales are powers of two, so every layout holds the
/// same parameters bit for bit.
#[test]
fn other_tools_layouts_evaluate_like_the_default_file() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 4);
    let lora = flowstep::artifacts::Artifacts::open(&art).unwrap_or_else(|e| panic!("{e}")).manifest.lora;
    assert_eq!((lora.rank, lora.alpha), (8, 8.0));
    // Parameters with B non-zero (so the LoRA changes the loss), and flowstep's own default
    // file (ComfyUI keys with `.alpha`) holding them.
    let mut flat = vec![0.0f32; lora.num_params];
    for (i, t) in lora.tensors.iter().enumerate() {
        let n: usize = t.shape.iter().product();
        let scale = if t.key.contains(".lora_A.") { 0.25 } else { 0.125 };
        flat[t.offset..t.offset + n].iter_mut().zip(values(n, i as u64)).for_each(|(d, v)| *d = v * scale);
    }
    let default_file = dir.path().join("flowstep-default.safetensors");
    flowstep::lora_io::save(&default_file, &lora, &flat, flowstep::lora_io::LoraFormat::Comfyui, flowstep::tensor_file::SaveDtype::F32, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let part = |key: &str| {
        let t = lora.tensors.iter().find(|t| t.key == key).unwrap_or_else(|| panic!("no {key}"));
        (t.shape.clone(), flat[t.offset..t.offset + t.shape.iter().product::<usize>()].to_vec())
    };
    let modules: Vec<&str> = lora.tensors.iter().filter_map(|t| t.key.strip_suffix(".lora_A.default.weight")).collect();
    assert!(!modules.is_empty());
    // Each layout: its A and B keys, its alpha key (diffusers and DiffSynth have none: scale 1)
    // and the alpha written, with B stored times 8/alpha so that B·alpha/8 is the same.
    let musubi = |m: &str| format!("lora_unet_{}", m.replace('.', "_"));
    let diffusers = |m: &str| {
        let (block, inner) = m.strip_prefix("blocks.").and_then(|r| r.split_once('.')).unwrap_or_else(|| panic!("{m}"));
        let name = match inner {
            "self_attn.q" => "attn1.to_q", "self_attn.k" => "attn1.to_k", "self_attn.v" => "attn1.to_v", "self_attn.o" => "attn1.to_out.0",
            "cross_attn.q" => "attn2.to_q", "cross_attn.k" => "attn2.to_k", "cross_attn.v" => "attn2.to_v", "cross_attn.o" => "attn2.to_out.0",
            "ffn.0" => "ffn.net.0.proj", "ffn.2" => "ffn.net.2", other => panic!("{other}"),
        };
        format!("transformer.blocks.{block}.{name}")
    };
    type Keys = Box<dyn Fn(&str) -> (String, String, Option<String>)>;
    let layouts: Vec<(&str, Keys, f32)> = vec![
        ("comfyui", Box::new(|m: &str| (format!("diffusion_model.{m}.lora_A.weight"), format!("diffusion_model.{m}.lora_B.weight"), Some(format!("diffusion_model.{m}.alpha")))), 2.0),
        ("comfyui-down-up", Box::new(|m: &str| (format!("diffusion_model.{m}.lora_down.weight"), format!("diffusion_model.{m}.lora_up.weight"), Some(format!("diffusion_model.{m}.alpha")))), 4.0),
        ("musubi", Box::new(move |m: &str| (format!("{}.lora_down.weight", musubi(m)), format!("{}.lora_up.weight", musubi(m)), Some(format!("{}.alpha", musubi(m))))), 16.0),
        // No alpha and no metadata: scale 1, i.e. alpha = rank.
        ("diffusers", Box::new(move |m: &str| (format!("{}.lora_A.weight", diffusers(m)), format!("{}.lora_B.weight", diffusers(m)), None)), 8.0),
        ("diffsynth", Box::new(|m: &str| (format!("{m}.lora_A.default.weight"), format!("{m}.lora_B.default.weight"), None)), 8.0),
    ];
    let eval = |lora: Option<&Path>| {
        let mut args = vec!["eval", "--artifacts", path_str(&art), "--data", path_str(&data), "--json", "--seed", "1"];
        if let Some(l) = lora {
            args.extend(["--lora", path_str(l)]);
        }
        let r = flowstep(&args);
        assert!(r.status.success(), "{args:?}: {}", stderr(&r));
        let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap_or_else(|e| panic!("{e}"));
        v["eval_loss"].as_f64().unwrap_or(f64::NAN)
    };
    let (want, base) = (eval(Some(&default_file)), eval(None));
    assert!(want.is_finite() && (want - base).abs() > 1e-4 * base, "the LoRA must change the loss: {want} vs base {base}");
    let mut losses = Vec::new();
    for (name, keys, alpha) in &layouts {
        let mut out = Vec::new();
        for module in &modules {
            let ((sa, a), (sb, b)) = (part(&format!("{module}.lora_A.default.weight")), part(&format!("{module}.lora_B.default.weight")));
            let (ka, kb, kalpha) = keys(module);
            out.push(tensor(&ka, &sa, a));
            out.push(tensor(&kb, &sb, b.iter().map(|v| v * 8.0 / alpha).collect()));
            if let Some(k) = kalpha {
                out.push(tensor(&k, &[], vec![*alpha]));
            }
        }
        let path = dir.path().join(format!("{name}.safetensors"));
        write_sample(&path, &out);
        losses.push((*name, eval(Some(&path))));
    }
    for (name, loss) in &losses {
        assert_eq!(*loss, want, "{name}: {losses:?}");
    }
}

/// Products of counts at their limits (train/validate.rs): `samples × --repeat` up to 2^24
/// slots per epoch, and `--epochs`/`--steps` × samples within the u64 sample counter. An
/// accepted value gets as far as the output directory, which the test makes a file.
#[test]
fn count_limits_hold_at_their_values() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 1, 1);
    let out = dir.path().join("out-is-a-file");
    std::fs::write(&out, b"").unwrap_or_else(|e| panic!("{e}"));
    let train = |extra: &[&str]| flowstep(&[&["-q", "train", "--artifacts", path_str(&tiny_artifacts()), "--data", path_str(&data), "--out", path_str(&out)][..], extra].concat());
    let later = "expected a directory";
    let (max, half, half_up) = (u64::MAX.to_string(), (u64::MAX / 2).to_string(), (u64::MAX / 2 + 1).to_string());
    accepted(&train(&["--steps", "1", "--repeat", "16777216"]), "--repeat", "2^24", later);
    refused(&train(&["--steps", "1", "--repeat", "16777217"]), "--repeat", "2^24 + 1");
    accepted(&train(&["--epochs", &max]), "--epochs", "2^64-1 of 1", later);
    refused(&train(&["--epochs", &max, "--repeat", "2"]), "--epochs", "2^64-1 of 2");
    accepted(&train(&["--steps", &half, "--grad-accum", "2"]), "--grad-accum", "(2^63-1)·2", later);
    refused(&train(&["--steps", &half_up, "--grad-accum", "2"]), "--grad-accum", "2^63·2");
}

/// Dataset checks at their limits: latent frames, height and width positive multiples of the
/// patch (tiny: 1, 2, 2); first-frame conditioning (TI2V) needs 2 latent frames, 1 is
/// refused; a converted DiffSynth cache's boundaries need 0 ≤ min < max ≤ 1.
#[test]
fn dataset_checks_hold_at_their_limits() {
    use flowstep::artifacts::Artifacts;
    use flowstep::data::{Dataset, SampleSpec, stored_boundaries};
    let dir = tempdir();
    let spec = |art: &Path| SampleSpec::for_model(&Artifacts::open(art).unwrap_or_else(|e| panic!("{e}")).manifest.model);
    let one = |name: &str, tensors: &[flowstep::tensor_file::OutTensor], spec: SampleSpec| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
        write_sample(&d.join("s.safetensors"), tensors);
        Dataset::open(&d, spec).map(|_| ()).map_err(|e| e.to_string())
    };
    let t2v = |f: usize, h: usize, w: usize| {
        let name = format!("t2v-{f}-{h}-{w}");
        one(&name, &[tensor("latents", &[16, f, h, w], vec![0.0; 16 * f * h * w]), tensor("context", &[16, 64], vec![0.0; 1024])], spec(&tiny_artifacts()))
    };
    for (f, h, w) in [(1, 2, 2), (1, 8, 8), (3, 2, 4)] {
        assert_eq!(t2v(f, h, w), Ok(()), "{f}x{h}x{w}");
    }
    for (f, h, w, axis) in [(0, 8, 8, "frames 0"), (1, 0, 8, "height 0"), (1, 7, 8, "height 7"), (1, 9, 8, "height 9"), (1, 8, 1, "width 1"), (1, 8, 3, "width 3")] {
        let err = t2v(f, h, w).err().unwrap_or_default();
        assert!(err.contains(axis) && err.contains("not a positive multiple of the patch size"), "{f}x{h}x{w}: {err}");
    }
    let ti2v = repo().join("models/tiny-ti2v/artifacts");
    let ti2v_sample = |f: usize| {
        one(&format!("ti2v-{f}"), &[tensor("latents", &[48, f, 8, 8], vec![0.0; 48 * f * 64]), tensor("context", &[16, 64], vec![0.0; 1024]),
            tensor("first_frame_latents", &[48, 1, 8, 8], vec![0.0; 48 * 64])], spec(&ti2v))
    };
    assert_eq!(ti2v_sample(2), Ok(()));
    let err = ti2v_sample(1).err().unwrap_or_default();
    assert!(err.contains("has 1 frame") && err.contains("at least 2"), "{err}");

    let stored = |name: &str, json: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(d.join("diffsynth_boundaries.json"), json).unwrap_or_else(|e| panic!("{e}"));
        stored_boundaries(&d).map_err(|e| e.to_string())
    };
    assert_eq!(stored("b1", r#"{"min_timestep_boundary": 0, "max_timestep_boundary": 1}"#), Ok(Some((0.0, 1.0))));
    assert_eq!(stored("b2", r#"{"min_timestep_boundary": 0.417, "max_timestep_boundary": 0.418}"#), Ok(Some((0.417, 0.418))));
    for (name, json) in [("b3", r#"{"min_timestep_boundary": 0.417, "max_timestep_boundary": 0.417}"#),
                         ("b4", r#"{"min_timestep_boundary": -5e-324, "max_timestep_boundary": 1}"#),
                         ("b5", r#"{"min_timestep_boundary": 0, "max_timestep_boundary": 1.0000000000000002}"#)] {
        let err = stored(name, json).err().unwrap_or_default();
        assert!(err.contains("0 <= a < b <= 1"), "{json}: {err}");
    }
}

/// `flowstep eval`'s timesteps, `lo + ⌊(j + ½)·(hi - lo)/K⌋`, stay inside the half-open range
/// the run trains, for K up to one per index (which visits each index exactly once).
#[test]
fn eval_timesteps_stay_inside_the_trained_range() {
    use flowstep::eval::eval_indices;
    for (lo, hi) in [(0usize, 1000usize), (0, 417), (417, 1000), (358, 1000), (999, 1000), (417, 418)] {
        for k in [1, 2, 7, hi - lo - 1, hi - lo] {
            if k == 0 || k > hi - lo {
                continue;
            }
            let idx = eval_indices((lo, hi), k);
            assert_eq!(idx.len(), k);
            assert!(idx.iter().all(|&i| (lo..hi).contains(&i)), "[{lo}, {hi}) K {k}: {:?}", (idx.first(), idx.last()));
            assert!(idx.windows(2).all(|w| w[0] < w[1]), "[{lo}, {hi}) K {k}: indices must be distinct and increasing");
        }
        assert_eq!(eval_indices((lo, hi), hi - lo), (lo..hi).collect::<Vec<_>>());
    }
}
