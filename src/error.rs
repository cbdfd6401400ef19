//! The library's error type: every variant names the file, tensor or step it is about.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),

    /// A command-line option with a value that cannot work, refused before any work starts.
    #[error("{flag}: {reason}")]
    Flag { flag: &'static str, reason: String },

    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("ONNX Runtime library: {reason} (install it with scripts/setup_ort.sh, or scripts/setup_ort.sh --gpu for CUDA/TensorRT, or pass --ort-lib PATH)")]
    OrtLibrary { reason: String },

    #[error("ONNX Runtime failed while {during}: {source}")]
    Ort { during: String, source: ort::Error },

    #[error("{}: {reason}", path.display())]
    Manifest { path: PathBuf, reason: String },

    #[error("{}: {reason}", path.display())]
    Tensor { path: PathBuf, reason: String },

    #[error("tensor `{name}`: expected shape {expected:?}, got {got:?}")]
    Shape { name: String, expected: Vec<usize>, got: Vec<usize> },

    #[error("{}: {reason}", path.display())]
    Data { path: PathBuf, reason: String },

    #[error("{}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },

    #[error("{}: tensor `{tensor}` has a non-finite value ({value}) at flat index {index}", path.display())]
    NonFiniteSample { path: PathBuf, tensor: String, index: usize, value: f32 },

    /// A failure while one sample ran through a graph.
    #[error("step {step}, sample {}: {source}", sample.display())]
    AtSample { step: u64, sample: PathBuf, source: Box<Error> },

    /// A failure while one sample ran through a graph outside training (evaluation).
    #[error("sample {}: {source}", sample.display())]
    InSample { sample: PathBuf, source: Box<Error> },

    /// A training loss that came out NaN/Inf, with the sample that gave it.
    #[error("step {step}, sample {}: the loss is not finite ({value})", sample.display())]
    NonFiniteLoss { step: u64, sample: PathBuf, value: f32 },

    #[error("step {step}: {what} is not finite ({value})")]
    NonFinite { step: u64, what: &'static str, value: f64 },

    #[error("{0}")]
    Device(String),

    /// Launching, joining or summing across data-parallel ranks.
    #[error("{0}")]
    Distributed(String),

    #[error("interrupted")]
    Interrupted,
}

impl Error {
    /// A failure that every data-parallel rank reaches at the same step from the summed
    /// values (a non-finite loss or update under `--on-nonfinite stop`), so that each rank
    /// can stop by itself; any other failure is one rank's alone.
    pub fn is_shared_by_ranks(&self) -> bool {
        match self {
            Error::NonFiniteLoss { .. } => true,
            Error::NonFinite { what, .. } => *what != "parameter",
            _ => false,
        }
    }

    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }

    pub fn flag(flag: &'static str, reason: impl Into<String>) -> Self {
        Error::Flag { flag, reason: reason.into() }
    }

    pub fn ort(during: impl Into<String>) -> impl FnOnce(ort::Error) -> Self {
        let during = during.into();
        move |source| Error::Ort { during, source }
    }
}

/// Attach a path to I/O errors: `fs::read(&p).at(&p)?`.
pub trait IoContext<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
