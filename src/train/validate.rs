//! Checks of a training configuration before any work starts: every numeric option is in
//! its range and every count product fits, and a bad value is an error naming its flag.

use super::{Length, TrainConfig};
use crate::artifacts::{LoraInfo, Manifest};
use crate::data::DataOrder;
use crate::error::{Error, Result};
use crate::optim::LrSchedule;

/// The data order shuffles `samples × --repeat` slots per epoch; past this it is no
/// longer a dataset but a memory abort.
const MAX_EPOCH_SLOTS: usize = 1 << 24;

fn positive(flag: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 { Ok(()) } else { Err(Error::flag(flag, format!("must be a positive number, got {value}"))) }
}

fn unit(flag: &'static str, value: f64) -> Result<()> {
    if (0.0..1.0).contains(&value) { Ok(()) } else { Err(Error::flag(flag, format!("must be in [0, 1), got {value}"))) }
}

fn at_least_one(flag: &'static str, value: u64) -> Result<()> {
    if value >= 1 { Ok(()) } else { Err(Error::flag(flag, "must be at least 1")) }
}

impl TrainConfig {
    /// Everything that can be checked without opening a file.
    pub fn validate(&self) -> Result<()> {
        positive("--lr", self.lr)?;
        check_schedule(&self.schedule)?;
        unit("--beta1", self.adamw.beta1)?;
        unit("--beta2", self.adamw.beta2)?;
        positive("--eps", self.adamw.eps)?;
        let wd = self.adamw.weight_decay;
        if !(wd.is_finite() && wd >= 0.0) {
            return Err(Error::flag("--weight-decay", format!("must be a number ≥ 0, got {wd}")));
        }
        if let Some(max) = self.max_grad_norm {
            positive("--max-grad-norm", max)?;
        }
        if let Some(alpha) = self.lora_alpha {
            positive("--lora-alpha", alpha)?;
        }
        at_least_one("--grad-accum", self.grad_accum as u64)?;
        at_least_one("--repeat", self.repeat as u64)?;
        match self.length {
            Length::Steps(n) => at_least_one("--steps", n)?,
            Length::Epochs(n) => at_least_one("--epochs", n)?,
        }
        positive("--shift", self.sft.shift as f64)?;
        let noise = self.sft.noise_scale;
        if !(noise.is_finite() && noise >= 0.0) {
            return Err(Error::flag("--noise-scale", format!("must be a number ≥ 0, got {noise}")));
        }
        let (lo, hi) = (self.sft.min_boundary, self.sft.max_boundary);
        if !(0.0..=1.0).contains(&lo) {
            return Err(Error::flag("--min-timestep-boundary", format!("must be in [0, 1], got {lo}")));
        }
        if !(0.0..=1.0).contains(&hi) || hi <= lo {
            return Err(Error::flag("--max-timestep-boundary", format!("must be in ({lo}, 1], got {hi}")));
        }
        if let Some(n) = self.save_every {
            at_least_one("--save-every", n)?;
        }
        if let Some(n) = self.eval_every {
            at_least_one("--eval-every", n)?;
            if self.eval_data.is_none() {
                return Err(Error::flag("--eval-every", "needs --eval-data"));
            }
        }
        if let Some(sampling) = &self.sampling
            && !(1..=super::samples::MAX_SAMPLE_STEPS).contains(&sampling.steps)
        {
            return Err(Error::flag("--sample-steps", format!("must be 1 to {}, got {}", super::samples::MAX_SAMPLE_STEPS, sampling.steps)));
        }
        if let Some(name) = &self.output_name {
            check_output_name(name)?;
        }
        if let Some(n) = self.pair.as_ref().and_then(|p| p.switch_every) {
            at_least_one("--switch-expert-every", n)?;
        }
        if !(1..=crate::scheduler::NUM_TRAIN_TIMESTEPS).contains(&self.eval.timesteps) {
            return Err(Error::flag("--eval-timesteps", format!("must be 1 to {}, got {}", crate::scheduler::NUM_TRAIN_TIMESTEPS, self.eval.timesteps)));
        }
        Ok(())
    }

    /// The export's LoRA layout with this run's alpha: `--lora-alpha`, else the export's.
    pub(super) fn lora(&self, manifest: &Manifest) -> LoraInfo {
        manifest.lora.with_alpha(self.lora_alpha.unwrap_or(manifest.lora.alpha))
    }

    /// The data order and the run's length in optimizer steps for a dataset of
    /// `dataset_len` samples; products that overflow (or would not fit in memory) are
    /// errors naming the flag that makes them so.
    pub(super) fn plan(&self, dataset_len: usize) -> Result<(DataOrder, u64)> {
        let slots = dataset_len.checked_mul(self.repeat).filter(|&s| s <= MAX_EPOCH_SLOTS).ok_or_else(|| {
            Error::flag("--repeat", format!("{} × {dataset_len} samples is more than {MAX_EPOCH_SLOTS} samples per epoch", self.repeat))
        })?;
        let order = DataOrder { seed: self.seed, len: dataset_len, repeat: self.repeat };
        let total = match self.length {
            Length::Steps(n) => n,
            // Samples flow across epoch boundaries (a step may span two), so E passes are
            // ⌈E·len·repeat / K⌉ steps: every sample of every pass, at most K-1 more.
            Length::Epochs(e) => e
                .checked_mul(slots as u64)
                .map(|samples| samples.div_ceil(self.grad_accum as u64))
                .ok_or_else(|| Error::flag("--epochs", format!("{e} epochs of {slots} samples overflow the sample counter")))?,
        };
        if total.checked_mul(self.grad_accum as u64).is_none() {
            return Err(Error::flag("--grad-accum", format!("{total} steps × {} samples overflow the sample counter", self.grad_accum)));
        }
        Ok((order, total))
    }
}

/// `--output-name` becomes part of file names in `OUT/loras/`: one plain name, no path.
fn check_output_name(name: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::flag("--output-name", format!("{why}, got {name:?}")));
    if name.is_empty() || name.len() > 200 {
        return bad("must be 1 to 200 bytes");
    }
    if name.starts_with('.') || name.chars().any(|c| matches!(c, '/' | '\\') || c.is_control()) {
        return bad("must be a file name without path separators, control characters or a leading dot");
    }
    Ok(())
}

/// Every learning rate a schedule gives is a positive multiple of `--lr`.
fn check_schedule(schedule: &LrSchedule) -> Result<()> {
    if let LrSchedule::Cosine { min_ratio, .. } = schedule
        && !(0.0..=1.0).contains(min_ratio)
    {
        return Err(Error::flag("--lr-schedule", format!("cosine MIN_RATIO must be in [0, 1], got {min_ratio}")));
    }
    Ok(())
}
