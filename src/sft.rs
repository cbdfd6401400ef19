//! One SFT step's inputs, as DiffSynth's `FlowMatchSFTLoss` draws them: a timestep, the
//! noise, the noisy latents `x_t`, the target `ε - x0` and the loss weight `w(t)`.
//!
//! Randomness is counter-based: every draw is a pure function of (seed, step), so a resumed
//! run reproduces the same timesteps and noise with no RNG state to save, and the noise is
//! generated in fixed chunks in parallel with a result independent of the thread count.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;

use crate::artifacts::ExpertInfo;
use crate::error::{Error, Result};
use crate::scheduler::{FlowMatchScheduler, NUM_TRAIN_TIMESTEPS, round_to_bf16};
use crate::timesteps::{LossWeighting, TimestepSampling};

/// Elements per independently seeded noise chunk (the unit of parallel work).
const NOISE_CHUNK: usize = 1 << 16;
/// The ChaCha stream that draws the timestep index (noise chunks use streams 0, 1, ...).
const TIMESTEP_STREAM: u64 = u64::MAX;

/// How timesteps and noise are drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct SftConfig {
    pub num_train_timesteps: usize,
    pub shift: f32,
    /// Timestep boundaries as fractions of the table: indices in `[⌊min·N⌋, ⌊max·N⌋)`.
    pub min_boundary: f64,
    pub max_boundary: f64,
    pub noise_scale: f32,
    /// Round the timestep to bfloat16 before use, as DiffSynth does (294 distinct values).
    pub bf16_timestep: bool,
    /// How the timestep is drawn ([`crate::timesteps`]).
    pub sampling: TimestepSampling,
    pub loss_weighting: LossWeighting,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: NUM_TRAIN_TIMESTEPS,
            shift: crate::scheduler::DEFAULT_SHIFT,
            min_boundary: 0.0,
            max_boundary: 1.0,
            noise_scale: 1.0,
            bf16_timestep: false,
            sampling: TimestepSampling::Uniform,
            loss_weighting: LossWeighting::Diffsynth,
        }
    }
}

/// A run's timestep boundaries and where they came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Boundaries {
    pub min: f64,
    pub max: f64,
    pub source: &'static str,
}

/// The timestep boundaries of a run: each flag given wins; otherwise an expert's range from
/// its manifest, or the boundaries a converted DiffSynth cache was made with, or [0, 1).
/// An expert and a dataset that disagree (with a flag missing) are an error, not a choice.
pub fn resolve_boundaries(flags: (Option<f64>, Option<f64>), expert: Option<&ExpertInfo>, stored: Option<(f64, f64)>) -> Result<Boundaries> {
    let (default, source) = match (expert, stored) {
        (Some(e), Some(s)) if (e.min_timestep_boundary, e.max_timestep_boundary) != s && (flags.0.is_none() || flags.1.is_none()) => {
            return Err(Error::Config(format!(
                "the dataset was cached by DiffSynth with timestep boundaries [{}, {}), but these artifacts are the {} expert, \
                 trained on [{}, {}); pass --min-timestep-boundary and --max-timestep-boundary to choose",
                s.0, s.1, e.role.as_str(), e.min_timestep_boundary, e.max_timestep_boundary
            )));
        }
        (Some(e), _) => ((e.min_timestep_boundary, e.max_timestep_boundary), "the expert's manifest"),
        (None, Some(s)) => (s, "the DiffSynth cache"),
        (None, None) => ((0.0, 1.0), "the default"),
    };
    let source = if flags.0.is_some() || flags.1.is_some() { "the command line" } else { source };
    Ok(Boundaries { min: flags.0.unwrap_or(default.0), max: flags.1.unwrap_or(default.1), source })
}

/// The scalar part of one step's draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimestepDraw {
    /// Index drawn uniformly in the boundaries.
    pub index: usize,
    /// The timestep fed to the model (bf16-rounded when that option is on).
    pub timestep: f32,
    /// σ and w(t) of the table entry nearest to `timestep`.
    pub sigma: f32,
    pub weight: f32,
}

/// Draws each step's SFT inputs from a seed.
#[derive(Debug, Clone)]
pub struct SftSampler {
    pub scheduler: FlowMatchScheduler,
    pub config: SftConfig,
    pub seed: u64,
    index_range: (usize, usize),
    /// For the continuous modes: the σ range of the boundaries, [σ(hi), σ(lo)], with σ(N) = 0.
    sigma_range: (f64, f64),
}

