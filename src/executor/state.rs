//! The training and optimizer graphs with the trainable state resident on the device.
//!
//! Parameters and AdamW moments live in two buffers each, used alternately (ping-pong):
//! the optimizer reads buffer `cur` and writes `1 - cur`, so nothing model-sized is copied
//! and a rejected update (non-finite gradient or updated parameters) is discarded by not
//! flipping `cur`. The optimizer graph counts the non-finite updated parameters itself
//! (`params_nonfinite`), so deciding costs two host scalars, not a copy of the parameters.
//! Gradients accumulate in the training graph itself (`grad_accum_out = grad_accum + ∂L/∂θ`)
//! across two buffers plus a zero buffer that starts each accumulation window.

use ort::session::{IoBinding, Session};
use ort::value::Tensor;

use super::grad_clip::{GradClip, clip_coefficient};
use super::{Batch, BaseWeights, DeviceMemory, bind_lora_scale, host_tensor};
use crate::artifacts::{Artifacts, OPTIMIZER, TRAINING, check_session_io};
use crate::error::{Error, Result};
use crate::runtime::{SessionOptions, load_session};

/// AdamW hyperparameters (torch.optim.AdamW semantics).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamW {
    /// DiffSynth's defaults: torch betas/eps, weight decay 0.01.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// What one optimizer call did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerOutcome {
    /// L2 norm of the accumulated gradient scaled by 1/micro-steps, before clipping.
    pub grad_norm: f32,
    /// L2 norm of the gradient the update used (after clipping; equal without it).
    pub clipped_grad_norm: f32,
    /// False when the gradient or the updated parameters were not finite and the update
    /// was discarded.
    pub applied: bool,
}

pub struct TrainingGraphs {
    pub memory: DeviceMemory,
    training: Session,
    optimizer: Session,
    train_binding: IoBinding,
    opt_binding: IoBinding,
    num_params: usize,
    params: [Tensor<f32>; 2],
    m: [Tensor<f32>; 2],
    v: [Tensor<f32>; 2],
    cur: usize,
    grads: [Tensor<f32>; 2],
    zeros: Tensor<f32>,
    micro: usize,
    loss_out: Tensor<f32>,
    grad_norm_out: Tensor<f32>,
    params_nonfinite_out: Tensor<f32>,
    scalars: [Tensor<f32>; 8],
    /// `--max-grad-norm`: the norm graph, when clipping is on.
    clip: Option<GradClip>,
}

const SCALAR_NAMES: [&str; 8] =
    ["lr", "beta1", "beta2", "eps", "weight_decay", "bias_correction1", "bias_correction2", "grad_scale"];

impl TrainingGraphs {
    /// Loads both graphs, checks them against the manifest and binds the base weights and
    /// the run's LoRA scale (alpha/rank).
    pub fn load(
        artifacts: &Artifacts,
        options: &SessionOptions,
        lora_scale: f32,
        base: impl FnOnce(&DeviceMemory) -> Result<BaseWeights>,
    ) -> Result<(Self, BaseWeights)> {
        let options = &options.for_artifacts(&artifacts.manifest)?;
        let training = load_session(&artifacts.graph_path(TRAINING)?, options)?;
        check_session_io(artifacts, TRAINING, &training)?;
        let optimizer = load_session(&artifacts.graph_path(OPTIMIZER)?, options)?;
        check_session_io(artifacts, OPTIMIZER, &optimizer)?;
        let memory = DeviceMemory::new(options.device);
        let base = base(&memory)?;
        let p = artifacts.num_params();
        let zero = vec![0.0f32; p];
        let t = |m: &DeviceMemory| m.tensor(&[p], &zero);
        let mut train_binding = training.create_binding().map_err(Error::ort("creating the training binding"))?;
        for (name, tensor) in &base.tensors {
            tensor.bind(&mut train_binding, name)?;
        }
        bind_lora_scale(&mut train_binding, lora_scale)?;
        let opt_binding = optimizer.create_binding().map_err(Error::ort("creating the optimizer binding"))?;
        let graphs = Self {
            params: [t(&memory)?, t(&memory)?],
            m: [t(&memory)?, t(&memory)?],
            v: [t(&memory)?, t(&memory)?],
            grads: [t(&memory)?, t(&memory)?],
            zeros: t(&memory)?,
            cur: 0,
            micro: 0,
            num_params: p,
            loss_out: host_tensor(&[])?,
            grad_norm_out: host_tensor(&[])?,
            params_nonfinite_out: host_tensor(&[])?,
            scalars: [host_tensor(&[])?, host_tensor(&[])?, host_tensor(&[])?, host_tensor(&[])?, host_tensor(&[])?, host_tensor(&[])?, host_tensor(&[])?, host_tensor(&[])?],
            memory,
            training,
            optimizer,
            train_binding,
            opt_binding,
            clip: None,
        };
        Ok((graphs, base))
    }

