//! Learning-rate schedules, indexed by optimizer step (0-based).

use std::fmt;
use std::str::FromStr;

/// How the learning rate moves over the run.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum LrSchedule {
    /// `lr` at every step.
    Constant,
    /// Linear from lr/warmup to lr over `warmup` steps, then constant.
    Warmup { warmup: u64 },
    /// Linear warm-up, then cosine decay to `min_ratio·lr` at the last step.
    Cosine { warmup: u64, min_ratio: f64 },
    /// DiffSynth-Studio's `ConstantLR` with torch defaults: lr/3 for 5 steps, then lr.
    Diffsynth,
}

impl LrSchedule {
    pub fn lr(&self, base: f64, step: u64, total: u64) -> f64 {
        match *self {
            LrSchedule::Constant => base,
            LrSchedule::Warmup { warmup } => warm(base, step, warmup),
            LrSchedule::Cosine { warmup, min_ratio } => {
                if step < warmup {
                    return warm(base, step, warmup);
                }
                let span = total.saturating_sub(warmup).max(1) as f64;
                let progress = ((step - warmup) as f64 / span).min(1.0);
                let min = base * min_ratio;
                min + (base - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            LrSchedule::Diffsynth => {
                if step < 5 {
                    base * (1.0 / 3.0)
                } else {
                    base
                }
            }
        }
    }
}

fn warm(base: f64, step: u64, warmup: u64) -> f64 {
    if step < warmup { base * (step + 1) as f64 / warmup as f64 } else { base }
}

impl fmt::Display for LrSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LrSchedule::Constant => write!(f, "constant"),
            LrSchedule::Warmup { warmup } => write!(f, "warmup:{warmup}"),
            LrSchedule::Cosine { warmup, min_ratio } => write!(f, "cosine:{warmup}:{min_ratio}"),
            LrSchedule::Diffsynth => write!(f, "diffsynth"),
        }
    }
}

impl FromStr for LrSchedule {
    type Err = String;

    /// `constant`, `warmup:N`, `cosine[:N[:MIN_RATIO]]`, `diffsynth`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let num = |i: usize, default: &str| parts.get(i).copied().unwrap_or(default).to_string();
        let bad = || format!("bad schedule `{s}`: expected constant, warmup:N, cosine[:N[:MIN_RATIO]] or diffsynth");
        match parts[0] {
            "constant" if parts.len() == 1 => Ok(LrSchedule::Constant),
            "diffsynth" if parts.len() == 1 => Ok(LrSchedule::Diffsynth),
            "warmup" if parts.len() == 2 => Ok(LrSchedule::Warmup { warmup: num(1, "0").parse().map_err(|_| bad())? }),
            "cosine" if parts.len() <= 3 => {
                let min_ratio: f64 = num(2, "0").parse().map_err(|_| bad())?;
                // NaN or a negative ratio would give NaN or negative learning rates late in the run.
                if !(0.0..=1.0).contains(&min_ratio) {
                    return Err(format!("bad schedule `{s}`: MIN_RATIO must be in [0, 1]"));
                }
                Ok(LrSchedule::Cosine { warmup: num(1, "0").parse().map_err(|_| bad())?, min_ratio })
            }
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        assert_eq!(LrSchedule::Constant.lr(1e-4, 50, 100), 1e-4);
        let d = LrSchedule::Diffsynth;
        let lrs: Vec<f64> = (0..7).map(|s| d.lr(3e-4, s, 100)).collect();
        for (got, want) in lrs.iter().zip([1e-4, 1e-4, 1e-4, 1e-4, 1e-4, 3e-4, 3e-4]) {
            assert!((got - want).abs() < 1e-15, "{lrs:?}");
        }
        let w = LrSchedule::Warmup { warmup: 4 };
        assert_eq!(w.lr(1.0, 0, 10), 0.25);
        assert_eq!(w.lr(1.0, 3, 10), 1.0);
        let c = LrSchedule::Cosine { warmup: 0, min_ratio: 0.1 };
        assert!((c.lr(1.0, 0, 100) - 1.0).abs() < 1e-12);
        assert!((c.lr(1.0, 50, 100) - 0.55).abs() < 1e-12);
        assert!((c.lr(1.0, 100, 100) - 0.1).abs() < 1e-12);
        for s in ["constant", "warmup:10", "cosine:5:0.1", "diffsynth"] {
            let parsed: LrSchedule = s.parse().unwrap_or(LrSchedule::Constant);
            assert_eq!(parsed.to_string().split(':').next(), s.split(':').next());
        }
        for bad in ["cosine:x", "cosine:0:NaN", "cosine:0:-0.5", "cosine:0:2", "warmup:-1", "constant:1"] {
            assert!(bad.parse::<LrSchedule>().is_err(), "{bad}");
        }
    }
}
