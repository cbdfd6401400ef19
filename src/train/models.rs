//! The LoRAs a run trains: one model, or both experts of a Wan2.2 A14B pair, each with its own
//! graphs, LoRA, optimizer state and timestep range; and which of them takes a micro-step.
//!
//! Both experts' sessions and base weights stay resident for the whole job: with the default
//! per-micro-step choice consecutive micro-steps alternate at random, and reloading an expert
//! (28 GB of bf16 weights for A14B) at each switch would cost more than the step.

use std::path::{Path, PathBuf};

use super::lora_meta::RunMetadata;
use crate::artifacts::{Artifacts, ExpertRole, LoraInfo};
use crate::error::{Error, Result};
use crate::executor::{LossGraph, TrainingGraphs};
use crate::sft::{SftSampler, TimestepDraw};

/// The micro-steps one model took in the current optimizer step.
#[derive(Default)]
pub(super) struct Window {
    pub micro_steps: usize,
    pub loss_sum: f64,
    /// The first sample whose loss was NaN/Inf, and that loss.
    pub nonfinite: Option<(PathBuf, f32)>,
    /// Data parallel: another rank met a non-finite loss of this model in the step.
    pub nonfinite_elsewhere: bool,
}

/// One trained LoRA with everything that belongs to it alone.
pub(super) struct TrainedModel {
    pub artifacts: Artifacts,
    /// The export's LoRA layout with the run's alpha (`--lora-alpha`): what the graphs apply
    /// and the checkpoints and LoRA files record.
    pub lora: LoraInfo,
    pub graphs: TrainingGraphs,
    pub eval_graph: Option<LossGraph>,
    /// Draws in this model's own timestep range: its evaluation, and its micro-steps under
    /// `--switch-expert-every`.
    pub sampler: SftSampler,
    pub lora_meta: RunMetadata,
    pub window: Window,
}

impl TrainedModel {
    /// The expert role of a pair's model; None for a single model (an expert trained alone
    /// included: its files are named by its manifest, but its checkpoint holds one model).
    pub fn role(&self, paired: bool) -> Option<ExpertRole> {
        self.artifacts.manifest.expert.as_ref().filter(|_| paired).map(|e| e.role)
    }

    /// The share of the training table this model's range covers (weights a pair's eval loss).
    pub fn table_share(&self) -> f64 {
        let (lo, hi) = self.sampler.index_range();
        (hi - lo) as f64 / self.sampler.config.num_train_timesteps as f64
    }
}

/// How a pair job picks the expert of a micro-step.
#[derive(Debug, Clone, Copy)]
pub(super) enum Choice {
    /// One model: always it.
    Single,
    /// The drawn timestep's table index picks the expert whose range holds it (as DiffSynth
    /// would with both experts loaded).
    ByTimestep,
    /// ai-toolkit's `switch_boundary_every`: micro-steps `[2kN, (2k+1)N)` train the high-noise
    /// expert, the next N the low-noise one, each drawing in its own range.
    Every(u64),
}

impl Choice {
    /// The model (index into the run's models, high noise first) and draw of micro-step
    /// `counter`; `run_sampler` draws over the run's whole range.
    pub fn pick(self, counter: u64, run_sampler: &SftSampler, models: &[TrainedModel]) -> Result<(usize, TimestepDraw)> {
        match self {
            Choice::Single => Ok((0, run_sampler.draw_timestep(counter))),
            Choice::Every(n) => {
                let m = ((counter / n) % models.len() as u64) as usize;
                Ok((m, models[m].sampler.draw_timestep(counter)))
            }
            Choice::ByTimestep => {
                let draw = run_sampler.draw_timestep(counter);
                let holds = |m: &TrainedModel| {
                    let (lo, hi) = m.sampler.index_range();
                    (lo..hi).contains(&draw.index)
                };
                let m = models.iter().position(holds).ok_or_else(|| {
                    Error::Config(format!("timestep {} (table index {}) lies in neither expert's range", draw.timestep, draw.index))
                })?;
                Ok((m, draw))
            }
        }
    }

    /// The sampler whose draw [`Choice::pick`] made for model `m`: it draws the noise too.
    pub fn sampler<'a>(self, m: usize, run_sampler: &'a SftSampler, models: &'a [TrainedModel]) -> &'a SftSampler {
        match self {
            Choice::Every(_) => &models[m].sampler,
            Choice::Single | Choice::ByTimestep => run_sampler,
        }
    }
}

/// `OUT/loras/<name>-step-XXXXXX.safetensors`, or `<name>-<role>-step-XXXXXX.safetensors`
/// for an expert of a pair job.
pub(super) fn step_lora_path(out: &Path, name: &str, role: Option<ExpertRole>, step: u64) -> PathBuf {
    let name = match role {
        Some(r) => format!("{name}-{}", r.as_str()),
        None => name.to_string(),
    };
    out.join("loras").join(format!("{name}-step-{step:06}.safetensors"))
}
