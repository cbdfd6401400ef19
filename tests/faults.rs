//! Bad input, faults and crash safety: every case exits non-zero with one line naming the
//! file and the problem, never panics, and never loses or corrupts a finished step.

mod common;

use std::path::Path;

use common::*;


fn assert_no_output(out: &Path) {
    assert!(!out.join("checkpoints").exists() && !out.join("lora.safetensors").exists(), "partial output in {}", out.display());
}

#[test]
fn bad_artifacts() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 1, 1);
    let out = dir.path().join("out");
    let case = |name: &str, setup: &dyn Fn(&Path), expect: &[&str]| {
        let art = copy_artifacts(&dir.path().join(name));
        setup(&art);
        let r = train_cmd(&art, &data, &out, 2, &[]);
        let line = error_line(&r);
        for e in expect {
            assert!(line.contains(e), "{name}: `{line}` lacks `{e}`");
        }
        assert_no_output(&out);
    };
    case("missing-file", &|a| std::fs::remove_file(a.join("eval_model.onnx")).unwrap_or_default(), &["eval_model.onnx", "No such file"]);
    case("missing-manifest", &|a| std::fs::remove_file(a.join("manifest.json")).unwrap_or_default(), &["manifest.json"]);
    case("truncated-onnx", &|a| {
        let p = a.join("training_model.onnx");
        let bytes = std::fs::read(&p).unwrap_or_default();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap_or_default();
    }, &["training_model.onnx", "sha256"]);
    case("corrupt-onnx-with-matching-sha", &|a| {
        let p = a.join("training_model.onnx");
        let bytes = std::fs::read(&p).unwrap_or_default();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap_or_default();
        let sha = sha256_hex(&p);
        patch_manifest(a, |m| m["files"]["training_model.onnx"] = serde_json::json!(sha));
    }, &["training_model.onnx", "cannot load"]);
    case("version", &|a| patch_manifest(a, |m| m["format_version"] = serde_json::json!(2)), &["manifest.json", "format_version 2"]);
    case("not-json", &|a| std::fs::write(a.join("manifest.json"), b"{ nope").unwrap_or_default(), &["manifest.json", "not a valid manifest"]);
    case("tensor-list", &|a| patch_manifest(a, |m| {
        if let Some(list) = m["base_weights"]["tensors"].as_array_mut() {
            list.remove(3);
        }
    }), &["manifest.json", "inputs do not follow the contract"]);
    case("lora-layout", &|a| patch_manifest(a, |m| m["lora"]["num_params"] = serde_json::json!(12)), &["manifest.json", "num_params"]);
    case("graph-signature", &|a| patch_manifest(a, |m| {
        m["graphs"]["training_model"]["inputs"][0]["shape"] = serde_json::json!([7]);
    }), &["manifest.json", "lora_params", "[7]"]);
    case("graph-signature-x_t", &|a| patch_manifest(a, |m| {
        if let Some(x_t) = m["graphs"]["training_model"]["inputs"].as_array_mut().and_then(|v| v.iter_mut().find(|i| i["name"] == "x_t")) {
            x_t["shape"][4] = serde_json::json!(7);
        }
    }), &["training_model.onnx", "x_t", "7"]);

    // Base weights: missing tensor, wrong shape, wrong dtype (through --base).
    let art = tiny_artifacts();
    let base = flowstep::tensor_file::TensorFile::open(&art.join("base.safetensors")).unwrap_or_else(|e| panic!("{e}"));
    let names = base.names();
    let all: Vec<_> = names.iter().map(|n| {
        let (shape, v) = base.read_f32(n).unwrap_or_else(|e| panic!("{e}"));
        tensor(n, &shape, v)
    }).collect();
    let write = |file: &str, tensors: Vec<flowstep::tensor_file::OutTensor>| {
        let p = dir.path().join(file);
        write_sample(&p, &tensors);
        p
    };
    let missing = write("missing.safetensors", all.iter().filter(|t| t.name != "blocks.1.ffn.0.weight").map(|t| tensor(&t.name, &t.shape, t.values.clone())).collect());
    let line = error_line(&train_cmd(&art, &data, &out, 2, &["--base", path_str(&missing)]));
    assert!(line.contains("missing.safetensors") && line.contains("blocks.1.ffn.0.weight"), "{line}");
    let wrong = write("shape.safetensors", all.iter().map(|t| if t.name == "head.head.weight" { tensor(&t.name, &[2, 3], vec![0.0; 6]) } else { tensor(&t.name, &t.shape, t.values.clone()) }).collect());
    let line = error_line(&train_cmd(&art, &data, &out, 2, &["--base", path_str(&wrong)]));
    assert!(line.contains("head.head.weight") && line.contains("[2, 3]"), "{line}");
    let int_file = dir.path().join("int.safetensors");
    let header = br#"{"head.head.weight":{"dtype":"I32","shape":[64,64],"data_offsets":[0,16384]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend(vec![0u8; 16384]);
    std::fs::write(&int_file, bytes).unwrap_or_default();
    let line = error_line(&train_cmd(&art, &data, &out, 2, &["--base", path_str(&int_file)]));
    assert!(line.contains("int.safetensors"), "{line}");
    assert_no_output(&out);
}

