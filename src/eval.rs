//! Deterministic validation loss: every sample at a fixed set of timesteps with fixed noise,
//! so the same LoRA gives the same number on every run.

use ort::value::Tensor;

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::executor::{Batch, LossGraph};
use crate::sft::SftSampler;

/// Evaluation settings.
#[derive(Debug, Clone, Copy)]
pub struct EvalConfig {
    /// Timesteps per sample, evenly spaced over the table.
    pub timesteps: usize,
    /// Noise seed (independent of the training seed).
    pub seed: u64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { timesteps: 8, seed: 0 }
    }
}

/// The result of one evaluation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EvalResult {
    /// Mean of w(t)·MSE over samples × timesteps (the training objective).
    pub eval_loss: f64,
    pub samples: usize,
    pub timesteps: usize,
    /// Mean loss per timestep index (low to high noise order of the table).
    pub per_timestep: Vec<(f32, f64)>,
}

/// The table indices evaluated: `lo + ⌊(j + ½)·(hi - lo)/K⌋` over the sampler's index range
/// `[lo, hi)`, so a Wan2.2 expert is evaluated on the timesteps it trains.
pub fn eval_indices((lo, hi): (usize, usize), k: usize) -> Vec<usize> {
    (0..k).map(|j| lo + ((j as f64 + 0.5) * (hi - lo) as f64 / k as f64) as usize).collect()
}

pub fn evaluate(graph: &mut LossGraph, params: &Tensor<f32>, dataset: &Dataset, sampler: &SftSampler, config: &EvalConfig) -> Result<EvalResult> {
    if config.timesteps == 0 {
        return Err(Error::Config("evaluation needs at least one timestep".into()));
    }
    let eval_sampler = sampler.with_seed(config.seed);
    let indices = eval_indices(eval_sampler.index_range(), config.timesteps);
    let mut per_t = vec![0.0f64; indices.len()];
    let mut batch: Option<Batch> = None;
    for i in 0..dataset.len() {
        let sample = dataset.load(i)?;
        let reuse = batch.as_ref().is_some_and(|b| b.latent_shape() == sample.latent_shape && b.context_shape() == sample.context_shape);
        if !reuse {
            batch = Some(Batch::new(&sample.latent_shape, &sample.context_shape)?);
        }
        let Some(b) = batch.as_mut() else { continue };
        b.context.extract_tensor_mut().1.copy_from_slice(&sample.context);
        b.set_conditioning(&sample.conditioning)?;
        for (j, &index) in indices.iter().enumerate() {
            let key = (i * indices.len() + j) as u64;
            let draw = b.prepare(|x_t, target| eval_sampler.prepare_at(key, index, &sample.latents, x_t, target))?;
            b.set_scalars(draw.timestep, draw.weight);
            let in_sample = |e| Error::InSample { sample: sample.path.clone(), source: Box::new(e) };
            let loss = graph.loss(params, b).map_err(in_sample)?;
            if !loss.is_finite() {
                let reason = format!("the eval loss at timestep {} is not finite ({loss}): the LoRA or the base weights give NaN/Inf", draw.timestep);
                return Err(in_sample(Error::Config(reason)));
            }
            per_t[j] += loss as f64;
        }
    }
    let n = dataset.len() as f64;
    let per_timestep: Vec<(f32, f64)> =
        indices.iter().zip(&per_t).map(|(&idx, &sum)| (eval_sampler.scheduler.timesteps[idx], sum / n)).collect();
    let eval_loss = per_timestep.iter().map(|(_, l)| l).sum::<f64>() / per_timestep.len() as f64;
    Ok(EvalResult { eval_loss, samples: dataset.len(), timesteps: indices.len(), per_timestep })
}