impl SftSampler {
    pub fn new(config: SftConfig, seed: u64) -> Result<Self> {
        let n = config.num_train_timesteps;
        let lo = (config.min_boundary * n as f64).floor() as usize;
        let hi = (config.max_boundary * n as f64).floor() as usize;
        let valid_bounds = (0.0..=1.0).contains(&config.min_boundary)
            && (0.0..=1.0).contains(&config.max_boundary);
        if n == 0 || !valid_bounds || lo >= hi || hi > n {
            return Err(Error::Config(format!(
                "timestep boundaries [{}, {}) select no timestep of {n}",
                config.min_boundary, config.max_boundary
            )));
        }
        if !(config.noise_scale.is_finite() && config.shift.is_finite() && config.shift > 0.0) {
            return Err(Error::Config("noise scale and shift must be finite, shift > 0".into()));
        }
        if config.bf16_timestep && config.sampling.is_continuous() {
            return Err(Error::flag("--bf16-timestep", format!("rounds DiffSynth's table timesteps; --timestep-sampling {} draws no table entry", config.sampling)));
        }
        let scheduler = FlowMatchScheduler::training(n, 1.0, config.shift);
        let sigma_at = |i: usize| scheduler.sigmas.get(i).map_or(0.0, |&s| s as f64);
        let sigma_range = (sigma_at(hi), sigma_at(lo));
        Ok(Self { scheduler, config, seed, index_range: (lo, hi), sigma_range })
    }

    /// The same draws under another seed (evaluation noise).
    pub fn with_seed(&self, seed: u64) -> Self {
        Self { seed, ..self.clone() }
    }

    /// The half-open index range timesteps are drawn from.
    pub fn index_range(&self) -> (usize, usize) {
        self.index_range
    }

    /// The uniform variate in [0, 1) that musubi's modes map to step `step`'s timestep
    /// (DiffSynth's `uniform` draws its index from the same stream instead).
    pub fn timestep_variate(&self, step: u64) -> f32 {
        step_rng(self.seed, step, TIMESTEP_STREAM).random::<f32>()
    }

    /// The timestep, σ and weight of step `step`.
    pub fn draw_timestep(&self, step: u64) -> TimestepDraw {
        let (lo, hi) = self.index_range;
        let sampling = self.config.sampling;
        let index = match sampling {
            TimestepSampling::Uniform => step_rng(self.seed, step, TIMESTEP_STREAM).random_range(lo..hi),
            _ => {
                let u = self.timestep_variate(step);
                if let Some(t) = sampling.continuous_t(u) {
                    return self.continuous_draw(t);
                }
                // musubi: indices = (u·(t_max − t_min) + t_min).long(); a fraction that rounds
                // to 1 in f64 stays inside the range.
                let fraction = sampling.table_fraction(u).unwrap_or(0.0);
                ((fraction * (hi - lo) as f64 + lo as f64).floor() as usize).min(hi - 1)
            }
        };
        let mut timestep = self.scheduler.timesteps[index];
        if self.config.bf16_timestep {
            timestep = round_to_bf16(timestep);
        }
        // add_noise and training_weight look the timestep up again (argmin), which only
        // changes the entry when the timestep was rounded.
        let id = if self.config.bf16_timestep { self.scheduler.index_of(timestep) } else { index };
        self.draw_at(index, timestep, id)
    }

    /// The draw for table index `index` fed as `timestep`, with σ and w(t) of entry `entry`.
    fn draw_at(&self, index: usize, timestep: f32, entry: usize) -> TimestepDraw {
        TimestepDraw { index, timestep, sigma: self.scheduler.sigmas[entry], weight: self.weight(entry) }
    }

    /// A continuous t of musubi's modes, scaled into the boundaries' σ range: σ = t and the
    /// model is fed 1000·t + 1, as musubi; `index` is the nearest table entry (its weight).
    fn continuous_draw(&self, t: f64) -> TimestepDraw {
        let (min, max) = self.sigma_range;
        let t = t * (max - min) + min;
        let sigma = t as f32;
        let index = self.scheduler.index_of(1000.0 * sigma);
        TimestepDraw { index, timestep: (t * 1000.0 + 1.0) as f32, sigma, weight: self.weight(index) }
    }

    /// w(t) of table entry `entry` under the run's loss weighting.
    fn weight(&self, entry: usize) -> f32 {
        match self.config.loss_weighting {
            LossWeighting::Diffsynth => self.scheduler.weights.as_ref().map_or(1.0, |w| w[entry]),
            LossWeighting::None => 1.0,
        }
    }

