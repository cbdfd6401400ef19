//! An artifacts directory: the manifest, its files and their checks (DESIGN.md §3).

mod manifest;
mod validate;

pub use manifest::{BaseWeights, Dim, FORMAT_VERSION, GraphSignature, IoSpec, LoraInfo, LoraTensor, Manifest, ModelInfo, NamedShape};
pub use validate::check_session_io;

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

pub const TRAINING: &str = "training_model";
pub const EVAL: &str = "eval_model";
pub const OPTIMIZER: &str = "optimizer_model";
pub const INFERENCE: &str = "inference_model";

/// The batch inputs that follow the base weights in the training and eval graphs.
pub const LOSS_INPUTS: [&str; 5] = ["x_t", "timestep", "context", "target", "weight"];
pub const OPTIMIZER_INPUTS: [&str; 12] = [
    "params", "grads", "m", "v", "lr", "beta1", "beta2", "eps", "weight_decay",
    "bias_correction1", "bias_correction2", "grad_scale",
];
pub const OPTIMIZER_OUTPUTS: [&str; 4] = ["params_out", "m_out", "v_out", "grad_norm"];

/// A validated artifacts directory.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Artifacts {
    /// Reads and validates `DIR/manifest.json` and the files it lists (sha256 included).
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        if !dir.is_dir() {
            return Err(Error::Manifest { path: dir.to_path_buf(), reason: "artifacts directory does not exist".into() });
        }
        let text = std::fs::read_to_string(&path).at(&path)?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::Manifest { path: path.clone(), reason: format!("not a valid manifest: {e}") })?;
        let artifacts = Self { dir: dir.to_path_buf(), manifest };
        validate::check_manifest(&artifacts)?;
        validate::check_files(&artifacts)?;
        Ok(artifacts)
    }

    pub fn graph(&self, name: &str) -> Result<&GraphSignature> {
        self.manifest.graphs.get(name).ok_or_else(|| Error::Manifest {
            path: self.dir.join("manifest.json"),
            reason: format!("no `{name}` graph in this export"),
        })
    }

    pub fn graph_path(&self, name: &str) -> Result<PathBuf> {
        Ok(self.dir.join(&self.graph(name)?.file))
    }

    pub fn num_params(&self) -> usize {
        self.manifest.lora.num_params
    }

    /// `path`, or the export's initial LoRA (B = 0: the base model) when none is given.
    pub fn lora_file(&self, path: Option<&Path>) -> PathBuf {
        path.map_or_else(|| self.dir.join("lora_init.safetensors"), Path::to_path_buf)
    }

    /// The shipped base weights file, if the export carries one.
    pub fn shipped_base(&self) -> Option<PathBuf> {
        self.manifest.base_weights.file.as_ref().map(|f| self.dir.join(f))
    }
}
