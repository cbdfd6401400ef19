//! Euler sampling through the inference graph with the scheduler's `step`, optionally
//! with classifier-free guidance against a negative (or empty) context.

use std::path::Path;

use ort::value::Tensor;
use rand::Rng;
use rand_distr::StandardNormal;

use crate::decode::{VaeDecoder, VideoFiles, VideoOptions, write_videos};
use crate::error::{Error, IoContext, Result};
use crate::render::Grid;
use crate::tensor_file::{OutTensor, SaveDtype, encode, write_atomic};
use crate::executor::{Batch, VelocityGraph};
use crate::scheduler::FlowMatchScheduler;
use crate::sft::step_rng;

/// Sampling settings.
#[derive(Debug, Clone)]
pub struct SampleConfig {
    pub steps: usize,
    pub shift: f32,
    /// 1.0 disables guidance (one model call per step).
    pub cfg_scale: f32,
    pub seed: u64,
    /// Latent shape [C, F, H, W].
    pub shape: [usize; 4],
}

/// Initial noise for a seed, N(0, 1), independent of thread count.
pub fn initial_noise(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = step_rng(seed, u64::MAX - 1, 0);
    (0..len).map(|_| rng.sample::<f32, _>(StandardNormal)).collect()
}

/// Samples one latent video [C, F, H, W] for `context` ([L, D]).
pub fn sample(graph: &mut VelocityGraph, params: &Tensor<f32>, context: (&[usize], &[f32]), negative: Option<&[f32]>, config: &SampleConfig) -> Result<Vec<f32>> {
    if config.steps == 0 {
        return Err(Error::Config("--steps must be at least 1".into()));
    }
    let scheduler = FlowMatchScheduler::new(config.steps, 1.0, config.shift);
    let len: usize = config.shape.iter().product();
    let mut x = initial_noise(config.seed, len);
    let mut batch = Batch::new(&config.shape, context.0)?;
    let (mut v, mut v_neg) = (Vec::with_capacity(len), Vec::with_capacity(len));
    let guided = config.cfg_scale != 1.0;
    let zeros;
    let negative = match negative {
        Some(n) => n,
        None => {
            zeros = vec![0.0; context.1.len()];
            &zeros
        }
    };
    for &t in &scheduler.timesteps {
        batch.x_t.extract_tensor_mut().1.copy_from_slice(&x);
        batch.set_scalars(t, 1.0);
        batch.context.extract_tensor_mut().1.copy_from_slice(context.1);
        graph.velocity(params, &batch, config.shape[0], &mut v)?;
        if guided {
            batch.context.extract_tensor_mut().1.copy_from_slice(negative);
            graph.velocity(params, &batch, config.shape[0], &mut v_neg)?;
            for (p, n) in v.iter_mut().zip(&v_neg) {
                *p = n + config.cfg_scale * (*p - n);
            }
        }
        scheduler.step(&v, t, &mut x);
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite { step: config.steps as u64, what: "sampled latent", value: x[i] as f64 });
    }
    Ok(x)
}

/// Writes sampled latent videos ([C, F, H, W] each) under `out`: `samples.safetensors`
/// (`latents` [N, C, F, H, W]), `samples.png` and `samples.gif` (latent channels 0-2 as
/// colours, frames left to right) and, with a VAE decoder, the decoded videos
/// ([`write_videos`]). `flowstep sample` and samples during training both write this layout.
pub fn write_outputs(out: &Path, videos: Vec<Vec<f32>>, shape: [usize; 4], decoder: Option<(&mut VaeDecoder, VideoOptions)>) -> Result<Option<VideoFiles>> {
    std::fs::create_dir_all(out).at(out)?;
    let all: Vec<f32> = videos.iter().flatten().copied().collect();
    let tensor = OutTensor { name: "latents".into(), shape: [videos.len()].into_iter().chain(shape).collect(), values: all };
    write_atomic(&out.join("samples.safetensors"), &encode(&[tensor], SaveDtype::F32, None)?)?;
    let decoded = decoder.map(|(decoder, options)| write_videos(decoder, &videos, shape, out, options)).transpose()?;
    let grid = Grid { videos, shape, scale: (128 / shape[3].max(1)).clamp(1, 16) as u32 };
    grid.write_png(&out.join("samples.png"))?;
    grid.write_gif(&out.join("samples.gif"))?;
    Ok(decoded)
}
