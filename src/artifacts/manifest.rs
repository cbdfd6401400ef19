//! `manifest.json` as serde types (format version 1, docs/DESIGN.md §3).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub model: ModelInfo,
    pub lora: LoraInfo,
    pub scheduler: SchedulerInfo,
    pub base_weights: BaseWeights,
    pub graphs: BTreeMap<String, GraphSignature>,
    pub files: BTreeMap<String, String>,
    #[serde(default)]
    pub exporter: serde_json::Value,
    /// How the graphs compute (absent in exports before it existed: float32, no recompute).
    #[serde(default)]
    pub training: TrainingInfo,
    /// Which expert of a Wan2.2 A14B pair this export is; absent for a single model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert: Option<ExpertInfo>,
}

/// One expert of a Wan2.2 A14B pair: its timestep range in DiffSynth's units (fractions of
/// the training table, indices `[⌊min·N⌋, ⌊max·N⌋)`) and where sampling switches experts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExpertInfo {
    pub role: ExpertRole,
    pub min_timestep_boundary: f64,
    pub max_timestep_boundary: f64,
    /// Sampling uses the high-noise expert while `t ≥ switch_timestep` (DiffSynth's
    /// `switch_DiT_boundary · 1000`).
    pub switch_timestep: f32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExpertRole {
    HighNoise,
    LowNoise,
}

impl ExpertRole {
    /// The name ComfyUI users know the experts by (Wan2.2's `high_noise_model` / `low_noise_model`).
    pub fn as_str(self) -> &'static str {
        match self {
            ExpertRole::HighNoise => "high_noise",
            ExpertRole::LowNoise => "low_noise",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingInfo {
    /// Base weights' and activations' dtype; LoRA state, gradients and the loss are float32.
    #[serde(default = "float32")]
    pub precision: String,
    /// `{"impl": "chunked", "chunk": N}` (standard ops) or `{"impl": "fused", "domain",
    /// "operators"}` (flowstep's own kernels): read by `runtime::AttentionImpl::from_manifest`.
    #[serde(default)]
    pub attention: serde_json::Value,
    /// Every `com.flowstep` operator the graphs use (absent before fused GELU: attention's only);
    /// checked by `runtime::SessionOptions::for_artifacts`.
    #[serde(default)]
    pub operators: Vec<String>,
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// ONNX Runtime graph optimizers that would undo the graph's recomputation.
    #[serde(default)]
    pub onnxruntime_disabled_optimizers: Vec<String>,
}

impl Default for TrainingInfo {
    fn default() -> Self {
        Self { precision: float32(), attention: serde_json::Value::Null, operators: Vec::new(), gradient_checkpointing: false, onnxruntime_disabled_optimizers: Vec::new() }
    }
}

fn float32() -> String {
    "float32".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub variant: String,
    pub dim: usize,
    pub ffn_dim: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub in_dim: usize,
    pub out_dim: usize,
    pub text_dim: usize,
    pub text_len: usize,
    pub freq_dim: usize,
    pub patch_size: [usize; 3],
    pub eps: f64,
    /// Inputs after x_t/timestep/context in every graph, per sample (no batch axis), under
    /// DiffSynth's cache names: `y`, `clip_feature` (i2v), `first_frame_latents` (ti2v).
    /// Absent: text-to-video.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditioning: Vec<ConditioningInput>,
}

impl ModelInfo {
    /// Channels of the latents the model denoises (the VAE's: 16, or 48 for Wan2.2 TI2V);
    /// `in_dim` also counts i2v's `y` channels.
    pub fn latent_channels(&self) -> usize {
        self.out_dim
    }

    /// Pixels per latent in frames, height and width: Wan2.1's VAE (16 channels) 4, 8, 8;
    /// Wan2.2's 48-channel VAE 4, 16, 16. Frames map as 1 + stride·(F − 1).
    pub fn vae_stride(&self) -> [usize; 3] {
        if self.latent_channels() == 48 { [4, 16, 16] } else { [4, 8, 8] }
    }

    /// The conditioning input named `name`, if this model takes it.
    pub fn conditioning_input(&self, name: &str) -> Option<&ConditioningInput> {
        self.conditioning.iter().find(|c| c.name == name)
    }
}

/// A conditioning tensor a sample must carry: its name and shape, with `frames`, `height`
/// and `width` standing for the sample's latent sizes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConditioningInput {
    pub name: String,
    pub shape: Vec<Dim>,
}

/// The first-frame conditioning of Wan2.2 TI2V: latent frame 0 is this image's latents.
pub const FIRST_FRAME_LATENTS: &str = "first_frame_latents";

/// The image conditioning of Wan I2V: a mask stacked on the image's latents (then zeros).
pub const Y: &str = "y";

impl ConditioningInput {
    /// The concrete shape for latents `[C, F, H, W]`, or None for an unknown dimension name.
    pub fn resolve(&self, latent: &[usize]) -> Option<Vec<usize>> {
        self.shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => usize::try_from(*n).ok(),
                Dim::Named(s) => match s.as_str() {
                    "frames" => latent.get(1).copied(),
                    "height" => latent.get(2).copied(),
                    "width" => latent.get(3).copied(),
                    _ => None,
                },
            })
            .collect()
    }

    /// The shape as the manifest writes it, for error messages.
    pub fn describe(&self) -> String {
        format!("[{}]", self.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraInfo {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    pub num_params: usize,
    pub tensors: Vec<LoraTensor>,
}

impl LoraInfo {
    /// The graphs' `lora_scale` input: alpha / rank (ΔW = (α/r)·B·A, docs/DESIGN.md §3.4).
    pub fn scale(&self) -> f32 {
        (self.alpha / self.rank as f64) as f32
    }

    /// This layout with another alpha: a run's `--lora-alpha`, or a LoRA file's own.
    pub fn with_alpha(&self, alpha: f64) -> Self {
        Self { alpha, ..self.clone() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoraTensor {
    pub key: String,
    pub shape: Vec<usize>,
    pub offset: usize,
}

impl LoraTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchedulerInfo {
    pub template: String,
    pub num_train_timesteps: usize,
    pub shift: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseWeights {
    pub file: Option<String>,
    pub tensors: Vec<NamedShape>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NamedShape {
    pub name: String,
    pub shape: Vec<usize>,
    #[serde(default = "float32")]
    pub dtype: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GraphSignature {
    pub file: String,
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IoSpec {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<Dim>,
}

/// A graph dimension: fixed, or dynamic with a name (`"frames"`) or `-1`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Dim {
    Fixed(i64),
    Named(String),
}

impl Dim {
    pub fn fixed(&self) -> Option<usize> {
        match self {
            Dim::Fixed(n) if *n >= 0 => Some(*n as usize),
            _ => None,
        }
    }
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Named(s) => write!(f, "{s}"),
        }
    }
}
