//! Training: the run's configuration and summary, and `train`, which drives a [`Trainer`]
//! through its phases. Everything a run reports goes out as events.

mod lora_meta;
mod models;
mod run;
mod samples;
mod trainer;
mod validate;

pub use samples::SamplingConfig;
pub use trainer::Trainer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use crate::data::Bucket;
use crate::distributed::Ranks;
use crate::error::Result;
use crate::eval::EvalConfig;
use crate::executor::AdamW;
use crate::lora_io::LoraFormat;
use crate::metrics::Observer;
use crate::optim::LrSchedule;
use crate::runtime::SessionOptions;
use crate::sft::SftConfig;
use crate::tensor_file::SaveDtype;

/// What to do when a loss or gradient norm is NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
pub enum NonFinitePolicy {
    /// Stop with an error; the last checkpoint stays as it was.
    Stop,
    /// Discard that step's update, count it, and go on.
    Skip,
}

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Length {
    Steps(u64),
    Epochs(u64),
}

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub artifacts: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub base: Option<PathBuf>,
    pub init_lora: Option<PathBuf>,
    pub length: Length,
    pub seed: u64,
    pub lr: f64,
    pub schedule: LrSchedule,
    pub adamw: AdamW,
    /// `--max-grad-norm`: clip the averaged gradient to this total L2 norm (torch's
    /// clip_grad_norm_); None does not clip.
    pub max_grad_norm: Option<f64>,
    /// `--lora-alpha`: the LoRA scale is alpha/rank; None trains with the export's alpha.
    pub lora_alpha: Option<f64>,
    pub grad_accum: usize,
    pub repeat: usize,
    pub sft: SftConfig,
    pub save_every: Option<u64>,
    pub keep_checkpoints: usize,
    pub resume: bool,
    /// Let a resume change the learning rate, its schedule or AdamW settings (recorded).
    pub allow_changed_hyperparameters: bool,
    pub eval_data: Option<PathBuf>,
    pub eval_every: Option<u64>,
    pub eval: EvalConfig,
    pub session: SessionOptions,
    pub lora_format: LoraFormat,
    pub lora_dtype: SaveDtype,
    /// `--output-name`: names the LoRAs of `OUT/loras/` (default: OUT's directory name).
    pub output_name: Option<String>,
    pub on_nonfinite: NonFinitePolicy,
    pub skip_bad_samples: bool,
    /// `--sample-every`: samples during training.
    pub sampling: Option<SamplingConfig>,
    /// Stop after this many optimizer steps of this process (tests of resume).
    pub stop_after: Option<u64>,
    /// The run's flags as a file name in `out` and its text (`flowstep train`'s
    /// config.toml), written once the run may start or resume.
    pub run_config: Option<(String, String)>,
    /// `--expert-artifacts`: the other expert of a Wan2.2 A14B pair, trained in the same job
    /// beside the expert of `artifacts`.
    pub pair: Option<PairConfig>,
}

/// The second expert of a pair job and how the job divides micro-steps between the two.
#[derive(Debug, Clone)]
pub struct PairConfig {
    pub artifacts: PathBuf,
    /// `--expert-base`, `--expert-init-lora`: as `base` and `init_lora` for this expert.
    pub base: Option<PathBuf>,
    pub init_lora: Option<PathBuf>,
    /// `--switch-expert-every N` (ai-toolkit's `switch_boundary_every`): N micro-steps of the
    /// high-noise expert, then N of the low-noise one, and so on, each drawing timesteps in its
    /// own range. None: each micro-step's timestep, drawn over the whole table, picks the
    /// expert whose range holds it.
    pub switch_every: Option<u64>,
}

/// What a finished (or interrupted) run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub start_step: u64,
    pub steps: u64,
    pub total_steps: u64,
    pub interrupted: bool,
    pub first_loss: Option<f64>,
    pub final_loss: Option<f64>,
    pub eval_before: Option<f64>,
    pub eval_after: Option<f64>,
    pub skipped_steps: u64,
    pub skipped_samples: u64,
    /// Data-parallel ranks that trained this part of the run.
    pub world_size: usize,
    /// Hyperparameters this resume changed (`--allow-changed-hyperparameters`).
    pub hyperparameter_changes: Vec<String>,
    pub seconds: f64,
    pub seconds_per_step: f64,
    /// Host-side share of step time: data, SFT inputs, binding, reading the loss.
    pub host_fraction: f64,
    /// Peak live memory of the graphs' working tensors in ONNX Runtime's arenas (device
    /// memory on a GPU), not what the arenas reserved.
    pub graph_peak_bytes: Option<u64>,
    /// The training data's latent shapes and how many samples each.
    pub buckets: Vec<Bucket>,
    /// Sample directories written by this process (`--sample-every`), and the time they took
    /// (not counted in the step times).
    pub samples: Vec<PathBuf>,
    pub sample_seconds: f64,
    pub lora: Option<PathBuf>,
    pub checkpoint: Option<PathBuf>,
    /// The LoRA written with the newest checkpoint (`OUT/loras/`).
    pub checkpoint_lora: Option<PathBuf>,
    pub metrics: PathBuf,
    pub plot: Option<PathBuf>,
    /// A pair job: each expert's share of the whole run (high noise first).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub experts: Vec<ExpertSummary>,
}

/// One expert of a pair job over the whole run (a resumed run included).
#[derive(Debug, Clone, Serialize)]
pub struct ExpertSummary {
    pub role: String,
    /// Micro-steps (samples) and optimizer steps that trained this expert.
    pub micro_steps: u64,
    pub steps: u64,
    pub first_loss: Option<f64>,
    /// Mean of its last 10 steps' losses.
    pub final_loss: Option<f64>,
    pub lora: Option<PathBuf>,
    pub checkpoint_lora: Option<PathBuf>,
}

/// Runs (or resumes) training to the end, an interrupt, or `stop_after` steps.
/// The final LoRA's file name in `--out`: `lora.safetensors`, or for one expert of a Wan2.2
/// A14B pair `lora_high_noise.safetensors` / `lora_low_noise.safetensors`, the names ComfyUI
/// users give the two LoRAs of a pair (they load into the high- and low-noise model).
pub fn lora_file_name(manifest: &crate::artifacts::Manifest) -> String {
    match &manifest.expert {
        Some(e) => format!("lora_{}.safetensors", e.role.as_str()),
        None => "lora.safetensors".into(),
    }
}

pub fn train(config: &TrainConfig, ranks: &mut Ranks, observers: &mut [&mut dyn Observer], interrupt: &AtomicBool) -> Result<TrainSummary> {
    let mut trainer = Trainer::start(config, ranks, observers)?;
    let mut interrupted = false;
    while !trainer.done() {
        // Every rank stops at the same step, whichever of them was interrupted.
        if trainer.any_rank(interrupt.load(Ordering::SeqCst))? {
            interrupted = true;
            break;
        }
        if config.stop_after.is_some_and(|n| trainer.steps_this_run() >= n) {
            break;
        }
        if let Err(e) = trainer.step() {
            trainer.rescue();
            return Err(e);
        }
    }
    trainer.finish(interrupted)
}