    /// ε ~ N(0, 1)·noise_scale for one chunk of step `key`'s noise.
    fn noise_chunk(&self, key: u64, chunk: usize) -> impl Iterator<Item = f32> {
        let (mut rng, scale) = (step_rng(self.seed, key, chunk as u64), self.config.noise_scale);
        std::iter::repeat_with(move || rng.sample::<f32, _>(StandardNormal) * scale)
    }

    /// Fills `noise` with step `step`'s ε.
    pub fn fill_noise(&self, step: u64, noise: &mut [f32]) {
        noise.par_chunks_mut(NOISE_CHUNK).enumerate().for_each(|(chunk, out)| {
            out.iter_mut().zip(self.noise_chunk(step, chunk)).for_each(|(v, eps)| *v = eps);
        });
    }

    /// Draws step `step` and writes `x_t` and the target for the clean latents `x0`,
    /// in one parallel pass with no allocation.
    pub fn prepare_into(&self, step: u64, x0: &[f32], x_t: &mut [f32], target: &mut [f32]) -> Result<TimestepDraw> {
        let draw = self.draw_timestep(step);
        self.noise_into(step, draw.sigma, x0, x_t, target)?;
        Ok(draw)
    }

    /// Like [`Self::prepare_into`] at a fixed table index (deterministic evaluation);
    /// the noise is still keyed by `key`.
    pub fn prepare_at(&self, key: u64, index: usize, x0: &[f32], x_t: &mut [f32], target: &mut [f32]) -> Result<TimestepDraw> {
        let index = index.min(self.scheduler.len().saturating_sub(1));
        let draw = self.draw_at(index, self.scheduler.timesteps[index], index);
        self.noise_into(key, draw.sigma, x0, x_t, target)?;
        Ok(draw)
    }

    fn noise_into(&self, key: u64, sigma: f32, x0: &[f32], x_t: &mut [f32], target: &mut [f32]) -> Result<()> {
        if x_t.len() != x0.len() || target.len() != x0.len() {
            return Err(Error::Shape {
                name: "x_t/target".into(),
                expected: vec![x0.len()],
                got: vec![x_t.len(), target.len()],
            });
        }
        let keep = 1.0 - sigma;
        x_t.par_chunks_mut(NOISE_CHUNK)
            .zip(target.par_chunks_mut(NOISE_CHUNK))
            .zip(x0.par_chunks(NOISE_CHUNK))
            .enumerate()
            .for_each(|(chunk, ((xt, tg), x))| {
                for (((o, t), &x), eps) in xt.iter_mut().zip(tg.iter_mut()).zip(x).zip(self.noise_chunk(key, chunk)) {
                    *o = keep * x + sigma * eps;
                    *t = eps - x;
                }
            });
        Ok(())
    }
}

