//! `flowstep train` / `eval` end to end on the committed tiny artifacts.

mod common;

use common::*;
use flowstep::artifacts::Artifacts;
use flowstep::executor::{Batch, DeviceMemory, VelocityGraph, load_base_weights};
use flowstep::metrics::read_jsonl;
use flowstep::runtime::SessionOptions;
use flowstep::tensor_file::TensorFile;

fn train_args<'a>(data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    let art = tiny_artifacts_str();
    vec!["-q", "train", "--artifacts", art, "--data", data, "--out", out, "--steps", steps, "--lr", "3e-3", "--seed", "7"]
}

fn tiny_artifacts_str() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny/artifacts")
}

fn eval_loss(data: &str, lora: Option<&str>) -> f64 {
    let mut args = vec!["eval", "--artifacts", tiny_artifacts_str(), "--data", data, "--json", "--seed", "3"];
    if let Some(l) = lora {
        args.extend(["--lora", l]);
    }
    let out = flowstep(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v["samples"], 3);
    v["eval_loss"].as_f64().unwrap_or(f64::NAN)
}

#[test]
fn training_lowers_eval_loss_and_eval_is_deterministic() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 3, 1);
    let out = dir.path().join("run");
    let before = eval_loss(path_str(&data), None);
    assert_eq!(before, eval_loss(path_str(&data), None), "eval must give the same number every run");
    let r = flowstep(&train_args(path_str(&data), path_str(&out), "150"));
    assert!(r.status.success(), "{}", stderr(&r));
    let lora = out.join("lora.safetensors");
    let after = eval_loss(path_str(&data), Some(path_str(&lora)));
    assert!(after < 0.8 * before, "eval loss {before} -> {after}: training did not learn");
    let metrics = read_jsonl(&out.join("metrics.jsonl")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(metrics.len(), 150);
    assert!(metrics.iter().all(|m| m.applied && m.loss.is_finite() && m.grad_norm > 0.0 && m.lr == 3e-3));
    assert!(out.join("loss.png").is_file());
    // ComfyUI layout and bf16 by default: `diffusion_model.` keys and one alpha per module.
    let names = TensorFile::open(&lora).map(|f| f.names()).unwrap_or_else(|e| panic!("{e}"));
    assert!(names.contains(&"diffusion_model.blocks.0.self_attn.q.lora_A.weight".to_string()));
    assert!(names.contains(&"diffusion_model.blocks.1.ffn.2.alpha".to_string()));
    let info = TensorFile::open(&lora).map(|f| f.info("diffusion_model.blocks.1.ffn.2.lora_B.weight")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(info.map(|i| i.dtype), Some(safetensors::Dtype::BF16));
}

fn strip_seconds(lines: &str) -> Vec<String> {
    lines
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}"));
            v.as_object_mut().map(|o| o.remove("seconds"));
            v.to_string()
        })
        .collect()
}

/// 10 steps straight == 5 steps, stop, --resume, 5 more: same parameters bit for bit,
/// same metrics lines (but for wall time), same LoRA file.
#[test]
fn resume_is_bit_identical() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 3, 2);
    let straight = dir.path().join("straight");
    let resumed = dir.path().join("resumed");
    let extra = ["--grad-accum", "2", "--lr-schedule", "cosine:2:0.1", "--save-every", "5", "--output-name", "run"];
    let mut a = train_args(path_str(&data), path_str(&straight), "10");
    a.extend(extra);
    assert!(flowstep(&a).status.success());
    let mut b = train_args(path_str(&data), path_str(&resumed), "10");
    b.extend(extra);
    b.extend(["--stop-after", "5"]);
    let r = flowstep(&b);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(!resumed.join("lora.safetensors").exists(), "no final LoRA before the run is complete");
    let without_resume = flowstep(&b[..b.len() - 2]);
    assert!(!without_resume.status.success() && stderr(&without_resume).contains("--resume"));
    let mut c = b[..b.len() - 2].to_vec();
    c.push("--resume");
    let r = flowstep(&c);
    assert!(r.status.success(), "{}", stderr(&r));
    let read = |p: &std::path::Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let state = |root: &std::path::Path| read(&root.join("checkpoints/step-000010/state.safetensors"));
    assert!(state(&straight) == state(&resumed), "parameters and moments differ after resume");
    // The same LoRA file but for the metadata's wall-clock times.
    let lora = |root: &std::path::Path| lora_contents(&root.join("lora.safetensors"));
    assert_eq!(lora(&straight).1, lora(&resumed).1);
    assert!(lora(&straight).0 == lora(&resumed).0);
    let lines = |root: &std::path::Path| strip_seconds(&String::from_utf8_lossy(&read(&root.join("metrics.jsonl"))));
    assert_eq!(lines(&straight), lines(&resumed));
    assert_eq!(lines(&straight).len(), 10);
}

