//! Timestep sampling as musubi-tuner offers it (`--timestep-sampling`), beside DiffSynth's
//! uniform table index, and the loss weighting that goes with it (`--loss-weighting`).
//!
//! What musubi-tuner does (src/musubi_tuner/training/trainer_base.py at 30c658c4,
//! `get_noisy_model_input_and_timesteps`), and how flowstep maps it:
//! - `sigmoid`, `shift` give a continuous t in [0, 1]: σ = t directly, the model is fed
//!   `1000·t + 1`, and [min, max] scale t (`t·(max − min) + min`, no rejection). flowstep does
//!   the same, with [min, max] the σ range of `--min/--max-timestep-boundary` on the
//!   training table (the default boundaries give musubi's [0, 1]).
//! - `logit_normal` is musubi's `--timestep_sampling sigma --weighting_scheme logit_normal`: a
//!   table index `⌊sigmoid(mean + std·z)·(max − min) + min⌋` into the scheduler's timesteps,
//!   σ and the fed timestep from that entry. flowstep indexes its own table (DiffSynth's,
//!   shifted by `--shift`) within the boundaries; musubi's training table is unshifted, so
//!   `--shift 1` reproduces its (σ, timestep) pairs.
//! - musubi's weighting_scheme none, its default and the one these modes imply, weights
//!   every timestep 1; DiffSynth weights by its table. Hence `--loss-weighting`, defaulting
//!   to `diffsynth` for `uniform` (DiffSynth's exact step) and `none` for musubi's modes.
//!
//! Normal variates come from a uniform one through the inverse normal CDF, as musubi's
//! `uniform_to_normal_ppF` (its path for given uniforms, `org_timesteps`), so that a draw is a
//! pure function of one uniform and can be compared with musubi's formulas exactly.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How a step's timestep is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TimestepSampling {
    /// DiffSynth: a table index uniform in the boundaries.
    Uniform,
    /// musubi `sigmoid`: t = sigmoid(scale·z).
    Sigmoid { scale: f64 },
    /// musubi `shift`: s = sigmoid(scale·z), t = shift·s / (1 + (shift − 1)·s).
    Shift { scale: f64, shift: f64 },
    /// musubi `sigma` + weighting_scheme `logit_normal`: table index from sigmoid(mean + std·z).
    LogitNormal { mean: f64, std: f64 },
}

/// The `--timestep-sampling` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SamplingMode {
    Uniform,
    Sigmoid,
    Shift,
    #[value(name = "logit_normal", alias = "logit-normal")]
    LogitNormal,
}

/// The mode's parameters as given on the command line (None: not given).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingParams {
    pub sigmoid_scale: Option<f64>,
    pub discrete_flow_shift: Option<f64>,
    pub logit_mean: Option<f64>,
    pub logit_std: Option<f64>,
}

impl TimestepSampling {
    /// The sampling for a mode and its parameters, with musubi's defaults (scale 1, shift 1,
    /// mean 0, std 1). A parameter the mode does not use is an error, not ignored.
    pub fn from_flags(mode: SamplingMode, p: SamplingParams) -> Result<Self> {
        let used: &[&str] = match mode {
            SamplingMode::Uniform => &[],
            SamplingMode::Sigmoid => &["--sigmoid-scale"],
            SamplingMode::Shift => &["--sigmoid-scale", "--discrete-flow-shift"],
            SamplingMode::LogitNormal => &["--logit-mean", "--logit-std"],
        };
        let given = [("--sigmoid-scale", p.sigmoid_scale), ("--discrete-flow-shift", p.discrete_flow_shift), ("--logit-mean", p.logit_mean), ("--logit-std", p.logit_std)];
        if let Some((flag, _)) = given.iter().find(|(flag, v)| v.is_some() && !used.contains(flag)) {
            return Err(Error::flag(flag, format!("is not used by --timestep-sampling {}", mode_name(mode))));
        }
        let positive = |flag: &'static str, v: Option<f64>| match v.unwrap_or(1.0) {
            x if x.is_finite() && x > 0.0 => Ok(x),
            x => Err(Error::flag(flag, format!("must be a positive number, got {x}"))),
        };
        Ok(match mode {
            SamplingMode::Uniform => TimestepSampling::Uniform,
            SamplingMode::Sigmoid => TimestepSampling::Sigmoid { scale: positive("--sigmoid-scale", p.sigmoid_scale)? },
            SamplingMode::Shift => TimestepSampling::Shift {
                scale: positive("--sigmoid-scale", p.sigmoid_scale)?,
                shift: positive("--discrete-flow-shift", p.discrete_flow_shift)?,
            },
            SamplingMode::LogitNormal => {
                let mean = p.logit_mean.unwrap_or(0.0);
                if !mean.is_finite() {
                    return Err(Error::flag("--logit-mean", format!("must be a finite number, got {mean}")));
                }
                TimestepSampling::LogitNormal { mean, std: positive("--logit-std", p.logit_std)? }
            }
        })
    }

    /// True for the modes that draw a continuous t (σ = t) rather than a table index.
    pub fn is_continuous(&self) -> bool {
        matches!(self, TimestepSampling::Sigmoid { .. } | TimestepSampling::Shift { .. })
    }

    /// musubi's continuous t in [0, 1] for the uniform variate `u` (before the boundaries).
    pub fn continuous_t(&self, u: f32) -> Option<f64> {
        match *self {
            TimestepSampling::Sigmoid { scale } => Some(sigmoid(scale * standard_normal_from(u))),
            TimestepSampling::Shift { scale, shift } => {
                let t = sigmoid(scale * standard_normal_from(u));
                Some(t * shift / (1.0 + (shift - 1.0) * t))
            }
            TimestepSampling::Uniform | TimestepSampling::LogitNormal { .. } => None,
        }
    }

    /// For `logit_normal`: musubi's density sample sigmoid(mean + std·z) in (0, 1).
    pub fn table_fraction(&self, u: f32) -> Option<f64> {
        match *self {
            TimestepSampling::LogitNormal { mean, std } => Some(sigmoid(mean + std * standard_normal_from(u))),
            _ => None,
        }
    }
}

