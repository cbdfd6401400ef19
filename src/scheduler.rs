//! The flow-matching scheduler, Wan template (DiffSynth-Studio's `FlowMatchScheduler`):
//! sigmas, timesteps, training weights, `add_noise`, `training_target` and Euler `step`.
//!
//! Everything is float32 and follows torch's operation order. What "equal to DiffSynth" means:
//! flowstep's table is one fixed table, the same bits on every CPU and thread count (IEEE
//! arithmetic, a correctly rounded fma, libm's exp, a sequential f64 sum), pinned by
//! `tests/golden/flowstep_schedule_*.csv`. DiffSynth's table is not fixed: PyTorch picks its
//! CPU kernels (exp, sum, linspace's fma) by instruction set, so the table moves by about 1e-6
//! from one CPU to another. Measured on one Xeon, DiffSynth 2.1.12 / torch 2.15.0, N = 1000,
//! shift 5: AVX-512 and AVX2 kernels give identical tables; against the golden written on an
//! AMD EPYC 25 of 1,000 weights differ, by at most 4.8e-7 (2.7e-6 relative); PyTorch's
//! `default` (no-SIMD) kernels change 959 weights by up to 1.0e-6 (7.9e-6 relative) and 34
//! sigmas by 1-2 ulps. flowstep's table equals the AVX2/AVX-512 one in every sigma and
//! timestep and is within 4.8e-7 of it in every weight (`tests/scheduler_golden.rs`).

/// Wan's scheduler defaults: 1000 training timesteps, shift 5.
pub const NUM_TRAIN_TIMESTEPS: usize = 1000;
pub const DEFAULT_SHIFT: f32 = 5.0;

/// The sigma/timestep table of one `set_timesteps` call.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowMatchScheduler {
    pub sigmas: Vec<f32>,
    pub timesteps: Vec<f32>,
    /// `linear_timesteps_weights` in DiffSynth; only set by [`FlowMatchScheduler::training`].
    pub weights: Option<Vec<f32>>,
    pub shift: f32,
    pub denoising_strength: f64,
}

/// `torch.linspace(start, end, steps)` in float32, with torch's two-sided formula (the first
/// half counts up from `start`, the second half down from `end`) and its fused multiply-add
/// (one rounding), which changes 1 ulp at about 8% of the entries compared to mul then add.
pub fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f32;
            let halfway = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < halfway {
                        step.mul_add(i as f32, start)
                    } else {
                        (-step).mul_add((steps - 1 - i) as f32, end)
                    }
                })
                .collect()
        }
    }
}

impl FlowMatchScheduler {
    /// `set_timesteps(num_steps, denoising_strength, shift)` for inference: no weights.
    pub fn new(num_steps: usize, denoising_strength: f64, shift: f32) -> Self {
        // sigma_start is a Python float in DiffSynth; linspace then runs in float32.
        let sigma_start = (denoising_strength * 1.0) as f32;
        let raw = linspace_f32(sigma_start, 0.0, num_steps + 1);
        let sigmas: Vec<f32> = raw[..num_steps]
            .iter()
            .map(|&s| shift * s / (1.0 + (shift - 1.0) * s))
            .collect();
        let timesteps = sigmas.iter().map(|&s| s * NUM_TRAIN_TIMESTEPS as f32).collect();
        Self { sigmas, timesteps, weights: None, shift, denoising_strength }
    }

    /// `set_timesteps(..., training=True)`: also computes the timestep weights.
    pub fn training(num_steps: usize, denoising_strength: f64, shift: f32) -> Self {
        let mut scheduler = Self::new(num_steps, denoising_strength, shift);
        scheduler.weights = Some(training_weights(&scheduler.sigmas));
        scheduler
    }

    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// `argmin |timesteps - t|`, the first index on ties (as `torch.argmin`).
    pub fn index_of(&self, timestep: f32) -> usize {
        let mut best = 0;
        let mut best_dist = f32::INFINITY;
        for (i, &t) in self.timesteps.iter().enumerate() {
            let dist = (t - timestep).abs();
            if dist < best_dist {
                best = i;
                best_dist = dist;
            }
        }
        best
    }