/// Fusing a written LoRA file into the base weights (W += alpha/r · B·A) reproduces
/// flowstep's inference output with that LoRA, for both file formats.
#[test]
fn fused_lora_file_reproduces_inference() {
    init_ort();
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 3);
    let out = dir.path().join("run");
    let mut args = train_args(path_str(&data), path_str(&out), "20");
    args.extend(["--lora-dtype", "f32", "--lora-format", "comfyui"]);
    let r = flowstep(&args);
    assert!(r.status.success(), "{}", stderr(&r));
    let artifacts = Artifacts::open(&tiny_artifacts()).unwrap_or_else(|e| panic!("{e}"));
    let lora_info = &artifacts.manifest.lora;
    let flat = flowstep::lora_io::load(&out.join("lora.safetensors"), lora_info).unwrap_or_else(|e| panic!("{e}"));
    assert!(flat.iter().any(|&v| v != 0.0));
    let options = SessionOptions::cpu();
    let memory = DeviceMemory::new(options.device);
    let base = load_base_weights(&artifacts, None, &memory).unwrap_or_else(|e| panic!("{e}"));

    // Fused base weights: W[out, in] += scale · B[out, r] · A[r, in].
    let scale = (lora_info.alpha / lora_info.rank as f64) as f32;
    let base_file = TensorFile::open(&artifacts.shipped_base().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
    let mut fused_dir_tensors = Vec::new();
    for spec in &artifacts.manifest.base_weights.tensors {
        let (shape, mut w) = base_file.read_f32(&spec.name).unwrap_or_else(|e| panic!("{e}"));
        let module = spec.name.trim_end_matches(".weight");
        let a = lora_info.tensors.iter().find(|t| t.key == format!("{module}.lora_A.default.weight"));
        let b = lora_info.tensors.iter().find(|t| t.key == format!("{module}.lora_B.default.weight"));
        if let (Some(a), Some(b), true) = (a, b, spec.name.ends_with(".weight")) {
            let (r, n_in, n_out) = (a.shape[0], a.shape[1], b.shape[0]);
            let av = &flat[a.offset..a.offset + a.numel()];
            let bv = &flat[b.offset..b.offset + b.numel()];
            for o in 0..n_out {
                for i in 0..n_in {
                    let delta: f32 = (0..r).map(|k| bv[o * r + k] * av[k * n_in + i]).sum();
                    w[o * n_in + i] += scale * delta;
                }
            }
        }
        fused_dir_tensors.push(tensor(&spec.name, &shape, w));
    }
    let fused_path = dir.path().join("fused.safetensors");
    write_sample(&fused_path, &fused_dir_tensors);
    let fused = load_base_weights(&artifacts, Some(&fused_path), &memory).unwrap_or_else(|e| panic!("{e}"));

    let mut batch = Batch::new(&[16, 2, 8, 8], &[16, 64]).unwrap_or_else(|e| panic!("{e}"));
    batch.x_t.extract_tensor_mut().1.copy_from_slice(&values(16 * 128, 9));
    batch.context.extract_tensor_mut().1.copy_from_slice(&values(16 * 64, 10));
    batch.set_scalars(700.0, 1.0);
    let zero_lora = flowstep::lora_io::load(&artifacts.dir.join("lora_init.safetensors"), lora_info).unwrap_or_else(|e| panic!("{e}"));
    let run = |base: &flowstep::executor::BaseWeights, lora: &[f32]| {
        let mut g = VelocityGraph::load(&artifacts, &options, base, artifacts.manifest.lora.scale()).unwrap_or_else(|e| panic!("{e}"));
        let params = memory.tensor(&[lora.len()], lora).unwrap_or_else(|e| panic!("{e}"));
        let mut v = Vec::new();
        g.velocity(&params, &batch, 16, &mut v).unwrap_or_else(|e| panic!("{e}"));
        v
    };
    let with_lora = run(&base, &flat);
    let fused_out = run(&fused, &zero_lora);
    let plain = run(&base, &zero_lora);
    let err = rel_err(&fused_out, &with_lora);
    assert!(err < 1e-5, "fused vs LoRA rel err {err:.2e}");
    assert!(rel_err(&plain, &with_lora) > 1e-3, "the LoRA must change the output for this test to mean anything");
}

