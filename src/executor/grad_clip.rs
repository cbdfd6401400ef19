//! Gradient clipping by total norm (`--max-grad-norm`), with torch's `clip_grad_norm_`
//! semantics, on the gradient where it lives: a one-node graph (assets/grad_sum_squares.onnx,
//! written by `python -m flowstep_export.pipeline.grad_norm_graph`) sums the squares of the
//! accumulated gradient buffer on the device, and the clip factor becomes part of the
//! optimizer's `grad_scale`, so nothing model-sized is copied and no export changes.

use ort::session::{IoBinding, Session};
use ort::value::Tensor;

use super::host_tensor;
use crate::error::{Error, Result};
use crate::runtime::{SessionOptions, load_embedded_session};

const GRAD_SUM_SQUARES: &[u8] = include_bytes!("../../assets/grad_sum_squares.onnx");

/// torch.nn.utils.clip_grad_norm_'s guard against a zero norm.
const CLIP_EPS: f64 = 1e-6;

/// The factor `clip_grad_norm_` multiplies the gradient by: `max_norm / (norm + 1e-6)`,
/// clamped to at most 1. A non-finite norm gives a non-finite or zero factor, as in torch;
/// the optimizer then sees a non-finite gradient and the step goes to `--on-nonfinite`.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    let coef = max_norm / (norm + CLIP_EPS);
    if coef > 1.0 { 1.0 } else { coef }
}

/// The norm graph and its binding, with the clipping threshold.
pub struct GradClip {
    pub max_norm: f64,
    session: Session,
    binding: IoBinding,
    sum_squares: Tensor<f32>,
}

impl GradClip {
    pub fn load(max_norm: f64, options: &SessionOptions) -> Result<Self> {
        let session = load_embedded_session("gradient-norm graph", GRAD_SUM_SQUARES, options)?;
        let binding = session.create_binding().map_err(Error::ort("creating the gradient-norm binding"))?;
        Ok(Self { max_norm, session, binding, sum_squares: host_tensor(&[])? })
    }

    /// `‖grads‖₂` of a device buffer; only the scalar comes back to the host.
    pub fn norm(&mut self, grads: &Tensor<f32>) -> Result<f64> {
        let Self { session, binding, sum_squares, .. } = self;
        binding.bind_input("grads", grads).map_err(Error::ort("binding the gradient"))?;
        binding.bind_output("sum_squares", &mut *sum_squares).map_err(Error::ort("binding the gradient norm"))?;
        session.run_binding(binding).map_err(Error::ort("running the gradient-norm graph"))?;
        Ok((sum_squares.extract_tensor().1[0] as f64).sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coefficient_is_torchs() {
        assert_eq!(clip_coefficient(0.5, 1.0), 1.0, "below the threshold: unchanged");
        assert_eq!(clip_coefficient(4.0, 1.0), 1.0 / (4.0 + 1e-6));
        assert_eq!(clip_coefficient(0.0, 1.0), 1.0);
        assert_eq!(clip_coefficient(f64::INFINITY, 1.0), 0.0);
        assert!(clip_coefficient(f64::NAN, 1.0).is_nan());
    }

    #[test]
    fn norm_of_a_buffer() {
        crate::runtime::init(None, false, None).expect("ONNX Runtime (scripts/setup_ort.sh)");
        let mut clip = GradClip::load(1.0, &SessionOptions::cpu()).expect("norm graph");
        let values: Vec<f32> = (0..100_003).map(|i| ((i % 13) as f32 - 6.0) * 0.25).collect();
        let want = values.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let grads = Tensor::from_array((vec![values.len()], values)).expect("tensor");
        let got = clip.norm(&grads).expect("norm");
        assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
    }
}