fn mode_name(mode: SamplingMode) -> &'static str {
    match mode {
        SamplingMode::Uniform => "uniform",
        SamplingMode::Sigmoid => "sigmoid",
        SamplingMode::Shift => "shift",
        SamplingMode::LogitNormal => "logit_normal",
    }
}

impl fmt::Display for TimestepSampling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimestepSampling::Uniform => write!(f, "uniform"),
            TimestepSampling::Sigmoid { scale } => write!(f, "sigmoid (scale {scale})"),
            TimestepSampling::Shift { scale, shift } => write!(f, "shift (scale {scale}, shift {shift})"),
            TimestepSampling::LogitNormal { mean, std } => write!(f, "logit_normal (mean {mean}, std {std})"),
        }
    }
}

/// The loss weight w(t) of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossWeighting {
    /// DiffSynth's table weight of the timestep's entry.
    Diffsynth,
    /// 1 at every timestep (musubi-tuner's weighting_scheme none).
    None,
}

impl LossWeighting {
    /// `diffsynth` for DiffSynth's uniform draw, `none` for musubi's modes.
    pub fn default_for(sampling: &TimestepSampling) -> Self {
        match sampling {
            TimestepSampling::Uniform => LossWeighting::Diffsynth,
            _ => LossWeighting::None,
        }
    }
}

/// musubi's `uniform_to_normal_ppF`: the standard normal quantile of `u` clamped to
/// [1e-7, 1 − 1e-7] (so that u = 0 gives no infinity).
pub fn standard_normal_from(u: f32) -> f64 {
    const EPS: f64 = 1e-7;
    normal_quantile((u as f64).clamp(EPS, 1.0 - EPS))
}

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + libm::exp(-x))
}

/// Φ⁻¹(p) for p in (0, 1): Acklam's rational approximation (relative error 1.2e-9), then one
/// Halley step on Φ (libm's erfc, the same bits on every CPU), which gives full f64 accuracy.
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [-3.969683028665376e1, 2.209460984245205e2, -2.759285104469687e2, 1.38357751867269e2, -3.066479806614716e1, 2.506628277459239];
    const B: [f64; 5] = [-5.447609879822406e1, 1.615858368580409e2, -1.556989798598866e2, 6.680131188771972e1, -1.328068155288572e1];
    const C: [f64; 6] = [-7.784894002430293e-3, -3.223964580411365e-1, -2.400758277161838, -2.549732539343734, 4.374664141464968, 2.938163982698783];
    const D: [f64; 4] = [7.784695709041462e-3, 3.224671290700398e-1, 2.445134137142996, 3.754408661907416];
    const P_LOW: f64 = 0.02425;
    let tail = |q: f64| (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5]) / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0);
    let x = if p < P_LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - P_LOW {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    };
    let e = 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2) - p;
    let u = e * (2.0 * std::f64::consts::PI).sqrt() * libm::exp(x * x / 2.0);
    x - u / (1.0 + x * u / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_inverts_the_normal_cdf() {
        for &p in &[1e-7, 1e-4, 0.02, 0.02425, 0.1, 0.3, 0.5, 0.7, 0.97575, 0.999, 1.0 - 1e-7] {
            let x = normal_quantile(p);
            let back = 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
            assert!((back - p).abs() <= 1e-15_f64.max(p * 1e-13), "p {p}: Φ(Φ⁻¹(p)) = {back}");
        }
        assert_eq!(normal_quantile(0.5), 0.0);
        assert!((normal_quantile(0.975) - 1.959963984540054).abs() < 1e-14);
    }

    #[test]
    fn unused_parameters_are_refused() {
        let scale = SamplingParams { sigmoid_scale: Some(2.0), ..SamplingParams::default() };
        assert!(TimestepSampling::from_flags(SamplingMode::Uniform, scale).is_err());
        assert!(TimestepSampling::from_flags(SamplingMode::LogitNormal, scale).is_err());
        assert_eq!(TimestepSampling::from_flags(SamplingMode::Shift, scale).ok(), Some(TimestepSampling::Shift { scale: 2.0, shift: 1.0 }));
        let bad_std = SamplingParams { logit_std: Some(0.0), ..SamplingParams::default() };
        assert!(TimestepSampling::from_flags(SamplingMode::LogitNormal, bad_std).is_err());
    }
}