/// A ChaCha8 generator keyed by (seed, step) on one stream.
pub fn step_rng(seed: u64, step: u64, stream: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    let words = [splitmix64(seed), splitmix64(seed ^ 0x5851_f42d_4c95_7f2d), splitmix64(step), splitmix64(step ^ 0x14057b7ef767814f)];
    for (dst, w) in key.chunks_exact_mut(8).zip(words) {
        dst.copy_from_slice(&w.to_le_bytes());
    }
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(stream);
    rng
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(config: SftConfig) -> SftSampler {
        match SftSampler::new(config, 42) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn formulas_are_exact() {
        let s = sampler(SftConfig::default());
        let x0: Vec<f32> = (0..200_000).map(|i| (i % 17) as f32 * 0.1 - 0.8).collect();
        let (mut xt, mut tg, mut eps) = (vec![0.0; x0.len()], vec![0.0; x0.len()], vec![0.0; x0.len()]);
        let d = s.prepare_into(7, &x0, &mut xt, &mut tg).map_err(|e| e.to_string()).unwrap_or_else(|e| panic!("{e}"));
        s.fill_noise(7, &mut eps);
        assert_eq!(d.timestep, s.scheduler.timesteps[d.index]);
        assert_eq!(d.sigma, s.scheduler.sigmas[d.index]);
        for i in 0..x0.len() {
            assert_eq!(xt[i], (1.0 - d.sigma) * x0[i] + d.sigma * eps[i]);
            assert_eq!(tg[i], eps[i] - x0[i]);
        }
    }

    #[test]
    fn deterministic_per_seed_and_step() {
        let s = sampler(SftConfig::default());
        let (mut a, mut b, mut c) = (vec![0.0; 70_000], vec![0.0; 70_000], vec![0.0; 70_000]);
        s.fill_noise(3, &mut a);
        s.fill_noise(3, &mut b);
        s.fill_noise(4, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(s.draw_timestep(9), s.draw_timestep(9));
        let other = match SftSampler::new(SftConfig::default(), 43) { Ok(s) => s, Err(e) => panic!("{e}") };
        let mut d = vec![0.0; 70_000];
        other.fill_noise(3, &mut d);
        assert_ne!(a, d);
    }

    #[test]
    fn noise_is_standard_normal_times_scale() {
        let s = sampler(SftConfig { noise_scale: 0.5, ..SftConfig::default() });
        let n = 1 << 20;
        let mut eps = vec![0.0f32; n];
        s.fill_noise(0, &mut eps);
        let mean = eps.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = eps.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        // Standard errors: mean 0.5/sqrt(n) = 4.9e-4; variance 0.25·sqrt(2/n) = 3.5e-4. Bound at ~6σ.
        assert!(mean.abs() < 3e-3, "mean {mean}");
        assert!((var - 0.25).abs() < 2.1e-3, "variance {var}");
        let chunk_means: Vec<f64> = eps.chunks(NOISE_CHUNK).map(|c| c.iter().map(|&v| v as f64).sum::<f64>() / c.len() as f64).collect();
        assert!(chunk_means.windows(2).all(|w| w[0] != w[1]), "chunks must not repeat");
    }

    #[test]
    fn index_histogram_is_uniform_in_boundaries() {
        let s = sampler(SftConfig { min_boundary: 0.0, max_boundary: 0.417, ..SftConfig::default() });
        assert_eq!(s.index_range(), (0, 417));
        let draws = 200_000u64;
        let mut bins = [0u64; 10];
        for step in 0..draws {
            let d = s.draw_timestep(step);
            assert!(d.index < 417);
            bins[d.index * 10 / 417] += 1;
        }
        // Chi-square with 9 degrees of freedom; bins are 41 or 42 indices wide.
        let chi2: f64 = bins
            .iter()
            .enumerate()
            .map(|(b, &count)| {
                let width = ((b + 1) * 417).div_ceil(10) - (b * 417).div_ceil(10);
                let expected = draws as f64 * width as f64 / 417.0;
                (count as f64 - expected).powi(2) / expected
            })
            .sum();
        assert!(chi2 < 27.9, "chi2 {chi2} (p < 0.001 at 27.9)");
    }

    #[test]
    fn bf16_option_matches_diffsynth_rounding() {
        let s = sampler(SftConfig { bf16_timestep: true, ..SftConfig::default() });
        let mut distinct = std::collections::BTreeSet::new();
        for step in 0..20_000 {
            let d = s.draw_timestep(step);
            assert_eq!(d.timestep, round_to_bf16(s.scheduler.timesteps[d.index]));
            if d.index < 10 {
                assert_eq!((d.timestep, d.weight), (1000.0, 0.0));
            }
            distinct.insert(d.timestep.to_bits());
        }
        assert_eq!(distinct.len(), 294);
    }

    #[test]
    fn rejects_empty_boundaries() {
        assert!(SftSampler::new(SftConfig { min_boundary: 0.5, max_boundary: 0.5, ..SftConfig::default() }, 0).is_err());
        assert!(SftSampler::new(SftConfig { max_boundary: 1.5, ..SftConfig::default() }, 0).is_err());
    }

    #[test]
    fn boundaries_resolve_flags_then_expert_then_cache() {
        use crate::artifacts::{ExpertInfo, ExpertRole};
        let high = ExpertInfo { role: ExpertRole::HighNoise, min_timestep_boundary: 0.0, max_timestep_boundary: 0.417, switch_timestep: 875.0 };
        let b = |flags, expert, stored| resolve_boundaries(flags, expert, stored).map(|b| (b.min, b.max, b.source));
        assert_eq!(b((None, None), None, None).ok(), Some((0.0, 1.0, "the default")));
        assert_eq!(b((None, None), Some(&high), None).ok(), Some((0.0, 0.417, "the expert's manifest")));
        assert_eq!(b((None, None), None, Some((0.358, 1.0))).ok(), Some((0.358, 1.0, "the DiffSynth cache")));
        assert_eq!(b((None, None), Some(&high), Some((0.0, 0.417))).ok(), Some((0.0, 0.417, "the expert's manifest")));
        assert_eq!(b((Some(0.1), None), Some(&high), None).ok(), Some((0.1, 0.417, "the command line")));
        // A cache made for another range than the expert's: only both flags decide.
        assert!(b((None, Some(0.5)), Some(&high), Some((0.417, 1.0))).is_err());
        assert_eq!(b((Some(0.0), Some(0.5)), Some(&high), Some((0.417, 1.0))).ok(), Some((0.0, 0.5, "the command line")));
    }
}
