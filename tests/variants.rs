//! Wan2.2 TI2V and the A14B expert pair end to end on the committed tiny exports: train,
//! resume bit-identically, name each expert's LoRA, sample with image conditioning and with
//! the expert switch; and the errors for missing conditioning and a broken manifest.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use flowstep::metrics::read_jsonl;
use flowstep::tensor_file::TensorFile;

fn model(rel: &str) -> PathBuf {
    repo().join("models").join(rel).join("artifacts")
}

/// `n` TI2V samples: latents [48, 3, 8, 8] with a per-channel pattern, a context [16, 64],
/// and the first frame's latents as the image conditioning (what DiffSynth caches).
fn ti2v_dataset(dir: &Path, n: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
    for i in 0..n {
        let pattern = values(48, seed * 100 + i as u64);
        let latents: Vec<f32> = (0..48 * 3 * 64).map(|j| pattern[j / 192] * 1.5 + 0.1 * ((j % 64) as f32 / 64.0)).collect();
        let first: Vec<f32> = (0..48).flat_map(|c| latents[c * 192..c * 192 + 64].to_vec()).collect();
        write_sample(&dir.join(format!("sample-{i:03}.safetensors")), &[
            tensor("latents", &[48, 3, 8, 8], latents),
            tensor("context", &[16, 64], values(16 * 64, seed * 100 + 50 + i as u64)),
            tensor("first_frame_latents", &[48, 1, 8, 8], first),
        ]);
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `steps` straight and `steps/2` + stop + --resume give the same state, LoRA and metrics.
fn assert_resume_bit_identical(artifacts: &Path, data: &Path, dir: &Path, lora_name: &str) {
    let (straight, resumed) = (dir.join("straight"), dir.join("resumed"));
    let extra = ["--save-every", "3", "--grad-accum", "2"];
    let r = train_cmd(artifacts, data, &straight, 6, &extra);
    assert!(r.status.success(), "{}", stderr(&r));
    let r = train_cmd(artifacts, data, &resumed, 6, &[&extra[..], &["--stop-after", "3"]].concat());
    assert!(r.status.success(), "{}", stderr(&r));
    let r = train_cmd(artifacts, data, &resumed, 6, &[&extra[..], &["--resume"]].concat());
    assert!(r.status.success(), "{}", stderr(&r));
    let state = |root: &Path| read(&root.join("checkpoints/step-000006/state.safetensors"));
    assert!(state(&straight) == state(&resumed), "parameters and moments differ after resume");
    // Tensors only: the metadata holds wall-clock times and each OUT's name.
    assert!(lora_contents(&straight.join(lora_name)).0 == lora_contents(&resumed.join(lora_name)).0, "{lora_name} differs after resume");
    let metrics = |root: &Path| read_jsonl(&root.join("metrics.jsonl")).unwrap_or_else(|e| panic!("{e}"));
    let strip = |v: Vec<flowstep::metrics::StepRecord>| v.into_iter().map(|m| (m.step, m.loss, m.timestep, m.grad_norm)).collect::<Vec<_>>();
    assert_eq!(strip(metrics(&straight)), strip(metrics(&resumed)));
}

fn sample_latents(dir: &Path, artifacts: &Path, extra: &[&str]) -> Vec<f32> {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
    let ctx = dir.join("prompt.safetensors");
    write_sample(&ctx, &[tensor("context", &[16, 64], values(16 * 64, 9))]);
    let out = dir.join("samples");
    let mut args = vec!["-q", "sample", "--artifacts", path_str(artifacts), "--context", path_str(&ctx), "--shape", "3,8,8",
        "--num-samples", "1", "--out", path_str(&out)];
    if !extra.contains(&"--steps") {
        args.extend(["--steps", "4"]);
    }
    args.extend_from_slice(extra);
    let r = flowstep(&args);
    assert!(r.status.success(), "{}", stderr(&r));
    TensorFile::open(&out.join("samples.safetensors")).and_then(|f| f.read_f32("latents")).unwrap_or_else(|e| panic!("{e}")).1
}

#[test]
fn ti2v_trains_resumes_and_samples_from_its_first_frame() {
    let dir = tempdir();
    let art = model("tiny-ti2v");
    let data = dir.path().join("data");
    ti2v_dataset(&data, 3, 1);
    assert_resume_bit_identical(&art, &data, dir.path(), "lora.safetensors");
    let metrics = read_jsonl(&dir.path().join("straight/metrics.jsonl")).unwrap_or_else(|e| panic!("{e}"));
    assert!(metrics.iter().all(|m| m.applied && m.loss.is_finite() && m.grad_norm > 0.0));

    // Sampling keeps the given first frame in frame 0, as DiffSynth's TI2V pipeline does.
    let first = values(48 * 64, 77);
    let cond = dir.path().join("image.safetensors");
    write_sample(&cond, &[tensor("first_frame_latents", &[48, 1, 8, 8], first.clone())]);
    let lora = dir.path().join("straight/lora.safetensors");
    let video = sample_latents(dir.path(), &art, &["--condition", path_str(&cond), "--lora", path_str(&lora)]);
    for c in 0..48 {
        assert_eq!(&video[c * 192..c * 192 + 64], &first[c * 64..c * 64 + 64], "frame 0 of channel {c}");
    }
    assert!(video.iter().all(|v| v.is_finite()));

    // Without the conditioning: one clear error, in train and in sample.
    let bare = dir.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap_or_else(|e| panic!("{e}"));
    write_sample(&bare.join("s.safetensors"), &[tensor("latents", &[48, 3, 8, 8], values(48 * 192, 1)), tensor("context", &[16, 64], values(1024, 2))]);
    let line = error_line(&train_cmd(&art, &bare, &dir.path().join("x"), 1, &[]));
    assert!(line.contains("s.safetensors") && line.contains("missing tensor `first_frame_latents` [48, 1, height, width]"), "{line}");
    let ctx = dir.path().join("prompt.safetensors");
    let r = flowstep(&["sample", "--artifacts", path_str(&art), "--context", path_str(&ctx), "--shape", "3,8,8", "--out", path_str(&dir.path().join("y"))]);
    assert!(error_line(&r).contains("--condition"), "{}", stderr(&r));
}

#[test]
fn a14b_experts_train_their_own_range_and_lora() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 3, 2);
    let prompts = dir.path().join("prompts.txt");
    write_sample(&dir.path().join("prompt.safetensors"), &[tensor("context", &[16, 64], values(16 * 64, 9))]);
    std::fs::write(&prompts, "prompt.safetensors seed=1\n").unwrap_or_default();
    for (role, high) in [("high_noise", true), ("low_noise", false)] {
        let out = dir.path().join(role);
        let r = train_cmd(&model(&format!("tiny-a14b/{role}")), &data, &out, 12, &["--sample-every", "12", "--sample-prompts", path_str(&prompts), "--sample-steps", "2"]);
        assert!(r.status.success(), "{}", stderr(&r));
        assert!(stderr(&r).contains(&format!("samples use the {role} expert alone")), "training-time samples of one expert say so: {}", stderr(&r));
        let lora = out.join(format!("lora_{role}.safetensors"));
        assert!(lora.is_file() && !out.join("lora.safetensors").exists(), "{role}: LoRA named for its expert");
        let f = TensorFile::open(&lora).unwrap_or_else(|e| panic!("{e}"));
        assert!(f.names().iter().any(|n| n == "diffusion_model.blocks.0.self_attn.q.lora_A.weight"), "the default ComfyUI layout");
        // The expert's default range from its manifest: high noise t ≥ 875, low noise below.
        let metrics = read_jsonl(&out.join("metrics.jsonl")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(metrics.len(), 12);
        assert!(metrics.iter().all(|m| (m.timestep >= 875.0) == high), "{role}: {:?}", metrics.iter().map(|m| m.timestep).collect::<Vec<_>>());
    }
    assert_resume_bit_identical(&model("tiny-a14b/low_noise"), &data, &dir.path().join("resume"), "lora_low_noise.safetensors");
    // eval evaluates an expert on its own range.
    let out = flowstep(&["eval", "--artifacts", path_str(&model("tiny-a14b/high_noise")), "--data", path_str(&data), "--json", "--timesteps", "4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    let ts: Vec<f64> = v["per_timestep"].as_array().map(|a| a.iter().filter_map(|p| p[0].as_f64()).collect()).unwrap_or_default();
    assert!(ts.len() == 4 && ts.iter().all(|&t| t >= 875.0), "{ts:?}");
}

#[test]
fn a14b_pair_samples_with_the_switch() {
    let dir = tempdir();
    let (high, low) = (model("tiny-a14b/high_noise"), model("tiny-a14b/low_noise"));
    let pair = |d: &str, first: &Path, second: &Path, steps: &str| {
        sample_latents(&dir.path().join(d), first, &["--expert-artifacts", path_str(second), "--steps", steps])
    };
    let alone = |d: &str, art: &Path, steps: &str| sample_latents(&dir.path().join(d), art, &["--steps", steps]);
    // 4 steps at shift 5: t = 1000, 937.5, 833.3, 625 — two each side of 875.
    let both = pair("p1", &high, &low, "4");
    assert_eq!(both, pair("p2", &low, &high, "4"), "the roles, not the order, pick the expert");
    assert!(rel_err(&both, &alone("h", &high, "4")) > 1e-3 && rel_err(&both, &alone("l", &low, "4")) > 1e-3);
    // Two steps, t = 1000 and 833.3: the high-noise expert, then the low-noise one; one step
    // (t = 1000) is the high-noise expert alone.
    assert_eq!(pair("p3", &high, &low, "1"), alone("h1", &high, "1"));
    assert!(rel_err(&pair("p4", &high, &low, "2"), &alone("h2", &high, "2")) > 1e-3);
    let ctx = dir.path().join("p1/prompt.safetensors");
    let r = flowstep(&["sample", "--artifacts", path_str(&high), "--expert-artifacts", path_str(&high), "--context", path_str(&ctx), "--shape", "3,8,8",
        "--out", path_str(&dir.path().join("z"))]);
    assert!(error_line(&r).contains("both exports are the high_noise expert"), "{}", stderr(&r));
}

#[test]
fn manifest_conditioning_and_expert_are_validated() {
    let dir = tempdir();
    let copy = |from: &Path, name: &str| {
        let dest = dir.path().join(name);
        std::fs::create_dir_all(&dest).unwrap_or_else(|e| panic!("{e}"));
        for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{e}")) {
            let p = entry.unwrap_or_else(|e| panic!("{e}")).path();
            std::fs::copy(&p, dest.join(p.file_name().unwrap_or_default())).unwrap_or_else(|e| panic!("{e}"));
        }
        dest
    };
    let inspect = |art: &Path| error_line(&flowstep(&["inspect", "--artifacts", path_str(art)]));
    let a = copy(&model("tiny-ti2v"), "a");
    patch_manifest(&a, |m| m["model"]["conditioning"][0]["shape"][1] = serde_json::json!(2));
    assert!(inspect(&a).contains("first_frame_latents"), "{}", inspect(&a));
    let b = copy(&model("tiny-ti2v"), "b");
    patch_manifest(&b, |m| m["model"]["variant"] = serde_json::json!("t2v"));
    assert!(inspect(&b).contains("model.conditioning lists [\"first_frame_latents\"]; a t2v model takes []"), "{}", inspect(&b));
    let c = copy(&model("tiny-a14b/high_noise"), "c");
    patch_manifest(&c, |m| m["expert"]["min_timestep_boundary"] = serde_json::json!(0.2));
    assert!(inspect(&c).contains("high_noise expert covers [0, b)"), "{}", inspect(&c));
}

/// A static video (every frame the same image) of a per-sample colour pattern, and its first
/// frame's latents.
fn static_video(seed: u64) -> (Vec<f32>, Vec<f32>) {
    let (pattern, spatial) = (values(48, seed), values(64, seed + 1000));
    let frame: Vec<f32> = (0..48 * 64).map(|j| 2.5 * pattern[j / 64] + 0.5 * spatial[j % 64]).collect();
    let video = (0..48).flat_map(|c| frame[c * 64..(c + 1) * 64].repeat(3)).collect();
    (video, frame)
}

fn eval_loss(artifacts: &Path, data: &Path, lora: Option<&Path>) -> f64 {
    let mut args = vec!["eval", "--artifacts", path_str(artifacts), "--data", path_str(data), "--json", "--seed", "3"];
    if let Some(l) = lora {
        args.extend(["--lora", path_str(l)]);
    }
    let out = flowstep(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    v["eval_loss"].as_f64().unwrap_or(f64::NAN)
}

/// A TI2V LoRA does something measurable with its image: trained on static videos, it
/// predicts held-out videos better from their own first frame than from another video's
/// (same latents, same noise, only `first_frame_latents` differs). Measured: 0.06% apart
/// before training (3.3435 vs 3.3455), 4.7% after 600 steps (3.047 vs 3.197).
#[test]
fn ti2v_lora_learns_to_use_its_first_frame() {
    let dir = tempdir();
    let art = model("tiny-ti2v");
    let context = values(16 * 64, 4242);
    let write = |dir: &Path, i: usize, video: Vec<f32>, first: Vec<f32>| {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
        write_sample(&dir.join(format!("{i:03}.safetensors")), &[
            tensor("latents", &[48, 3, 8, 8], video),
            tensor("context", &[16, 64], context.clone()),
            tensor("first_frame_latents", &[48, 1, 8, 8], first),
        ]);
    };
    let (train, own, other) = (dir.path().join("train"), dir.path().join("own"), dir.path().join("other"));
    for i in 0..16 {
        let (video, first) = static_video(i);
        write(&train, i as usize, video, first);
    }
    for i in 0..6u64 {
        let (video, first) = static_video(100 + i);
        write(&own, i as usize, video.clone(), first);
        write(&other, i as usize, video, static_video(100 + (i + 1) % 6).1);
    }
    let (before_own, before_other) = (eval_loss(&art, &own, None), eval_loss(&art, &other, None));
    assert!((before_own / before_other - 1.0).abs() < 0.005, "before: {before_own} vs {before_other}");
    let out = dir.path().join("run");
    let r = flowstep(&["-q", "train", "--artifacts", path_str(&art), "--data", path_str(&train), "--out", path_str(&out),
        "--steps", "600", "--lr", "5e-3", "--seed", "1"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let lora = out.join("lora.safetensors");
    let (after_own, after_other) = (eval_loss(&art, &own, Some(&lora)), eval_loss(&art, &other, Some(&lora)));
    assert!(after_own < 0.98 * after_other, "after: own first frame {after_own}, another's {after_other}");
}