    /// The most memory the training and optimizer graphs held at once in ONNX Runtime's
    /// arenas (each session's `MaxInUse`, summed), besides the trainable state and base
    /// weights; `None` when a provider keeps no arena statistics.
    pub fn arena_peak_bytes(&self) -> Result<Option<u64>> {
        let training = crate::runtime::arena_peak_bytes(&self.training, self.memory.device)?;
        let optimizer = crate::runtime::arena_peak_bytes(&self.optimizer, self.memory.device)?;
        Ok(training.zip(optimizer).map(|(a, b)| a + b))
    }

    pub fn num_params(&self) -> usize {
        self.num_params
    }

    /// Replaces parameters and moments (start or resume); clears the accumulator.
    pub fn set_state(&mut self, params: &[f32], m: &[f32], v: &[f32]) -> Result<()> {
        for (name, values) in [("params", params), ("m", m), ("v", v)] {
            if values.len() != self.num_params {
                return Err(Error::Shape { name: name.into(), expected: vec![self.num_params], got: vec![values.len()] });
            }
        }
        let p = [self.num_params];
        self.params[self.cur] = self.memory.tensor(&p, params)?;
        self.m[self.cur] = self.memory.tensor(&p, m)?;
        self.v[self.cur] = self.memory.tensor(&p, v)?;
        self.micro = 0;
        Ok(())
    }