#[test]
fn bad_data() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let out = dir.path().join("out");
    let ctx = || tensor("context", &[16, 64], values(1024, 1));
    let lat = |shape: &[usize]| tensor("latents", shape, values(shape.iter().product(), 2));
    let cases: Vec<(&str, Vec<flowstep::tensor_file::OutTensor>, &str)> = vec![
        ("missing-tensor", vec![lat(&[16, 2, 8, 8])], "missing tensor `context`"),
        ("wrong-rank", vec![lat(&[16, 2, 64]), ctx()], "expected 4 dims"),
        ("wrong-channels", vec![lat(&[4, 2, 8, 8]), ctx()], "4 channels"),
        ("odd-height", vec![lat(&[16, 2, 7, 8]), ctx()], "height 7"),
        ("wrong-context", vec![lat(&[16, 2, 8, 8]), tensor("context", &[512, 64], values(512 * 64, 3))], "[512, 64]"),
    ];
    for (name, tensors, expect) in cases {
        let data = dir.path().join(name);
        std::fs::create_dir_all(&data).unwrap_or_default();
        tiny_dataset(&data, 2, 1);
        write_sample(&data.join("zz-bad.safetensors"), &tensors);
        let line = error_line(&train_cmd(&art, &data, &out, 2, &[]));
        assert!(line.contains("zz-bad.safetensors") && line.contains(expect), "{name}: {line}");
        assert_no_output(&out);
    }
    // Truncated file and a non-float dtype.
    let data = dir.path().join("truncated");
    tiny_dataset(&data, 2, 1);
    let p = data.join("sample-001.safetensors");
    let bytes = std::fs::read(&p).unwrap_or_default();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap_or_default();
    let line = error_line(&train_cmd(&art, &data, &out, 2, &[]));
    assert!(line.contains("sample-001.safetensors") && line.contains("cannot read sample"), "{line}");
    // Empty directory, missing directory.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap_or_default();
    assert!(error_line(&train_cmd(&art, &empty, &out, 2, &[])).contains("no *.safetensors samples"));
    assert!(error_line(&train_cmd(&art, &dir.path().join("nope"), &out, 2, &[])).contains("does not exist"));
    assert_no_output(&out);
}

#[test]
fn nan_samples_stop_or_are_skipped_and_counted() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 3, 1);
    let mut lat = values(16 * 128, 4);
    lat[77] = f32::NAN;
    write_sample(&data.join("sample-001.safetensors"), &[tensor("latents", &[16, 2, 8, 8], lat), tensor("context", &[16, 64], values(1024, 5))]);
    let out = dir.path().join("stop");
    let line = error_line(&train_cmd(&art, &data, &out, 6, &[]));
    assert!(line.contains("sample-001.safetensors") && line.contains("non-finite") && line.contains("index 77"), "{line}");
    let out = dir.path().join("skip");
    let r = train_cmd(&art, &data, &out, 6, &["--skip-bad-samples"]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(stderr(&r).contains("samples (NaN/Inf)"), "summary counts skipped samples: {}", stderr(&r));
    let metrics = flowstep::metrics::read_jsonl(&out.join("metrics.jsonl")).unwrap_or_default();
    assert_eq!(metrics.len(), 6);
}

