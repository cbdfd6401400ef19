//! An artifacts directory: the manifest, its files and their checks (docs/DESIGN.md §3).

mod external_data;
mod files;
mod manifest;
mod validate;

pub use manifest::{
    BaseWeights, ConditioningInput, Dim, ExpertInfo, ExpertRole, FIRST_FRAME_LATENTS, FORMAT_VERSION, GraphSignature, IoSpec, LoraInfo, Y,
    LoraTensor, Manifest, ModelInfo, NamedShape,
};
pub use external_data::check_listed as check_external_data;
pub use files::{kind_of, resolve_inside, sha256_file};
pub use validate::{check_session_io, pair_mismatch};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const TRAINING: &str = "training_model";
pub const EVAL: &str = "eval_model";
pub const OPTIMIZER: &str = "optimizer_model";
pub const INFERENCE: &str = "inference_model";
/// The export's initial LoRA (B = 0), used when no LoRA file is given.
pub const LORA_INIT: &str = "lora_init.safetensors";
/// A manifest is a few hundred kB even for 40 blocks; anything far larger is not one.
const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// The graphs' LoRA scale alpha/rank (`[]`, after the flat LoRA vectors): alpha is chosen
/// per run (`train --lora-alpha`, a LoRA file's own), the manifest's `lora.alpha` is the default.
pub const LORA_SCALE: &str = "lora_scale";
/// The batch inputs that follow the base weights in the training and eval graphs.
pub const LOSS_INPUTS: [&str; 5] = ["x_t", "timestep", "context", "target", "weight"];
pub const OPTIMIZER_INPUTS: [&str; 12] = [
    "params", "grads", "m", "v", "lr", "beta1", "beta2", "eps", "weight_decay",
    "bias_correction1", "bias_correction2", "grad_scale",
];
/// `params_nonfinite` counts the NaN/±Inf entries of `params_out` (float32 scalar); the
/// trainer keeps an update only when it is 0 (docs/DESIGN.md §3.5).
pub const OPTIMIZER_OUTPUTS: [&str; 5] = ["params_out", "m_out", "v_out", "grad_norm", "params_nonfinite"];

/// A validated artifacts directory.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Every file in `files`, resolved inside `dir` and hash-checked.
    files: BTreeMap<String, PathBuf>,
}

impl Artifacts {
    /// Reads and validates `DIR/manifest.json` and the files it lists (sha256 included).
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        match std::fs::metadata(dir) {
            Ok(meta) if !meta.is_dir() => {
                return Err(Error::Manifest { path: dir.to_path_buf(), reason: format!("is {}, expected the artifacts directory", kind_of(&meta)) });
            }
            Ok(_) => {}
            Err(_) => return Err(Error::Manifest { path: dir.to_path_buf(), reason: "artifacts directory does not exist".into() }),
        }
        let text = crate::small_file::read_text(&path, "artifacts manifest", MAX_MANIFEST_BYTES)?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::Manifest { path: path.clone(), reason: format!("not a valid manifest: {e}") })?;
        let mut artifacts = Self { dir: dir.to_path_buf(), manifest, files: BTreeMap::new() };
        validate::check_manifest(&artifacts)?;
        artifacts.files = files::check_files(&artifacts)?;
        for graph in artifacts.manifest.graphs.values() {
            external_data::check_listed(&artifacts.file(&graph.file)?, &graph.file, &path, &artifacts.manifest.files)?;
        }
        validate::check_sizes(&artifacts)?;
        Ok(artifacts)
    }

    /// A file the manifest lists, resolved and hash-checked at open.
    pub(crate) fn file(&self, name: &str) -> Result<PathBuf> {
        self.files.get(name).cloned().ok_or_else(|| Error::Manifest {
            path: self.dir.join("manifest.json"),
            reason: format!("`{name}` has no sha256 in `files`"),
        })
    }

    pub fn graph(&self, name: &str) -> Result<&GraphSignature> {
        self.manifest.graphs.get(name).ok_or_else(|| Error::Manifest {
            path: self.dir.join("manifest.json"),
            reason: format!("no `{name}` graph in this export"),
        })
    }

    pub fn graph_path(&self, name: &str) -> Result<PathBuf> {
        self.file(&self.graph(name)?.file)
    }

    pub fn num_params(&self) -> usize {
        self.manifest.lora.num_params
    }

    /// `path`, or the export's initial LoRA (B = 0: the base model) when none is given.
    pub fn lora_file(&self, path: Option<&Path>) -> Result<PathBuf> {
        path.map_or_else(|| self.file(LORA_INIT), |p| Ok(p.to_path_buf()))
    }

    /// The shipped base weights file, if the export carries one (hash-checked at open).
    pub fn shipped_base(&self) -> Option<PathBuf> {
        self.manifest.base_weights.file.as_ref().and_then(|f| self.files.get(f).cloned())
    }
}
