//! `flowstep train --config FILE`, OUT/config.toml and `--resume --out OUT`, end to end on
//! the tiny artifacts.

mod common;

use std::path::Path;

use common::*;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{e}"));
}

fn config_text(data: &Path, steps: u64) -> String {
    format!(
        "artifacts = \"{}\"\ndata = \"{}\"\nsteps = {steps}\nseed = 5\nlr = 2e-3\ngrad_accum = 2\nlr-schedule = \"cosine:1:0.1\"\nsave-every = 2\n",
        path_str(&tiny_artifacts()),
        path_str(data)
    )
}

fn lora(out: &Path) -> LoraContents {
    lora_contents(&out.join("lora.safetensors"))
}

fn ok(r: &std::process::Output) {
    assert!(r.status.success(), "{}", stderr(r));
}

#[test]
fn config_file_equals_flags_and_the_command_line_overrides_it() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 3, 2);
    let config = dir.path().join("run.toml");
    write(&config, &config_text(&data, 4));
    let from_flags = dir.path().join("flags");
    ok(&train_cmd(&tiny_artifacts(), &data, &from_flags, 4, &["--grad-accum", "2", "--lr-schedule", "cosine:1:0.1", "--save-every", "2"]));
    let from_file = dir.path().join("file");
    ok(&flowstep(&["-q", "train", "--config", path_str(&config), "--out", path_str(&from_file)]));
    assert!(lora(&from_flags).0 == lora(&from_file).0, "a run from the config file differs from the same run from flags");

    // The command line wins: --lr 1e-3 over the file's 2e-3.
    let overridden = dir.path().join("overridden");
    ok(&flowstep(&["-q", "train", "--config", path_str(&config), "--out", path_str(&overridden), "--lr", "1e-3"]));
    let stored: toml::Table = std::fs::read_to_string(overridden.join("config.toml")).unwrap_or_default().parse().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stored["lr"].as_float(), Some(1e-3));
    assert_eq!(stored["grad-accum"].as_integer(), Some(2));
    // Defaults are recorded too.
    assert_eq!(stored["beta2"].as_float(), Some(0.999));
    assert_eq!(stored["skip-bad-samples"].as_bool(), Some(false));
    assert!(!stored.contains_key("config") && !stored.contains_key("resume"));
    assert!(lora(&overridden).0 != lora(&from_file).0, "--lr on the command line did not override the file");
}

/// 6 steps straight == 2 steps, stop, then `--resume --out OUT` and nothing else (the
/// 4 steps left: --stop-after is not stored).
#[test]
fn resume_needs_only_the_out_directory() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 3, 2);
    let config = dir.path().join("run.toml");
    write(&config, &config_text(&data, 6));
    let straight = dir.path().join("straight");
    ok(&flowstep(&["-q", "train", "--config", path_str(&config), "--out", path_str(&straight)]));
    let resumed = dir.path().join("resumed");
    ok(&flowstep(&["-q", "train", "--config", path_str(&config), "--out", path_str(&resumed), "--stop-after", "2"]));
    assert!(!resumed.join("lora.safetensors").exists());
    let r = flowstep(&["train", "--resume", "--out", path_str(&resumed)]);
    ok(&r);
    assert!(!stderr(&r).contains("warning: resuming with a flag"), "{}", stderr(&r));
    assert!(lora(&straight).0 == lora(&resumed).0, "the resumed run differs from the uninterrupted one");
}

#[test]
fn a_resume_that_drops_eval_data_is_reported() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 3, 2);
    let eval = dir.path().join("eval");
    tiny_dataset(&eval, 2, 9);
    let out = dir.path().join("out");
    let config = dir.path().join("run.toml");
    write(&config, &format!("{}eval-data = \"{}\"\n", config_text(&data, 4), path_str(&eval)));
    ok(&flowstep(&["-q", "train", "--config", path_str(&config), "--out", path_str(&out), "--stop-after", "2"]));
    write(&config, &config_text(&data, 4));
    let r = flowstep(&["train", "--resume", "--out", path_str(&out), "--config", path_str(&config)]);
    ok(&r);
    let warnings: Vec<String> = stderr(&r).lines().filter(|l| l.starts_with("warning: resuming with a flag")).map(str::to_string).collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("--eval-data dropped") && warnings[0].contains(path_str(&eval)), "{}", warnings[0]);
    // The resume updated the stored config.
    assert!(!std::fs::read_to_string(out.join("config.toml")).unwrap_or_default().contains("eval-data"));
}

#[test]
fn a_resume_that_changes_the_seed_is_still_refused() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 3, 2);
    let config = dir.path().join("run.toml");
    write(&config, &config_text(&data, 4));
    let out = dir.path().join("out");
    ok(&flowstep(&["-q", "train", "--config", path_str(&config), "--out", path_str(&out), "--stop-after", "2"]));
    let before = std::fs::read(out.join("config.toml")).unwrap_or_default();
    let r = flowstep(&["-q", "train", "--resume", "--out", path_str(&out), "--seed", "6"]);
    assert_error(&r, &["different run", "--seed 5 → 6"]);
    assert_eq!(std::fs::read(out.join("config.toml")).unwrap_or_default(), before, "a refused resume rewrote config.toml");
}

#[test]
fn bad_config_files_are_one_line() {
    let dir = tempdir();
    let config = dir.path().join("run.toml");
    let out = dir.path().join("out");
    let cases: [(&str, &[&str]); 7] = [
        ("grad-accum = 2\ngrad_accum = 4\n", &["run.toml", "given twice"]),
        ("nope = 3\n", &["run.toml", "`nope`", "not a flag"]),
        ("lr = \"fast\"\n", &["run.toml", "`lr`", "invalid value 'fast' for --lr"]),
        ("steps = [1]\n", &["run.toml", "`steps`", "got array"]),
        ("skip-bad-samples = 1\n", &["run.toml", "`skip-bad-samples`", "true or false"]),
        ("resume = true\n", &["run.toml", "`resume`", "command line"]),
        ("lr = \n", &["run.toml", "not a TOML", "line 1"]),
    ];
    for (text, expect) in cases {
        write(&config, text);
        let r = run_limited(&["train", "--config", path_str(&config), "--out", path_str(&out)], 10);
        assert_error(&r, expect);
    }
    let fifo = dir.path().join("fifo.toml");
    mkfifo(&fifo);
    assert_error(&run_limited(&["train", "--config", path_str(&fifo)], 10), &["fifo.toml", "FIFO"]);
    write(&config, &format!("# {}\n", "x".repeat(2 << 20)));
    assert_error(&run_limited(&["train", "--config", path_str(&config)], 10), &["run.toml", "too large"]);
    assert_untouched(&out);
}
