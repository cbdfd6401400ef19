//! The command-line surface: schedule output, help, and clear one-line errors.

mod common;

use common::*;

/// docs/DESIGN.md §4's reference table, from `flowstep schedule --steps 1000 --shift 5 --csv`.
#[test]
fn schedule_csv_reproduces_design_table() {
    let out = flowstep(&["schedule", "--steps", "1000", "--shift", "5", "--csv"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("index,sigma,timestep,weight"));
    let rows: Vec<Vec<f64>> = lines.map(|l| l.split(',').map(|x| x.parse().unwrap_or(f64::NAN)).collect()).collect();
    assert_eq!(rows.len(), 1000);
    // (index, sigma, t, w) as printed in docs/DESIGN.md §4, to the digits printed there.
    let table = [
        (0, 1.0, 1000.0, 0.0),
        (1, 0.99980, 999.80, 0.00128),
        (250, 0.9375, 937.5, 0.398),
        (500, 0.83333, 833.33, 1.0249),
        (750, 0.625, 625.0, 1.914),
        (833, 0.50060, 500.60, 2.0764),
        (999, 0.0049801, 4.980, 0.0319),
    ];
    for (i, sigma, t, w) in table {
        let r = &rows[i];
        assert_eq!(r[0] as usize, i);
        assert!((r[1] - sigma).abs() <= 5e-6 + 1e-5 * sigma, "sigma[{i}] = {}", r[1]);
        assert!((r[2] - t).abs() <= 5e-3, "t[{i}] = {}", r[2]);
        assert!((r[3] - w).abs() <= 5e-4 * w.max(1.0), "w[{i}] = {}", r[3]);
    }
    assert_eq!(rows[0][3], 0.0);
    let mean: f64 = rows.iter().map(|r| r[3]).sum::<f64>() / 1000.0;
    assert!((mean - 1.0).abs() < 1e-5);
}

#[test]
fn schedule_plot_and_text() {
    let dir = tempdir();
    let png = dir.path().join("schedule.png");
    let out = flowstep(&["schedule", "--steps", "50", "--plot", path_str(&png)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = std::fs::read(&png).unwrap_or_default();
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 51);
    let bad = flowstep(&["schedule", "--shift=-1"]);
    assert!(!bad.status.success() && stderr(&bad).contains("--shift"));
}

#[test]
fn help_explains_every_flag() {
    for cmd in ["train", "eval", "inspect", "schedule"] {
        let out = flowstep(&[cmd, "--help"]);
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        // A flag's own line is indented less than the wrapped help text (10 spaces), which may
        // itself start with a flag it mentions.
        let is_flag_line = |l: &&str| l.trim_start().starts_with("--") && l.len() - l.trim_start().len() < 10;
        for line in help.lines().filter(is_flag_line) {
            let described = line.split("  ").filter(|p| !p.trim().is_empty()).count() >= 2;
            let next_line_help = help.lines().skip_while(|l| *l != line).nth(1).is_some_and(|n| n.starts_with("          "));
            assert!(described || next_line_help, "{cmd}: flag without help: {line}");
        }
    }
    let train = String::from_utf8_lossy(&flowstep(&["train", "--help"]).stdout).into_owned();
    for flag in ["--artifacts", "--data", "--out", "--steps", "--epochs", "--seed", "--lr", "--grad-accum", "--save-every", "--resume", "--eval-data", "--device", "--threads"] {
        assert!(train.contains(flag), "train --help lacks {flag}");
    }
}

fn one_line_error(out: &std::process::Output) -> String {
    assert!(!out.status.success());
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"));
    lines[0].to_string()
}

#[test]
fn missing_or_bad_ort_library_is_one_clear_error() {
    let art = path_str(&tiny_artifacts()).to_string();
    let missing = flowstep(&["--ort-lib", "/nonexistent/libonnxruntime.so", "inspect", "--artifacts", &art]);
    let line = one_line_error(&missing);
    assert!(line.contains("/nonexistent/libonnxruntime.so") && line.contains("setup_ort.sh"), "{line}");
    let dir = tempdir();
    let fake = dir.path().join("libonnxruntime.so");
    std::fs::write(&fake, b"not a library").unwrap_or_default();
    let line = one_line_error(&flowstep(&["--ort-lib", path_str(&fake), "inspect", "--artifacts", &art]));
    assert!(line.contains("failed to load") && line.contains("setup_ort.sh"), "{line}");
    let env = std::process::Command::new(env!("CARGO_BIN_EXE_flowstep"))
        .args(["inspect", "--artifacts", &art])
        .env("ORT_DYLIB_PATH", "/nonexistent/lib.so")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(one_line_error(&env).contains("ORT_DYLIB_PATH"));
}

#[test]
fn cuda_without_gpu_library_fails_instead_of_falling_back() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 1, 1);
    let out = dir.path().join("out");
    let art = path_str(&tiny_artifacts()).to_string();
    let line = one_line_error(&flowstep(&["train", "--artifacts", &art, "--data", path_str(&data), "--out", path_str(&out), "--steps", "1", "--device", "cuda"]));
    // Without the GPU library the hint is to install it; with it (a developer ran
    // `setup_ort.sh --gpu`) but no CUDA libraries, the hint names LD_LIBRARY_PATH.
    assert!(line.contains("cuda:0") && (line.contains("setup_ort.sh --gpu") || line.contains("LD_LIBRARY_PATH")), "{line}");
    assert!(!out.join("metrics.jsonl").exists() && !out.join("checkpoints").exists(), "no partial output");
    // A flag clap rejects: clap's own two-part message (error + "try --help").
    let bad = flowstep(&["train", "--artifacts", &art, "--data", path_str(&data), "--out", path_str(&out), "--steps", "1", "--device", "gpu"]);
    assert!(!bad.status.success() && stderr(&bad).contains("unknown device `gpu`"));
}

#[test]
fn inspect_summarises_and_validates() {
    let out = flowstep(&["inspect", "--artifacts", path_str(&tiny_artifacts())]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("26624 parameters") && text.contains("training_model") && text.contains("matches the manifest"), "{text}");
    assert!(text.contains("attention chunked (12 queries per chunk: every provider)"), "{text}");
    // A fused export says where its operators run.
    let fused = flowstep(&["inspect", "--artifacts", path_str(&repo().join("models/tiny-fused/artifacts"))]);
    assert!(String::from_utf8_lossy(&fused.stdout).contains("attention fused (flowstep's kernels: cpu; cuda with a --features cuda-attention build, bf16)"), "{}", stderr(&fused));
    assert!(String::from_utf8_lossy(&fused.stdout).contains("operators   FlashAttention, FlashAttentionGrad, GeluTanh, GeluTanhGrad, LayerNormGrad, RmsNorm, RmsNormGrad, Rope"), "{}", stderr(&fused));
}

/// `flowstep inspect | head -1`: a reader that stops early ends the output quietly (exit 0),
/// as for any Unix tool. Shown failing on the old code: println! panicked ("failed printing to
/// stdout: Broken pipe", exit 101) at the first line written after the reader had gone.
#[test]
fn inspect_into_a_reader_that_stops_early_exits_quietly() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flowstep"))
        .args(["inspect", "--artifacts", path_str(&tiny_artifacts())])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run flowstep: {e}"));
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    // The reader is dropped here, before the graphs' lines (written after loading them).
    assert!(first.starts_with("artifacts"), "{first}");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{:?}: {}", out.status, stderr(&out));
}
