//! `flowstep train`'s musubi-tuner options end to end on the tiny artifacts: gradient
//! clipping, timestep sampling and the LoRA alpha through a resume, their checks, and the
//! line an export-time option gets. Their numbers against PyTorch and musubi's code:
//! export/tests/test_reference_loop.py and export/tests/test_timestep_sampling.py.

mod common;

use common::*;
use flowstep::metrics::read_jsonl;

/// Small enough that the tiny model's gradient (norm ~0.05 at lr 2e-3) is clipped every step.
const MAX_NORM: &str = "0.01";

fn options<'a>(sampling: &'a [&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--grad-accum", "2", "--save-every", "3", "--max-grad-norm", MAX_NORM];
    v.extend_from_slice(sampling);
    v
}

/// 6 steps straight == 3 steps, stop, --resume, 3 more, with clipping and each musubi mode:
/// the same state bit for bit and the same metrics lines but for wall time.
#[test]
fn resume_with_clipping_and_musubi_sampling_is_bit_identical() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 3, 4);
    let art = tiny_artifacts();
    let modes: [&[&str]; 2] = [&["--timestep-sampling", "shift", "--discrete-flow-shift", "3"], &["--timestep-sampling", "logit_normal", "--logit-std", "1.5"]];
    for (i, sampling) in modes.iter().enumerate() {
        let straight = dir.path().join(format!("straight-{i}"));
        let resumed = dir.path().join(format!("resumed-{i}"));
        let r = train_cmd(&art, &data, &straight, 6, &options(sampling));
        assert!(r.status.success(), "{}", stderr(&r));
        let mut first = options(sampling);
        first.extend(["--stop-after", "3"]);
        assert!(train_cmd(&art, &data, &resumed, 6, &first).status.success());
        let mut again = options(sampling);
        again.push("--resume");
        let r = train_cmd(&art, &data, &resumed, 6, &again);
        assert!(r.status.success(), "{}", stderr(&r));
        let read = |p: &std::path::Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let state = |root: &std::path::Path| read(&root.join("checkpoints/step-000006/state.safetensors"));
        assert!(state(&straight) == state(&resumed), "{sampling:?}: parameters and moments differ after resume");
        let metrics = |root: &std::path::Path| read_jsonl(&root.join("metrics.jsonl")).unwrap_or_else(|e| panic!("{e}"));
        let strip = |v: Vec<flowstep::metrics::StepRecord>| v.into_iter().map(|m| (m.step, m.loss, m.timestep, m.weight, m.grad_norm, m.grad_norm_clipped)).collect::<Vec<_>>();
        let lines = metrics(&straight);
        assert_eq!(strip(lines.clone()), strip(metrics(&resumed)));
        for m in &lines {
            let clipped = m.grad_norm_clipped.unwrap_or(f32::NAN);
            assert!(m.applied && m.grad_norm > 0.02, "step {}: the norm {} must be well above {MAX_NORM}", m.step, m.grad_norm);
            assert!((clipped - 0.01).abs() < 1e-6, "step {}: clipped norm {clipped}", m.step);
            assert_eq!(m.weight, 1.0, "musubi's modes weigh every timestep 1 by default");
        }
    }
}