/// A loss that overflows (finite data, enormous values) stops the run without writing the
/// bad update; the last good checkpoint stays intact. With `--on-nonfinite skip` the run
/// completes and counts the skipped steps.
#[test]
fn nonfinite_loss_keeps_last_good_checkpoint() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 1, 1);
    let out = dir.path().join("stop");
    assert!(train_cmd(&art, &data, &out, 4, &["--save-every", "2"]).status.success());
    let good = std::fs::read(out.join("checkpoints/step-000004/state.safetensors")).unwrap_or_default();
    let good_lora = std::fs::read(out.join("lora.safetensors")).unwrap_or_default();
    // Continue that run for more steps on data that overflows the loss.
    write_sample(&data.join("sample-000.safetensors"), &[tensor("latents", &[16, 2, 8, 8], vec![3e38; 2048]), tensor("context", &[16, 64], values(1024, 5))]);
    let line = error_line(&train_cmd(&art, &data, &out, 8, &["--save-every", "2", "--resume"]));
    assert!(line.contains("step 5") && line.contains("loss is not finite"), "{line}");
    let after = std::fs::read(out.join("checkpoints/step-000004/state.safetensors")).unwrap_or_default();
    assert!(good == after, "the last good checkpoint changed");
    assert!(!out.join("checkpoints/step-000006").exists());
    assert!(std::fs::read(out.join("lora.safetensors")).unwrap_or_default() == good_lora, "the LoRA file changed");
    let skip = dir.path().join("skip");
    let r = train_cmd(&art, &data, &skip, 3, &["--on-nonfinite", "skip"]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(stderr(&r).contains("3 steps (non-finite)"), "{}", stderr(&r));
    let (_, state) = flowstep::checkpoint::load(&skip.join("checkpoints/step-000003"), 26624).unwrap_or_else(|e| panic!("{e}"));
    let init = flowstep::tensor_file::TensorFile::open(&art.join("lora_init.safetensors")).unwrap_or_else(|e| panic!("{e}"));
    let first = init.read_f32("blocks.0.self_attn.q.lora_A.default.weight").unwrap_or_else(|e| panic!("{e}")).1;
    assert_eq!(&state.params[..first.len()], &first[..], "skipped updates must leave the parameters untouched");
}

/// kill -9 at several moments (including mid-checkpoint), then --resume: the run ends with
/// the same parameters as an uninterrupted one.
#[test]
fn kill_and_resume_matches_uninterrupted_run() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 3, 6);
    let steps = 600;
    let extra = ["--save-every", "1", "--keep-checkpoints", "2"];
    let straight = dir.path().join("straight");
    assert!(train_cmd(&art, &data, &straight, steps, &extra).status.success());
    // The final checkpoint's parameters and moments (the LoRA files also carry wall-clock times).
    let final_state = |root: &Path| std::fs::read(root.join(format!("checkpoints/step-{steps:06}/state.safetensors"))).unwrap_or_default();
    let want = final_state(&straight);
    assert!(!want.is_empty());
    let out = dir.path().join("killed");
    let steps_s = steps.to_string();
    let mut kills = 0;
    for delay_ms in [150u64, 90, 230, 60] {
        let mut args = vec!["-q", "train", "--artifacts", path_str(&art), "--data", path_str(&data), "--out", path_str(&out), "--steps", &steps_s, "--seed", "5", "--lr", "2e-3"];
        args.extend_from_slice(&extra);
        if out.join("checkpoints").exists() {
            args.push("--resume");
        }
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flowstep")).args(&args).stderr(std::process::Stdio::null()).spawn().unwrap_or_else(|e| panic!("{e}"));
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        if child.try_wait().ok().flatten().is_none() {
            let _ = child.kill(); // SIGKILL
            kills += 1;
        }
        let _ = child.wait();
    }
    assert!(kills >= 2, "the runs finished before they could be killed");
    let r = train_cmd(&art, &data, &out, steps, &[&extra[..], &["--resume"]].concat());
    assert!(r.status.success(), "{}", stderr(&r));
    let got = final_state(&out);
    assert!(got == want, "parameters after kill/resume differ from the uninterrupted run");
    let lines = |p: &Path| std::fs::read_to_string(p.join("metrics.jsonl")).unwrap_or_default().lines().count();
    assert_eq!(lines(&out), steps as usize);
}

#[test]
fn second_trainer_on_same_out_is_refused() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 1);
    let out = dir.path().join("out");
    let mut first = std::process::Command::new(env!("CARGO_BIN_EXE_flowstep"))
        .args(["-q", "train", "--artifacts", path_str(&art), "--data", path_str(&data), "--out", path_str(&out), "--steps", "1000000"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !out.join("metrics.jsonl").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let line = error_line(&train_cmd(&art, &data, &out, 5, &["--resume"]));
    let _ = first.kill();
    let _ = first.wait();
    assert!(line.contains("in use by another flowstep train"), "{line}");
}

/// A full disk while saving: a clear error, and the previous checkpoint is intact.
/// Uses a 1 MiB tmpfs (CI and developers run as root); each tiny checkpoint is ~320 kB.
#[test]
fn disk_full_keeps_previous_checkpoint() {
    let dir = tempdir();
    let disk = SmallDisk::mount(dir.path());
    let mnt = disk.0.clone();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 1);
    let out = mnt.join("out");
    let r = train_cmd(&art, &data, &out, 10, &["--save-every", "1", "--keep-checkpoints", "0"]);
    let line = error_line(&r);
    assert!(line.contains("No space left on device") && line.contains(path_str(&out)), "{line}");
    let complete = flowstep::checkpoint::list(&out).unwrap_or_default();
    assert!(!complete.is_empty(), "no checkpoint survived");
    for (_, ckpt) in &complete {
        flowstep::checkpoint::load(ckpt, 26624).unwrap_or_else(|e| panic!("checkpoint {} is damaged: {e}", ckpt.display()));
    }
    let leftovers: Vec<_> = std::fs::read_dir(out.join("checkpoints")).map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).filter(|n| n.to_string_lossy().starts_with('.')).collect()).unwrap_or_default();
    assert!(leftovers.is_empty(), "temp files left behind: {leftovers:?}");
}