/// Warm-up at its boundary: with `warmup:3` and `cosine:3:0.1` the rate rises as
/// lr·(s+1)/3 over steps 1-3, and step 4, the first after the warm-up, uses the base rate.
#[test]
fn first_step_after_warmup_uses_base_rate() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 1, 1);
    let lr = 3e-3; // train_args' --lr
    for schedule in ["warmup:3", "cosine:3:0.1"] {
        let out = dir.path().join(schedule.replace(':', "-"));
        let mut args = train_args(path_str(&data), path_str(&out), "6");
        args.extend(["--lr-schedule", schedule]);
        let r = flowstep(&args);
        assert!(r.status.success(), "{}", stderr(&r));
        let lrs: Vec<f64> = read_jsonl(&out.join("metrics.jsonl")).unwrap_or_else(|e| panic!("{e}")).iter().map(|m| m.lr).collect();
        for (s, got) in lrs[..3].iter().enumerate() {
            let want = lr * (s + 1) as f64 / 3.0;
            assert!((got - want).abs() <= 1e-15 * want, "{schedule}: step {} lr {got}, want {want}", s + 1);
        }
        assert_eq!(lrs[3], lr, "{schedule}: step 4, the first after warm-up, must use the base rate: {lrs:?}");
        match schedule {
            "warmup:3" => assert!(lrs[4..].iter().all(|&x| x == lr), "{lrs:?}"),
            _ => assert!(lrs[4] < lr && lrs[5] < lrs[4] && lrs[5] > 0.1 * lr, "{lrs:?}"),
        }
    }
}

/// summary.json reports the eval loss before training and after the last step (not a
/// periodic one), each equal to `flowstep eval` on the same data and seed, and a host share
/// of step time in (0, 1).
#[test]
fn summary_reports_final_eval_and_host_share() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let held_out = dir.path().join("held-out");
    tiny_dataset(&data, 2, 1);
    tiny_dataset(&held_out, 3, 2);
    let out = dir.path().join("run");
    let mut args = train_args(path_str(&data), path_str(&out), "6");
    args.extend(["--eval-data", path_str(&held_out), "--eval-every", "4", "--lora-dtype", "f32"]);
    let r = flowstep(&args);
    assert!(r.status.success(), "{}", stderr(&r));
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
    let lora = out.join("lora.safetensors");
    let eval = |lora: Option<&str>| {
        let mut a = vec!["eval", "--artifacts", tiny_artifacts_str(), "--data", path_str(&held_out), "--json", "--seed", "7"];
        a.extend(lora.map(|l| ["--lora", l]).into_iter().flatten());
        let o = flowstep(&a);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap_or_else(|e| panic!("{e}"))["eval_loss"].as_f64().unwrap_or(f64::NAN)
    };
    assert_eq!(summary["eval_before"].as_f64(), Some(eval(None)), "{summary}");
    let after = eval(Some(path_str(&lora)));
    assert_eq!(summary["eval_after"].as_f64(), Some(after), "{summary}");
    let metrics = read_jsonl(&out.join("metrics.jsonl")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(metrics.iter().map(|m| m.eval_loss.is_some()).collect::<Vec<_>>(), [false, false, false, true, false, true]);
    assert_eq!(metrics[5].eval_loss, Some(after));
    assert_ne!(metrics[3].eval_loss, Some(after), "the periodic eval at step 4 is not the final one");
    let host = summary["host_fraction"].as_f64().unwrap_or(f64::NAN);
    assert!(host > 0.0 && host < 1.0, "host_fraction {host}");
}

/// `--epochs E` runs ⌈E·samples·repeat / grad-accum⌉ optimizer steps: E passes over the data
/// (the last step may reach up to K-1 samples into the next pass), not ⌈samples·repeat / K⌉
/// steps per epoch, which trained 4 passes for `--epochs 3` with 3 samples and K = 2.
/// Each metrics line names the epoch of its last sample.
#[test]
fn epochs_give_the_expected_step_count() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 3, 1);
    for (epochs, accum, repeat, want_epochs) in [("2", "2", "2", vec![0, 0, 0, 1, 1, 1]), ("3", "2", "1", vec![0, 1, 1, 2, 3])] {
        let out = dir.path().join(format!("e{epochs}-k{accum}-r{repeat}"));
        let art = tiny_artifacts_str();
        let r = flowstep(&["-q", "train", "--artifacts", art, "--data", path_str(&data), "--out", path_str(&out), "--epochs", epochs, "--grad-accum", accum, "--repeat", repeat]);
        assert!(r.status.success(), "{}", stderr(&r));
        let metrics = read_jsonl(&out.join("metrics.jsonl")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(metrics.iter().map(|m| m.epoch).collect::<Vec<_>>(), want_epochs, "--epochs {epochs} --grad-accum {accum} --repeat {repeat}");
    }
}

/// Checkpoints are written every --save-every steps and at the end, and nowhere else.
#[test]
fn checkpoints_only_at_save_every_and_the_end() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 1);
    for (save_every, want) in [(Some("5"), vec![5u64, 10, 12]), (None, vec![12])] {
        let out = dir.path().join(format!("save-{save_every:?}"));
        let mut args = train_args(path_str(&data), path_str(&out), "12");
        args.extend(["--keep-checkpoints", "0"]);
        args.extend(save_every.map(|n| ["--save-every", n]).into_iter().flatten());
        let r = flowstep(&args);
        assert!(r.status.success(), "{}", stderr(&r));
        let steps: Vec<u64> = flowstep::checkpoint::list(&out).unwrap_or_else(|e| panic!("{e}")).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, want, "--save-every {save_every:?}");
    }
}
