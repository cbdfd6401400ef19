//! What `flowstep train` leaves for users to watch and load: a LoRA with each checkpoint
//! (and on Ctrl-C) with kohya/musubi metadata, `flowstep export-lora`, TensorBoard event
//! files (read back here by an independent TFRecord + protobuf reader), a `loss.png` drawn
//! during the run, and a resumed run's summary covering the whole run.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use flowstep::artifacts::Artifacts;
use flowstep::metrics::read_jsonl;
use flowstep::tensor_file::TensorFile;

fn metadata(path: &Path) -> HashMap<String, String> {
    TensorFile::open(path).unwrap_or_else(|e| panic!("{e}")).metadata().cloned().unwrap_or_default()
}

fn lora_params(path: &Path) -> Vec<f32> {
    let artifacts = Artifacts::open(&tiny_artifacts()).unwrap_or_else(|e| panic!("{e}"));
    flowstep::lora_io::load(path, &artifacts.manifest.lora).unwrap_or_else(|e| panic!("{e}"))
}

fn checkpoint_params(dir: &Path) -> Vec<f32> {
    TensorFile::open(&dir.join("state.safetensors")).and_then(|f| f.read_f32("params")).unwrap_or_else(|e| panic!("{e}")).1
}

fn bf16(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
}

/// Every checkpoint writes OUT/loras/<name>-step-XXXXXX.safetensors (ComfyUI layout) with the
/// keys ComfyUI and Civitai read; `export-lora` writes the same file from the checkpoint; the
/// last one holds the final LoRA's parameters.
#[test]
fn each_checkpoint_writes_a_lora_with_metadata() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 1);
    let out = dir.path().join("fox-run");
    let r = train_cmd(&tiny_artifacts(), &data, &out, 6, &["--save-every", "3", "--keep-checkpoints", "1", "--output-name", "fox"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let mut names: Vec<String> = std::fs::read_dir(out.join("loras")).unwrap_or_else(|e| panic!("{e}")).map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()).unwrap_or_default()).collect();
    names.sort();
    assert_eq!(names, ["fox-step-000003.safetensors", "fox-step-000006.safetensors"], "one LoRA per checkpoint, kept when checkpoints are pruned");
    let step3 = out.join("loras/fox-step-000003.safetensors");
    let meta = metadata(&step3);
    let want = [
        ("ss_base_model_version", "wan"),
        ("ss_network_module", "networks.lora_wan"),
        ("ss_network_dim", "8"),
        ("ss_network_alpha", "8"),
        ("ss_steps", "3"),
        ("ss_epoch", "2"),
        ("ss_max_train_steps", "6"),
        ("ss_learning_rate", "0.002"),
        ("ss_seed", "5"),
        ("ss_output_name", "fox"),
        ("ss_num_train_items", "2"),
        ("ss_resolution", "64,64"),
        ("ss_sd_model_name", "tiny"),
        ("modelspec.architecture", "wan2.1/lora"),
        ("modelspec.resolution", "64x64"),
        ("flowstep.base_model", "tiny"),
        ("flowstep.steps", "3"),
        ("flowstep.lora_rank", "8"),
    ];
    for (k, v) in want {
        assert_eq!(meta.get(k).map(String::as_str), Some(v), "{k} in {meta:?}");
    }
    assert_eq!(meta.get("flowstep.export_sha256"), Some(&sha256_hex(&tiny_artifacts().join("manifest.json"))));
    let buckets: serde_json::Value = serde_json::from_str(meta.get("ss_bucket_info").map_or("", String::as_str)).unwrap_or_default();
    assert_eq!(buckets["buckets"]["0"], serde_json::json!({"resolution": [64, 64], "frames": 5, "count": 2}));
    let started: f64 = meta.get("ss_training_started_at").and_then(|s| s.parse().ok()).unwrap_or(0.0);
    assert!(started > 1.7e9, "ss_training_started_at is a unix time: {started}");
    assert!(TensorFile::open(&step3).map(|f| f.names()).unwrap_or_default().contains(&"diffusion_model.blocks.0.self_attn.q.lora_A.weight".to_string()));

    // The newest checkpoint's LoRA is the final LoRA's parameters; export-lora rewrites it.
    let step6 = out.join("loras/fox-step-000006.safetensors");
    assert_eq!(lora_params(&step6), lora_params(&out.join("lora.safetensors")));
    let ckpt = out.join("checkpoints/step-000006");
    assert_eq!(lora_params(&step6), bf16(&checkpoint_params(&ckpt)));
    let exported = dir.path().join("exported.safetensors");
    let e = flowstep(&["-q", "export-lora", path_str(&ckpt), "--out", path_str(&exported), "--dtype", "f32"]);
    assert!(e.status.success(), "{}", stderr(&e));
    assert_eq!(lora_params(&exported), checkpoint_params(&ckpt), "f32 export is the checkpoint's parameters exactly");
    assert_eq!(metadata(&exported), metadata(&step6));
    let again = flowstep(&["-q", "export-lora", path_str(&ckpt), "--out", path_str(&exported)]);
    assert!(error_line(&again).contains("already exists"), "no silent overwrite");
    let wrong = flowstep(&["-q", "export-lora", path_str(&out), "--out", path_str(&dir.path().join("x.safetensors"))]);
    assert!(error_line(&wrong).contains("checkpoints/step-XXXXXX"), "OUT instead of a checkpoint: {}", stderr(&wrong));

    // Without --output-name the files are named after OUT.
    let plain = dir.path().join("plain");
    let r = train_cmd(&tiny_artifacts(), &data, &plain, 2, &[]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(plain.join("loras/plain-step-000002.safetensors").is_file());
    let bad = train_cmd(&tiny_artifacts(), &data, &dir.path().join("bad"), 2, &["--output-name", "a/b"]);
    assert!(error_line(&bad).contains("--output-name"));
}

