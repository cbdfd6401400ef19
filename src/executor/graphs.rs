//! The eval graph (loss only) and the inference graph (velocity), sharing the base weights.

use ort::session::{IoBinding, Session};
use ort::value::Tensor;

use super::{BaseWeights, Batch, bind_lora_scale, host_tensor};
use crate::artifacts::{Artifacts, EVAL, INFERENCE, check_session_io};
use crate::error::{Error, Result};
use crate::runtime::{SessionOptions, load_session};

fn bind_base(binding: &mut IoBinding, base: &BaseWeights) -> Result<()> {
    for (name, tensor) in &base.tensors {
        tensor.bind(binding, name)?;
    }
    Ok(())
}

/// `eval_model`: the weighted SFT loss for given LoRA parameters and batch.
pub struct LossGraph {
    session: Session,
    binding: IoBinding,
    loss_out: Tensor<f32>,
}

impl LossGraph {
    /// `lora_scale`: alpha/rank of the LoRA parameters this graph will run with.
    pub fn load(artifacts: &Artifacts, options: &SessionOptions, base: &BaseWeights, lora_scale: f32) -> Result<Self> {
        let session = load_session(&artifacts.graph_path(EVAL)?, &options.for_artifacts(&artifacts.manifest)?)?;
        check_session_io(artifacts, EVAL, &session)?;
        let mut binding = session.create_binding().map_err(Error::ort("creating the eval binding"))?;
        bind_base(&mut binding, base)?;
        bind_lora_scale(&mut binding, lora_scale)?;
        Ok(Self { session, binding, loss_out: host_tensor(&[])? })
    }

    pub fn loss(&mut self, params: &Tensor<f32>, batch: &Batch) -> Result<f32> {
        let Self { session, binding, loss_out } = self;
        binding.bind_input("lora_params", params).map_err(Error::ort("binding lora_params"))?;
        batch.bind(binding, true)?;
        binding.bind_output("loss", &mut *loss_out).map_err(Error::ort("binding loss"))?;
        session.run_binding(binding).map_err(Error::ort("running the eval graph"))?;
        Ok(loss_out.extract_tensor().1[0])
    }
}

/// `inference_model`: the predicted velocity.
pub struct VelocityGraph {
    session: Session,
    binding: IoBinding,
    out: Option<Tensor<f32>>,
}

impl VelocityGraph {
    /// `lora_scale`: alpha/rank of the LoRA parameters this graph will run with.
    pub fn load(artifacts: &Artifacts, options: &SessionOptions, base: &BaseWeights, lora_scale: f32) -> Result<Self> {
        let session = load_session(&artifacts.graph_path(INFERENCE)?, &options.for_artifacts(&artifacts.manifest)?)?;
        check_session_io(artifacts, INFERENCE, &session)?;
        let mut binding = session.create_binding().map_err(Error::ort("creating the inference binding"))?;
        bind_base(&mut binding, base)?;
        bind_lora_scale(&mut binding, lora_scale)?;
        Ok(Self { session, binding, out: None })
    }

    /// The velocity for `batch.x_t` (shape [1, out_dim, F, H, W]) into `velocity`.
    pub fn velocity(&mut self, params: &Tensor<f32>, batch: &Batch, out_dim: usize, velocity: &mut Vec<f32>) -> Result<()> {
        let mut shape: Vec<usize> = batch.x_t.shape().iter().map(|&d| d as usize).collect();
        shape[1] = out_dim;
        let reuse = self.out.as_ref().is_some_and(|t| t.shape().iter().map(|&d| d as usize).eq(shape.iter().copied()));
        if !reuse {
            self.out = Some(host_tensor(&shape)?);
        }
        let Self { session, binding, out } = self;
        let Some(out) = out.as_mut() else { return Err(Error::Config("no output buffer".into())) };
        binding.bind_input("lora_params", params).map_err(Error::ort("binding lora_params"))?;
        batch.bind(binding, false)?;
        binding.bind_output("velocity", &mut *out).map_err(Error::ort("binding velocity"))?;
        session.run_binding(binding).map_err(Error::ort("running the inference graph"))?;
        velocity.clear();
        velocity.extend_from_slice(out.extract_tensor().1);
        Ok(())
    }
}