    /// The loss weight of a timestep; 1.0 for an inference-only scheduler.
    pub fn training_weight(&self, timestep: f32) -> f32 {
        match &self.weights {
            Some(w) => w[self.index_of(timestep)],
            None => 1.0,
        }
    }

    /// The sigma `add_noise` uses for a timestep.
    pub fn sigma_of(&self, timestep: f32) -> f32 {
        self.sigmas[self.index_of(timestep)]
    }

    /// `x_t = (1 - σ) x0 + σ ε`, elementwise over slices of equal length.
    pub fn add_noise(&self, x0: &[f32], noise: &[f32], timestep: f32, out: &mut [f32]) {
        add_noise_with_sigma(x0, noise, self.sigma_of(timestep), out);
    }

    /// The Euler update `x + v (σ_next - σ)`, with σ_next = 0 after the last step.
    pub fn step(&self, velocity: &[f32], timestep: f32, sample: &mut [f32]) {
        let id = self.index_of(timestep);
        let sigma = self.sigmas[id];
        let sigma_next = self.sigmas.get(id + 1).copied().unwrap_or(0.0);
        let dt = sigma_next - sigma;
        for (x, v) in sample.iter_mut().zip(velocity) {
            *x += v * dt;
        }
    }
}

/// `x_t = (1 - σ) x0 + σ ε` for a known σ.
pub fn add_noise_with_sigma(x0: &[f32], noise: &[f32], sigma: f32, out: &mut [f32]) {
    let keep = 1.0 - sigma;
    for ((o, &x), &n) in out.iter_mut().zip(x0).zip(noise) {
        *o = keep * x + sigma * n;
    }
}

/// `training_target = ε - x0`.
pub fn training_target(x0: &[f32], noise: &[f32], out: &mut [f32]) {
    for ((o, &x), &n) in out.iter_mut().zip(x0).zip(noise) {
        *o = n - x;
    }
}

/// DiffSynth's `set_training_weight`: a Gaussian bump over the timestep values centred at
/// 500, shifted to a zero minimum and normalised to mean 1 (with an empirical correction
/// when the table does not have 1000 entries).
fn training_weights(sigmas: &[f32]) -> Vec<f32> {
    let steps = NUM_TRAIN_TIMESTEPS as f32;
    let y: Vec<f32> = sigmas
        .iter()
        .map(|&s| {
            let x = s * NUM_TRAIN_TIMESTEPS as f32;
            let z = (x - steps / 2.0) / steps;
            // exp in f64 rounded once: the correctly rounded float32 (torch's vectorised expf
            // is within 1 ulp of it; y - min(y) amplifies any ulp near the minimum). libm, not
            // the C library, so the table has the same bits on every CPU.
            libm::exp((-2.0 * (z * z)) as f64) as f32
        })
        .collect();
    let min = y.iter().copied().fold(f32::INFINITY, f32::min);
    let shifted: Vec<f32> = y.iter().map(|v| v - min).collect();
    // torch sums float32 with a pairwise reduction; an f64 sum rounded once is as close.
    let sum = shifted.iter().map(|&v| v as f64).sum::<f64>() as f32;
    let scale = steps / sum;
    let mut weights: Vec<f32> = shifted.iter().map(|v| v * scale).collect();
    if weights.len() != NUM_TRAIN_TIMESTEPS {
        let ratio = weights.len() as f32 / steps;
        for w in &mut weights {
            *w *= ratio;
        }
        let offset = weights.get(1).copied().unwrap_or(0.0);
        for w in &mut weights {
            *w += offset;
        }
    }
    weights
}

