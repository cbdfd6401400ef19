//! One step's batch inputs on the host, bound by name.

use ort::session::IoBinding;
use ort::value::Tensor;

use super::host_tensor;
use crate::error::{Error, Result};

/// x_t, timestep, context, target and weight for one graph call (batch size 1), and the
/// model's conditioning inputs (`y`, `clip_feature`, `first_frame_latents`) by name.
pub struct Batch {
    pub x_t: Tensor<f32>,
    pub timestep: Tensor<f32>,
    pub context: Tensor<f32>,
    pub target: Tensor<f32>,
    pub weight: Tensor<f32>,
    pub conditioning: Vec<(String, Tensor<f32>)>,
}

impl Batch {
    /// Host buffers for latents of shape `[C, F, H, W]` and a `[L, D]` context.
    pub fn new(latent: &[usize], context: &[usize]) -> Result<Self> {
        let with_batch = |s: &[usize]| std::iter::once(1).chain(s.iter().copied()).collect::<Vec<_>>();
        Ok(Self {
            x_t: host_tensor(&with_batch(latent))?,
            timestep: host_tensor(&[1])?,
            context: host_tensor(&with_batch(context))?,
            target: host_tensor(&with_batch(latent))?,
            weight: host_tensor(&[])?,
            conditioning: Vec::new(),
        })
    }

    /// Sets the conditioning inputs (per-sample shapes, a batch axis is added), reusing the
    /// buffers when names and shapes are unchanged.
    pub fn set_conditioning(&mut self, items: &[crate::data::Conditioning]) -> Result<()> {
        let same = self.conditioning.len() == items.len()
            && self.conditioning.iter().zip(items).all(|((name, t), c)| {
                *name == c.name && t.shape().iter().skip(1).map(|&d| d as usize).eq(c.shape.iter().copied())
            });
        if !same {
            self.conditioning = items
                .iter()
                .map(|c| Ok((c.name.clone(), host_tensor(&std::iter::once(1).chain(c.shape.iter().copied()).collect::<Vec<_>>())?)))
                .collect::<Result<_>>()?;
        }
        for ((_, t), c) in self.conditioning.iter_mut().zip(items) {
            t.extract_tensor_mut().1.copy_from_slice(&c.values);
        }
        Ok(())
    }

    pub fn latent_shape(&self) -> Vec<usize> {
        self.x_t.shape().iter().skip(1).map(|&d| d as usize).collect()
    }

    pub fn context_shape(&self) -> Vec<usize> {
        self.context.shape().iter().skip(1).map(|&d| d as usize).collect()
    }

    /// Lets `fill(x_t, target)` write both latent buffers in place.
    pub fn prepare<R>(&mut self, fill: impl FnOnce(&mut [f32], &mut [f32]) -> Result<R>) -> Result<R> {
        let Self { x_t, target, .. } = self;
        fill(x_t.extract_tensor_mut().1, target.extract_tensor_mut().1)
    }

    pub fn set_scalars(&mut self, timestep: f32, weight: f32) {
        self.timestep.extract_tensor_mut().1[0] = timestep;
        self.weight.extract_tensor_mut().1[0] = weight;
    }

    pub fn bind(&self, binding: &mut IoBinding, with_target: bool) -> Result<()> {
        let fail = Error::ort("binding the batch inputs");
        let r = (|| {
            binding.bind_input("x_t", &self.x_t)?;
            binding.bind_input("timestep", &self.timestep)?;
            binding.bind_input("context", &self.context)?;
            if with_target {
                binding.bind_input("target", &self.target)?;
                binding.bind_input("weight", &self.weight)?;
            }
            for (name, tensor) in &self.conditioning {
                binding.bind_input(name, tensor)?;
            }
            Ok::<(), ort::Error>(())
        })();
        r.map_err(fail)
    }
}
