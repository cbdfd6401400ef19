//! `flowstep train`'s musubi-tuner options end to end on the tiny artifacts: gradient
//! clipping and timestep sampling through a resume, their checks, and the line an
//! export-time option gets. Their numbers against PyTorch and musubi's code:
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
    let cases: [(&[&str], &str); 5] = [
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
    for flag in ["--lora-rank", "--lora-alpha", "--gradient-checkpointing", "--precision", "--attention", "--attention-chunk"] {
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