/// Round a float32 to the nearest bfloat16 (ties to even), as `tensor.to(torch.bfloat16)`.
pub fn round_to_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32, rel: f32) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-6)
    }

    /// The reference table of docs/DESIGN.md §4 (N = 1000, shift 5).
    #[test]
    fn design_reference_table() {
        let s = FlowMatchScheduler::training(1000, 1.0, 5.0);
        let w = s.weights.as_deref().unwrap_or(&[]);
        assert_eq!(s.sigmas[0], 1.0);
        assert_eq!(s.timesteps[0], 1000.0);
        assert_eq!(w[0], 0.0, "weight at t=1000 is exactly zero");
        let rows: [(usize, f32, f32, f32); 6] = [
            (1, 0.99980, 999.80, 0.00128),
            (250, 0.9375, 937.5, 0.398),
            (500, 0.83333, 833.33, 1.0249),
            (750, 0.625, 625.0, 1.914),
            (833, 0.50060, 500.60, 2.0764),
            (999, 0.0049801, 4.980, 0.0319),
        ];
        for (i, sigma, t, weight) in rows {
            assert!(close(s.sigmas[i], sigma, 1e-4), "sigma[{i}] = {}", s.sigmas[i]);
            assert!(close(s.timesteps[i], t, 1e-4), "t[{i}] = {}", s.timesteps[i]);
            // The table prints 3-5 significant digits.
            assert!(close(w[i], weight, 2e-3), "w[{i}] = {}", w[i]);
        }
        let max_at = (0..w.len()).max_by(|&a, &b| w[a].total_cmp(&w[b])).unwrap_or(0);
        assert_eq!(max_at, 833);
        let mean = w.iter().map(|&x| x as f64).sum::<f64>() / w.len() as f64;
        assert!((mean - 1.0).abs() < 1e-5, "mean weight {mean}");
        assert_eq!(s.timesteps.iter().filter(|&&t| t >= 875.0).count(), 417);
    }

    #[test]
    fn lookup_uses_nearest_index_and_first_on_ties() {
        let s = FlowMatchScheduler::training(1000, 1.0, 5.0);
        assert_eq!(s.index_of(1000.0), 0);
        assert_eq!(s.index_of(s.timesteps[500] + 1e-3), 500);
        assert_eq!(s.training_weight(s.timesteps[833]), s.weights.as_ref().map_or(0.0, |w| w[833]));
        // bf16 rounds 999.8 to 1000: DiffSynth gives such steps weight 0.
        assert_eq!(round_to_bf16(s.timesteps[5]), 1000.0);
        assert_eq!(s.training_weight(round_to_bf16(s.timesteps[5])), 0.0);
        // An exact tie (timesteps [1000, 500], t = 750): the first index, as torch.argmin.
        let two = FlowMatchScheduler::new(2, 1.0, 1.0);
        assert_eq!(two.timesteps, [1000.0, 500.0]);
        assert_eq!(two.index_of(750.0), 0);
    }

    #[test]
    fn euler_step_reaches_sigma_zero() {
        let s = FlowMatchScheduler::new(4, 1.0, 5.0);
        // With a constant velocity v the sample moves by -v·σ_0 over the whole trajectory.
        let mut x = vec![2.0f32; 3];
        for &t in &s.timesteps.clone() {
            s.step(&[1.0; 3], t, &mut x);
        }
        assert!(x.iter().all(|&v| (v - 1.0).abs() < 1e-6), "{x:?}");
    }

    #[test]
    fn add_noise_and_target() {
        let mut out = [0.0f32; 2];
        add_noise_with_sigma(&[1.0, 2.0], &[3.0, -1.0], 0.25, &mut out);
        assert_eq!(out, [0.75 + 0.75, 1.5 - 0.25]);
        training_target(&[1.0, 2.0], &[3.0, -1.0], &mut out);
        assert_eq!(out, [2.0, -3.0]);
    }
}
