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
    if let Err(e) = flowstep::runtime::init(None, false) {
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