/// A checkpoint directory or its state file given where a LoRA file belongs is named as a
/// training checkpoint, with the command that makes a LoRA of it.
#[test]
fn a_checkpoint_given_as_lora_is_named() {
    let dir = tempdir();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 1);
    let out = dir.path().join("run");
    let r = train_cmd(&tiny_artifacts(), &data, &out, 2, &[]);
    assert!(r.status.success(), "{}", stderr(&r));
    let ckpt = out.join("checkpoints/step-000002");
    for lora in [ckpt.clone(), ckpt.join("state.safetensors")] {
        let e = flowstep(&["eval", "--artifacts", path_str(&tiny_artifacts()), "--data", path_str(&data), "--lora", path_str(&lora)]);
        let line = error_line(&e);
        assert!(line.contains("training checkpoint") && line.contains("export-lora"), "{line}");
        let t = train_cmd(&tiny_artifacts(), &data, &dir.path().join("again"), 2, &["--init-lora", path_str(&lora)]);
        let line = error_line(&t);
        assert!(line.contains("training checkpoint") && line.contains("export-lora"), "{line}");
    }
}

// --- an independent reader of TensorBoard event files -------------------------------------

/// CRC-32C (Castagnoli), bit by bit.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

/// TFRecord's mask, spelled as tensorflow/core/lib/hash/crc32c.h writes it.
#[allow(clippy::manual_rotate)]
fn masked(data: &[u8]) -> u32 {
    let c = crc32c(data);
    ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
}

/// The records of a TFRecord file, each CRC checked.
fn records(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{e}"));
    let (mut at, mut out) = (0, Vec::new());
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap_or_default());
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap_or_default()) as usize;
        assert_eq!(u32_at(at + 8), masked(len_bytes), "length CRC of the record at byte {at}");
        let data = &bytes[at + 12..at + 12 + len];
        assert_eq!(u32_at(at + 12 + len), masked(data), "data CRC of the record at byte {at}");
        out.push(data.to_vec());
        at += 16 + len;
    }
    assert_eq!(at, bytes.len(), "a partial record at the end");
    out
}

enum Field {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(Vec<u8>),
    Fixed32([u8; 4]),
}

fn fields(buf: &[u8]) -> Vec<(u64, Field)> {
    let mut at = 0;
    let varint = |at: &mut usize| {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let b = buf[*at];
            *at += 1;
            v |= ((b & 0x7f) as u64) << shift;
            shift += 7;
            if b < 0x80 {
                return v;
            }
        }
    };
    let mut out = Vec::new();
    while at < buf.len() {
        let key = varint(&mut at);
        let field = match key & 7 {
            0 => Field::Varint(varint(&mut at)),
            1 => {
                at += 8;
                Field::Fixed64(buf[at - 8..at].try_into().unwrap_or_default())
            }
            2 => {
                let len = varint(&mut at) as usize;
                at += len;
                Field::Bytes(buf[at - len..at].to_vec())
            }
            5 => {
                at += 4;
                Field::Fixed32(buf[at - 4..at].try_into().unwrap_or_default())
            }
            w => panic!("wire type {w}"),
        };
        out.push((key >> 3, field));
    }
    out
}