/// `--lora-alpha` is the run's: 2 steps, stop, `--resume` (OUT/config.toml keeps the alpha),
/// 2 more == 4 straight; the export's `lora.alpha` is the default; the alpha changes what is
/// trained; the per-checkpoint LoRA and `export-lora` record it; a resume with another alpha
/// is refused, naming it. (Its numbers against PEFT: export/tests/test_lora_alpha_and_files.py.)
#[test]
fn lora_alpha_holds_through_resume_and_files() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 7);
    let art = tiny_artifacts();
    let run = |art: &std::path::Path, name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut flags = vec!["--save-every", "2"];
        flags.extend_from_slice(extra);
        let r = train_cmd(art, &data, &out, 4, &flags);
        assert!(r.status.success(), "{name}: {}", stderr(&r));
        out
    };
    let read = |p: &std::path::Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let state = |out: &std::path::Path| read(&out.join("checkpoints/step-000004/state.safetensors"));
    let straight = run(&art, "straight", &["--lora-alpha", "16"]);
    assert!(state(&straight) != state(&run(&art, "export-alpha", &[])), "alpha 16 trains otherwise than tiny's alpha 8");
    let art16 = copy_artifacts(&dir.path().join("art16"));
    patch_manifest(&art16, |m| m["lora"]["alpha"] = 16.0.into());
    assert!(state(&straight) == state(&run(&art16, "default-16", &[])), "the manifest's alpha is the default");

    let resumed = dir.path().join("resumed");
    assert!(train_cmd(&art, &data, &resumed, 4, &["--save-every", "2", "--lora-alpha", "16", "--stop-after", "2"]).status.success());
    let r = train_cmd(&art, &data, &resumed, 4, &["--resume"]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(state(&straight) == state(&resumed), "the resume keeps --lora-alpha 16 from OUT/config.toml");
    let line = error_line(&train_cmd(&art, &data, &resumed, 6, &["--resume", "--lora-alpha", "4"]));
    assert!(line.contains("belongs to a different run") && line.contains("--lora-alpha 16.0 → 4.0"), "{line}");

    let (tensors, meta) = lora_contents(&resumed.join("loras/resumed-step-000004.safetensors"));
    let alphas: Vec<&Vec<f32>> = tensors.iter().filter(|(n, _)| n.ends_with(".alpha")).map(|(_, v)| v).collect();
    assert!(!alphas.is_empty() && alphas.iter().all(|v| **v == [16.0]), "{alphas:?}");
    assert_eq!(meta.get("ss_network_alpha").map(String::as_str), Some("16"), "{meta:?}");
    let exported = dir.path().join("exported.safetensors");
    let r = flowstep(&["-q", "export-lora", path_str(&resumed.join("checkpoints/step-000004")), "--out", path_str(&exported)]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(lora_contents(&exported).0, tensors, "export-lora writes the alpha trained with");
}

/// A resume that drops clipping or changes the timestep sampling is refused, naming the flag.
#[test]
fn resume_refuses_changed_clipping_or_sampling() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 5);
    let out = dir.path().join("run");
    let art = tiny_artifacts();
    let sampling = ["--timestep-sampling", "sigmoid"];
    let mut first = options(&sampling);
    first.extend(["--stop-after", "3"]);
    assert!(train_cmd(&art, &data, &out, 6, &first).status.success());
    // A --config file replaces OUT/config.toml on resume: an empty one leaves the command line alone.
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap_or_else(|e| panic!("{e}"));
    let line = error_line(&train_cmd(&art, &data, &out, 6, &["--grad-accum", "2", "--timestep-sampling", "sigmoid", "--resume", "--config", path_str(&empty)]));
    assert!(line.contains("--max-grad-norm 0.01 → (none)") && line.contains("--allow-changed-hyperparameters"), "{line}");
    let mut uniform = options(&[]);
    uniform.extend(["--resume", "--config", path_str(&empty)]);
    let line = error_line(&train_cmd(&art, &data, &out, 6, &uniform));
    assert!(line.contains("--timestep-sampling sigmoid (scale 1) → (none)"), "{line}");
}

#[test]
fn sampling_flags_are_checked() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 1, 6);
    let art = tiny_artifacts();
    let out = dir.path().join("run");
    let cases: [(&[&str], &str); 7] = [
        (&["--lora-alpha", "0"], "--lora-alpha: must be a positive number, got 0"),
        (&["--lora-alpha", "inf"], "--lora-alpha: must be a positive number, got inf"),
        (&["--sigmoid-scale", "2"], "--sigmoid-scale: is not used by --timestep-sampling uniform"),
        (&["--timestep-sampling", "sigmoid", "--logit-mean", "1"], "--logit-mean: is not used by --timestep-sampling sigmoid"),
        (&["--timestep-sampling", "logit_normal", "--logit-std", "0"], "--logit-std: must be a positive number, got 0"),
        (&["--timestep-sampling", "shift", "--bf16-timestep"], "--bf16-timestep: rounds DiffSynth's table timesteps"),
        (&["--max-grad-norm", "0"], "--max-grad-norm: must be a positive number, got 0"),
    ];
    for (flags, want) in cases {
        let line = error_line(&train_cmd(&art, &data, &out, 1, flags));
        assert!(line.contains(want), "{flags:?}: {line}");
    }
    assert!(!out.exists(), "a refused run leaves nothing");
}

/// An export-time option on `train` names the export flag in one line (clap alone suggested
/// an unrelated train flag: `--lora-rank` → "a similar argument exists: '--lora-format'").
#[test]
fn export_option_on_train_names_the_export_command() {
    for flag in ["--lora-rank", "--lora-targets", "--gradient-checkpointing", "--precision", "--attention", "--attention-chunk"] {
        for arg in [flag.to_string(), format!("{flag}=8")] {
            let out = flowstep(&["train", "--artifacts", "a", "--data", "d", "--out", "o", &arg]);
            assert_eq!(out.status.code(), Some(2), "{arg}");
            let err = stderr(&out);
            assert_eq!(err.trim_end().lines().count(), 1, "{arg}: one line, no clap tip:\n{err}");
            assert!(err.starts_with(&format!("error: {flag} is an export option")) && err.contains(&format!("python -m flowstep_export --model MODEL --out DIR {flag}")), "{err}");
        }
    }
    // Other commands and other unknown flags keep clap's own message.
    let out = flowstep(&["train", "--artifacts", "a", "--lora-rnk", "4"]);
    assert!(stderr(&out).contains("unexpected argument '--lora-rnk'"));
    let out = flowstep(&["eval", "--lora-rank", "4"]);
    assert!(stderr(&out).contains("unexpected argument '--lora-rank'"));
}