    /// The current parameters and moments on the host (for checkpoints and LoRA files).
    pub fn state(&self) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        Ok((self.memory.read(&self.params[self.cur])?, self.memory.read(&self.m[self.cur])?, self.memory.read(&self.v[self.cur])?))
    }

    pub fn params(&self) -> &Tensor<f32> {
        &self.params[self.cur]
    }

    /// Clips the gradient of every later update to total norm `max_norm` (torch's
    /// `clip_grad_norm_`), computing the norm on this graphs' device.
    pub fn clip_grad_norm(&mut self, max_norm: f64, options: &SessionOptions) -> Result<()> {
        self.clip = Some(GradClip::load(max_norm, options)?);
        Ok(())
    }

    /// Micro-steps accumulated since the last optimizer step.
    pub fn accumulated(&self) -> usize {
        self.micro
    }

    /// One forward+backward: adds this batch's gradient to the accumulator, returns the loss.
    pub fn accumulate(&mut self, batch: &Batch) -> Result<f32> {
        let Self { train_binding: b, params, grads, zeros, loss_out, micro, cur, training, .. } = self;
        let (previous, output) = pair(grads, *micro % 2);
        let input = if *micro == 0 { &*zeros } else { previous };
        (|| {
            b.bind_input("lora_params", &params[*cur])?;
            b.bind_input("grad_accum", input)?;
            b.bind_output("grad_accum_out", output)?;
            b.bind_output("loss", &mut *loss_out)?;
            Ok::<(), ort::Error>(())
        })()
        .map_err(Error::ort("binding the training step"))?;
        batch.bind(b, true)?;
        training.run_binding(b).map_err(Error::ort("running the training graph"))?;
        *micro += 1;
        Ok(loss_out.extract_tensor().1[0])
    }

    /// The accumulated gradient on the host (tests, debugging).
    pub fn gradient(&self) -> Result<Vec<f32>> {
        if self.micro == 0 {
            return Ok(vec![0.0; self.num_params]);
        }
        self.memory.read(&self.grads[(self.micro - 1) % 2])
    }

    /// Discards the accumulated gradient (a skipped step).
    pub fn discard_gradient(&mut self) {
        self.micro = 0;
    }

    /// Sums the accumulated gradient across data-parallel ranks with `sum`, in place; a rank
    /// whose samples were all skipped takes part with zeros.
    pub fn sum_gradient(&mut self, sum: impl FnOnce(&mut Tensor<f32>) -> Result<()>) -> Result<()> {
        if self.micro == 0 {
            self.grads[0] = self.memory.tensor(&[self.num_params], &vec![0.0; self.num_params])?;
            self.micro = 1;
        }
        sum(&mut self.grads[(self.micro - 1) % 2])
    }

    /// AdamW over the accumulated gradient of `samples` samples (scaled by 1/samples, then
    /// clipped when clipping is on); `step` is the 1-based optimizer step for bias
    /// correction. A non-finite gradient norm or updated parameter leaves the state as it was.
    pub fn apply(&mut self, step: u64, lr: f64, hp: &AdamW, samples: usize) -> Result<OptimizerOutcome> {
        if self.micro == 0 || samples == 0 {
            return Err(Error::Config("optimizer step with no accumulated gradient".into()));
        }
        let average = 1.0 / samples as f64;
        // The clip factor scales the averaged gradient, as clip_grad_norm_ after accumulation.
        let (grad_norm, grad_scale) = match self.clip.as_mut() {
            Some(clip) => {
                let norm = clip.norm(&self.grads[(self.micro - 1) % 2])? * average;
                (Some(norm as f32), average * clip_coefficient(norm, clip.max_norm))
            }
            None => (None, average),
        };
        let values = [
            lr,
            hp.beta1,
            hp.beta2,
            hp.eps,
            hp.weight_decay,
            1.0 - hp.beta1.powf(step as f64),
            1.0 - hp.beta2.powf(step as f64),
            grad_scale,
        ];
        for (t, v) in self.scalars.iter_mut().zip(values) {
            t.extract_tensor_mut().1[0] = v as f32;
        }
        let next = 1 - self.cur;
        let Self { opt_binding: b, params, m, v, grads, scalars, grad_norm_out, params_nonfinite_out, micro, .. } = self;
        let grads = &grads[(*micro - 1) % 2];
        let (params_in, params_out) = pair(params, next);
        let (m_in, m_out) = pair(m, next);
        let (v_in, v_out) = pair(v, next);
        (|| {
            b.bind_input("params", params_in)?;
            b.bind_input("grads", grads)?;
            b.bind_input("m", m_in)?;
            b.bind_input("v", v_in)?;
            for (name, t) in SCALAR_NAMES.iter().zip(scalars.iter()) {
                b.bind_input(*name, t)?;
            }
            b.bind_output("params_out", params_out)?;
            b.bind_output("m_out", m_out)?;
            b.bind_output("v_out", v_out)?;
            b.bind_output("grad_norm", &mut *grad_norm_out)?;
            b.bind_output("params_nonfinite", &mut *params_nonfinite_out)?;
            Ok::<(), ort::Error>(())
        })()
        .map_err(Error::ort("binding the optimizer step"))?;
        let b = &self.opt_binding;
        self.optimizer.run_binding(b).map_err(Error::ort("running the optimizer graph"))?;
        self.micro = 0;
        let clipped_grad_norm = self.grad_norm_out.extract_tensor().1[0];
        // A finite gradient can still overflow the update (huge lr or weight decay); the
        // graph counts the updated parameters that are not finite.
        let params_nonfinite = self.params_nonfinite_out.extract_tensor().1[0];
        let applied = clipped_grad_norm.is_finite() && params_nonfinite == 0.0;
        if applied {
            self.cur = next;
        }
        Ok(OptimizerOutcome { grad_norm: grad_norm.unwrap_or(clipped_grad_norm), clipped_grad_norm, applied })
    }
}

/// (the other buffer, `&mut buffers[out]`).
fn pair(buffers: &mut [Tensor<f32>; 2], out: usize) -> (&Tensor<f32>, &mut Tensor<f32>) {
    let [a, b] = buffers;
    if out == 0 { (b, a) } else { (a, b) }
}