#[derive(Debug, Default)]
struct Event {
    wall_time: f64,
    step: u64,
    file_version: Option<String>,
    session_start: bool,
    /// (tag, value) of scalars; (tag, width, height, PNG) of images.
    scalars: Vec<(String, f32)>,
    images: Vec<(String, u64, u64, Vec<u8>)>,
}

fn decode(record: &[u8]) -> Event {
    let mut e = Event::default();
    for (n, f) in fields(record) {
        match (n, f) {
            (1, Field::Fixed64(b)) => e.wall_time = f64::from_le_bytes(b),
            (2, Field::Varint(v)) => e.step = v,
            (3, Field::Bytes(b)) => e.file_version = Some(String::from_utf8_lossy(&b).into_owned()),
            (7, Field::Bytes(b)) => e.session_start = fields(&b).iter().any(|(n, f)| *n == 1 && matches!(f, Field::Varint(1))),
            (5, Field::Bytes(summary)) => {
                for (_, value) in fields(&summary) {
                    let Field::Bytes(value) = value else { panic!("Summary.value is a message") };
                    let mut tag = String::new();
                    for (n, f) in fields(&value) {
                        match (n, f) {
                            (1, Field::Bytes(t)) => tag = String::from_utf8_lossy(&t).into_owned(),
                            (2, Field::Fixed32(v)) => e.scalars.push((tag.clone(), f32::from_le_bytes(v))),
                            (4, Field::Bytes(image)) => {
                                let (mut w, mut h, mut png) = (0, 0, Vec::new());
                                for (n, f) in fields(&image) {
                                    match (n, f) {
                                        (1, Field::Varint(v)) => h = v,
                                        (2, Field::Varint(v)) => w = v,
                                        (4, Field::Bytes(b)) => png = b,
                                        _ => {}
                                    }
                                }
                                e.images.push((tag.clone(), w, h, png));
                            }
                            (n, _) => panic!("unexpected Summary.Value field {n}"),
                        }
                    }
                }
            }
            (n, _) => panic!("unexpected Event field {n}"),
        }
    }
    e
}

fn event_files(out: &Path) -> Vec<PathBuf> {
    let dir = out.join("tensorboard");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default();
    files.retain(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("events.out.tfevents.")));
    files.sort();
    files
}

/// (step, value) of one scalar tag over the events.
fn scalar(events: &[Event], tag: &str) -> Vec<(u64, f32)> {
    events.iter().flat_map(|e| e.scalars.iter().filter(|(t, _)| t == tag).map(|(_, v)| (e.step, *v))).collect()
}

/// The event file holds, CRC-checked and in order, the version record, then per step the
/// loss, learning rate and gradient norm of metrics.jsonl, and the eval losses (step 0 too).
#[test]
fn tensorboard_events_hold_the_metrics() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let held_out = dir.path().join("held-out");
    tiny_dataset(&data, 2, 1);
    tiny_dataset(&held_out, 2, 2);
    let out = dir.path().join("run");
    let r = train_cmd(&tiny_artifacts(), &data, &out, 6, &["--eval-data", path_str(&held_out), "--eval-every", "3", "--lr-schedule", "warmup:2"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let files = event_files(&out);
    assert_eq!(files.len(), 1, "{files:?}");
    let events: Vec<Event> = records(&files[0]).iter().map(|r| decode(r)).collect();
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(events.iter().all(|e| e.wall_time > 1.7e9), "wall times are unix times");
    let metrics = read_jsonl(&out.join("metrics.jsonl")).unwrap_or_else(|e| panic!("{e}"));
    let from_metrics = |f: &dyn Fn(&flowstep::metrics::StepRecord) -> f64| metrics.iter().map(|m| (m.step, f(m) as f32)).collect::<Vec<_>>();
    assert_eq!(scalar(&events, "train/loss"), from_metrics(&|m| m.loss));
    assert_eq!(scalar(&events, "train/lr"), from_metrics(&|m| m.lr));
    assert_eq!(scalar(&events, "train/grad_norm"), from_metrics(&|m| m.grad_norm as f64));
    let evals = scalar(&events, "eval/loss");
    assert_eq!(evals.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [0, 3, 6]);
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap_or_default()).unwrap_or_default();
    assert_eq!(evals[0].1, summary["eval_before"].as_f64().unwrap_or(f64::NAN) as f32);
    assert_eq!(Some(evals[2].1), metrics[5].eval_loss.map(|v| v as f32));
}