/// A full disk while saving never makes a checkpoint directory visible under its final name
/// with a truncated or missing state file: every `step-*` directory (not only those that
/// `checkpoint::list` accepts) is checked while the run writes and after it failed.
#[test]
fn disk_full_never_exposes_a_partial_checkpoint() {
    let dir = tempdir();
    let disk = SmallDisk::mount(dir.path());
    let mnt = disk.0.clone();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 1);
    let out = mnt.join("out");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flowstep"))
        .args(["-q", "train", "--artifacts", path_str(&art), "--data", path_str(&data), "--out", path_str(&out), "--steps", "20", "--seed", "5"])
        .args(["--save-every", "1", "--keep-checkpoints", "0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    // A checkpoint directory under its final name must hold a complete state file (its size
    // is exactly what its safetensors header promises) and a parseable trainer.json.
    let problem = |ckpt: &Path| -> Option<String> {
        let state = std::fs::read(ckpt.join(flowstep::checkpoint::STATE_FILE)).ok()?;
        let header_len = state.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize);
        let header: Option<serde_json::Value> = header_len.and_then(|n| state.get(8..8 + n)).and_then(|h| serde_json::from_slice(h).ok());
        let end = header.as_ref().and_then(|h| h.as_object()).map(|o| o.values().filter_map(|t| t["data_offsets"][1].as_u64()).max().unwrap_or(0) as usize);
        let trainer = std::fs::read(ckpt.join(flowstep::checkpoint::TRAINER_FILE)).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        match (header_len, end, trainer) {
            (Some(n), Some(end), Some(_)) if state.len() == 8 + n + end && end == 3 * 26624 * 4 => None,
            _ => Some(format!("{}: state {} bytes, header {header_len:?}, data end {end:?}", ckpt.display(), state.len())),
        }
    };
    let check_all = |seen: &mut Vec<String>| {
        let Ok(entries) = std::fs::read_dir(out.join("checkpoints")) else { return };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("step-") {
                // A directory without its state file is as bad as a truncated one.
                let p = entry.path();
                let missing = !p.join(flowstep::checkpoint::STATE_FILE).is_file() || !p.join(flowstep::checkpoint::TRAINER_FILE).is_file();
                let bad = if missing { Some(format!("{name}: missing files")) } else { problem(&p) };
                if let Some(b) = bad.filter(|b| !seen.contains(b)) {
                    // The directory may have been renamed into place while we read: look again.
                    if problem(&p).is_some() || missing {
                        seen.push(b);
                    }
                }
            }
        }
    };
    let mut seen = Vec::new();
    let mut polls = 0;
    while child.try_wait().ok().flatten().is_none() {
        check_all(&mut seen);
        polls += 1;
    }
    let result = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success() && err.contains("No space left on device"), "{err}");
    check_all(&mut seen);
    assert!(polls > 10, "the run ended before it could be watched");
    assert!(seen.is_empty(), "partial checkpoints were visible under their final names: {seen:?}");
    assert!(!flowstep::checkpoint::list(&out).unwrap_or_default().is_empty(), "no checkpoint survived");
}

/// Ctrl-C (SIGINT) finishes the step, saves a checkpoint and exits 130; --resume continues.
#[test]
fn ctrl_c_saves_a_checkpoint() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 1);
    let out = dir.path().join("out");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_flowstep"))
        .args(["-q", "train", "--artifacts", path_str(&art), "--data", path_str(&data), "--out", path_str(&out), "--steps", "1000000", "--seed", "5", "--lr", "2e-3"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::read_to_string(out.join("metrics.jsonl")).map(|s| s.lines().count()).unwrap_or(0) < 20 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()));
    let result = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(result.status.code(), Some(130), "{}", String::from_utf8_lossy(&result.stderr));
    let saved = flowstep::checkpoint::list(&out).unwrap_or_default();
    let (step, _) = saved.last().cloned().unwrap_or_else(|| panic!("no checkpoint after Ctrl-C"));
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default().lines().count() as u64;
    assert_eq!(step, lines, "the checkpoint holds every finished step");
    assert!(!out.join("lora.safetensors").exists(), "an interrupted run writes no final LoRA");
    let r = train_cmd(&art, &data, &out, step + 3, &["--resume"]);
    assert!(r.status.success(), "{}", stderr(&r));
}
