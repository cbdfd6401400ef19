//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use flowstep::tensor_file::TensorFile;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn tiny_artifacts() -> PathBuf {
    repo().join("models/tiny/artifacts")
}

/// Loads ONNX Runtime from the repository's set-up location (scripts/setup_ort.sh).
pub fn init_ort() {
    if let Err(e) = flowstep::runtime::init(None, false, None) {
        panic!("{e}");
    }
}

pub struct Golden(TensorFile);

impl Golden {
    pub fn open(path: &Path) -> Self {
        Golden(TensorFile::open(path).unwrap_or_else(|e| panic!("{e}")))
    }

    pub fn get(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        self.0.read_f32(name).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn values(&self, name: &str) -> Vec<f32> {
        self.get(name).1
    }

    pub fn scalar(&self, name: &str) -> f32 {
        self.values(name)[0]
    }
}

/// max |a - b| / max |b|
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max);
    let scale = b.iter().map(|y| (*y as f64).abs()).fold(0.0, f64::max);
    diff / scale.max(1e-30)
}

use flowstep::tensor_file::{OutTensor, SaveDtype, encode, write_atomic};

pub fn tensor(name: &str, shape: &[usize], values: Vec<f32>) -> OutTensor {
    OutTensor { name: name.into(), shape: shape.to_vec(), values }
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub fn write_sample(path: &Path, tensors: &[OutTensor]) {
    write_atomic(path, &encode(tensors, SaveDtype::F32, None).unwrap_or_else(|e| panic!("{e}"))).unwrap_or_else(|e| panic!("{e}"));
}

/// A dataset for the tiny model: `n` samples of latents [16, 2, 8, 8] with a learnable
/// structure (a per-channel pattern) and a context [16, 64].
pub fn tiny_dataset(dir: &Path, n: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
    for i in 0..n {
        let pattern = values(16, seed * 100 + i as u64);
        let latents: Vec<f32> = (0..16 * 2 * 8 * 8).map(|j| pattern[j / 128] * 1.5).collect();
        let context = values(16 * 64, seed * 100 + 50 + i as u64);
        write_sample(
            &dir.join(format!("sample-{i:03}.safetensors")),
            &[tensor("latents", &[16, 2, 8, 8], latents), tensor("context", &[16, 64], context)],
        );
    }
}

/// Runs the built flowstep binary.
/// A LoRA file's tensors (as float32) and its metadata without the wall-clock times
/// (`ss_training_started_at`/`_finished_at`), which differ between two equal runs.
pub type LoraContents = (std::collections::BTreeMap<String, Vec<f32>>, std::collections::BTreeMap<String, String>);

pub fn lora_contents(path: &Path) -> LoraContents {
    let file = TensorFile::open(path).unwrap_or_else(|e| panic!("{e}"));
    let mut meta = file.metadata().cloned().unwrap_or_default();
    meta.retain(|k, _| !k.starts_with("ss_training_"));
    let tensors = file.names().into_iter().map(|n| (n.clone(), file.read_f32(&n).unwrap_or_else(|e| panic!("{e}")).1)).collect();
    (tensors, meta.into_iter().collect())
}

pub fn flowstep(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_flowstep"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run flowstep: {e}"))
}

pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_else(|| panic!("non-UTF-8 path"))
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"))
}

/// A writable copy of the tiny artifacts.
pub fn copy_artifacts(dest: &Path) -> PathBuf {
    std::fs::create_dir_all(dest).unwrap_or_else(|e| panic!("{e}"));
    for entry in std::fs::read_dir(tiny_artifacts()).unwrap_or_else(|e| panic!("{e}")) {
        let p = entry.unwrap_or_else(|e| panic!("{e}")).path();
        if let Some(name) = p.file_name() {
            std::fs::copy(&p, dest.join(name)).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    dest.to_path_buf()
}

/// Runs `flowstep train` on the tiny artifacts with quiet output.
pub fn train_cmd(artifacts: &Path, data: &Path, out: &Path, steps: u64, extra: &[&str]) -> std::process::Output {
    let steps = steps.to_string();
    let mut args = vec!["-q", "train", "--artifacts", path_str(artifacts), "--data", path_str(data), "--out", path_str(out), "--steps", &steps, "--seed", "5", "--lr", "2e-3"];
    args.extend_from_slice(extra);
    flowstep(&args)
}

/// The last stderr line (the error line after any progress output).
pub fn error_line(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "expected failure; stderr:\n{}", stderr(out));
    let err = stderr(out);
    assert!(!err.contains("panicked"), "{err}");
    let line = err.lines().filter(|l| l.starts_with("error: ")).collect::<Vec<_>>();
    assert_eq!(line.len(), 1, "expected exactly one error line:\n{err}");
    line[0].to_string()
}

/// Rewrites `dir/manifest.json` through `edit` (to build broken or hostile artifacts).
pub fn patch_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
}

pub fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap_or_default()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A 1 MiB tmpfs mounted at `dir/small` for disk-full tests (CI and developers run as
/// root), unmounted on drop.
pub struct SmallDisk(pub PathBuf);

impl SmallDisk {
    pub fn mount(dir: &Path) -> Self {
        let mnt = dir.join("small");
        std::fs::create_dir_all(&mnt).unwrap_or_default();
        let mounted = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs", path_str(&mnt)]).status().is_ok_and(|s| s.success());
        assert!(mounted, "this test needs `mount -t tmpfs` (root)");
        Self(mnt)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

// ── Hostile-input helpers (tests/hostile.rs, tests/hostile_inputs.rs) ─────────────────

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs flowstep, killing it after `secs`: a hostile input must fail, not hang.
pub fn run_limited(args: &[&str], secs: u64) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowstep"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("flowstep {args:?} still running after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap_or_else(|e| panic!("{e}"))
}

pub fn train_limited(art: &Path, data: &Path, out: &Path, steps: u64, extra: &[&str]) -> Output {
    let steps = steps.to_string();
    let mut args = vec!["-q", "train", "--artifacts", path_str(art), "--data", path_str(data), "--out", path_str(out), "--steps", &steps, "--seed", "5", "--lr", "2e-3"];
    args.extend_from_slice(extra);
    run_limited(&args, 60)
}

pub fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().is_ok_and(|s| s.success());
    assert!(ok, "mkfifo {}", path.display());
}

/// Nothing at all in `out` (it does not exist, or is empty).
pub fn assert_untouched(out: &Path) {
    let entries: Vec<PathBuf> = std::fs::read_dir(out).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    assert!(entries.is_empty(), "a failed run left {entries:?}");
}

pub fn assert_error(r: &Output, expect: &[&str]) -> String {
    let line = error_line(r);
    for e in expect {
        assert!(line.contains(e), "`{line}` lacks `{e}`");
    }
    line
}