/// A resume starts a new event file that marks a session start at the first step it redoes
/// (TensorBoard then drops the old file's later steps), and its summary and loss curve still
/// hold the eval before training and the run's first loss.
#[test]
fn a_resumed_run_keeps_the_whole_run() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let held_out = dir.path().join("held-out");
    tiny_dataset(&data, 2, 1);
    tiny_dataset(&held_out, 2, 2);
    let summary = |out: &Path| -> serde_json::Value { serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap_or_default()).unwrap_or_default() };
    let straight = dir.path().join("straight");
    let extra = ["--eval-data", path_str(&held_out), "--save-every", "2"];
    let r = train_cmd(&tiny_artifacts(), &data, &straight, 6, &extra);
    assert!(r.status.success(), "{}", stderr(&r));

    let resumed = dir.path().join("resumed");
    let mut first = extra.to_vec();
    first.extend(["--stop-after", "5"]);
    let r = train_cmd(&tiny_artifacts(), &data, &resumed, 6, &first);
    assert!(r.status.success(), "{}", stderr(&r));
    // As after a crash past step 4: the newest checkpoint is step 4, step 5 is redone.
    std::fs::remove_dir_all(resumed.join("checkpoints/step-000005")).unwrap_or_else(|e| panic!("{e}"));
    let mut again = extra.to_vec();
    again.push("--resume");
    let r = train_cmd(&tiny_artifacts(), &data, &resumed, 6, &again);
    assert!(r.status.success(), "{}", stderr(&r));

    let (a, b) = (summary(&straight), summary(&resumed));
    assert_eq!(b["start_step"], 4);
    for key in ["eval_before", "eval_after", "first_loss", "final_loss"] {
        assert!(a[key].is_f64() && a[key] == b[key], "{key}: straight {} resumed {}", a[key], b[key]);
    }
    let files = event_files(&resumed);
    assert_eq!(files.len(), 2, "one event file per process: {files:?}");
    let second: Vec<Event> = records(&files[1]).iter().map(|r| decode(r)).collect();
    assert!(second[1].session_start && second[1].step == 5, "the resumed file opens with a session start at step 5");
    assert_eq!(scalar(&second, "train/loss").iter().map(|(s, _)| *s).collect::<Vec<_>>(), [5, 6]);
}

/// A training process that is killed if the test fails before it ends it.
struct Trainer(Option<std::process::Child>);

impl Drop for Trainer {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// While training runs, the event file grows record by record and loss.png is drawn at the
/// first eval, or at the first checkpoint; Ctrl-C then leaves a checkpoint and its LoRA.
#[test]
fn logs_are_live_and_ctrl_c_writes_a_lora() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let held_out = dir.path().join("held-out");
    tiny_dataset(&data, 2, 1);
    tiny_dataset(&held_out, 1, 2);
    let art = tiny_artifacts();
    let at_eval = ["--eval-data", path_str(&held_out), "--eval-every", "5", "--save-every", "1000"];
    for (name, extra) in [("at-eval", &at_eval[..]), ("at-checkpoint", &["--save-every", "4"][..])] {
        let out = dir.path().join(name);
        let mut trainer = Trainer(Some(std::process::Command::new(env!("CARGO_BIN_EXE_flowstep"))
            .args(["-q", "train", "--artifacts", path_str(&art), "--data", path_str(&data), "--out", path_str(&out), "--steps", "1000000"])
            .args(extra)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"))));
        let child = trainer.0.as_mut().unwrap_or_else(|| panic!("spawned above"));
        let deadline = Instant::now() + Duration::from_secs(60);
        let live_losses = || event_files(&out).first().map_or(0, |f| records(f).iter().filter(|r| !decode(r).scalars.is_empty()).count());
        while (live_losses() < 3 * 8 || !out.join("loss.png").is_file()) && Instant::now() < deadline {
            assert!(child.try_wait().ok().flatten().is_none(), "training ended early");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(out.join("loss.png").is_file(), "{name}: no loss.png while training");
        assert!(live_losses() >= 24, "{name}: the event file does not grow during training");
        let status = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()));
        let result = trainer.0.take().unwrap_or_else(|| panic!("spawned above")).wait_with_output().unwrap_or_else(|e| panic!("{e}"));
        let err = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(130), "{err}");
        let (step, ckpt) = flowstep::checkpoint::list(&out).unwrap_or_default().pop().unwrap_or_else(|| panic!("no checkpoint after Ctrl-C"));
        let lora = out.join(format!("loras/{name}-step-{step:06}.safetensors"));
        assert!(err.contains(path_str(&lora)), "the summary names the interrupted run's LoRA:\n{err}");
        assert_eq!(lora_params(&lora), bf16(&checkpoint_params(&ckpt)));
        assert_eq!(metadata(&lora).get("ss_steps"), Some(&step.to_string()));
    }
}
