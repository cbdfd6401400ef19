//! `flowstep schedule`: the timestep table, as text, CSV or a plot.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use flowstep::plot::{Panel, Series, draw_panels};
use flowstep::scheduler::{DEFAULT_SHIFT, FlowMatchScheduler, NUM_TRAIN_TIMESTEPS};
use plotters::style::RGBColor;

use super::Globals;

/// A table is printed whole; a million rows is already more than anyone reads.
const MAX_STEPS: usize = 1_000_000;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of timesteps in the table (training uses 1000).
    #[arg(long, default_value_t = NUM_TRAIN_TIMESTEPS, value_parser = clap::value_parser!(usize))]
    pub steps: usize,

    /// Timestep shift s: σ' = s·σ / (1 + (s-1)·σ). Wan uses 5.
    #[arg(long, default_value_t = DEFAULT_SHIFT)]
    pub shift: f32,

    /// Start the table at σ = D instead of 1 (image-to-image style partial denoising).
    #[arg(long, default_value_t = 1.0)]
    pub denoising_strength: f64,

    /// Print CSV with the header `index,sigma,timestep,weight` instead of aligned columns.
    #[arg(long)]
    pub csv: bool,

    /// Also draw w(t) against t and σ against the index into this PNG.
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
}

pub fn run(args: Args, _globals: &Globals) -> anyhow::Result<ExitCode> {
    // The loss weight subtracts the table's smallest value and divides by the sum: with one
    // timestep DiffSynth's formula is 0 · (1/0), NaN.
    anyhow::ensure!(args.steps != 1, "--steps: must be at least 2; the loss weight w(t) is normalised over the table, and with one timestep DiffSynth's formula gives 0/0 (NaN)");
    anyhow::ensure!((2..=MAX_STEPS).contains(&args.steps), "--steps: must be 2 to {MAX_STEPS}, got {}", args.steps);
    anyhow::ensure!(args.shift.is_finite() && args.shift > 0.0, "--shift must be a positive number");
    anyhow::ensure!(
        args.denoising_strength > 0.0 && args.denoising_strength <= 1.0,
        "--denoising-strength must be in (0, 1]"
    );
    let s = FlowMatchScheduler::training(args.steps, args.denoising_strength, args.shift);
    let weights = s.weights.clone().unwrap_or_default();
    // Likewise when every timestep rounds to one value (a denoising strength near 0): the
    // weights have no spread to normalise by.
    anyhow::ensure!(
        weights.iter().all(|w| w.is_finite()),
        "--steps {} with --denoising-strength {}: the loss weights are undefined (every timestep of the table is {}; they need at least two distinct timesteps)",
        args.steps, args.denoising_strength, s.timesteps[0]
    );
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.csv {
        writeln!(out, "index,sigma,timestep,weight")?;
        for (i, ((sigma, t), w)) in s.sigmas.iter().zip(&s.timesteps).zip(&weights).enumerate() {
            writeln!(out, "{i},{sigma},{t},{w}")?;
        }
    } else {
        writeln!(out, "{:>6}  {:>12}  {:>12}  {:>12}", "index", "sigma", "timestep", "weight")?;
        for (i, ((sigma, t), w)) in s.sigmas.iter().zip(&s.timesteps).zip(&weights).enumerate() {
            writeln!(out, "{i:>6}  {sigma:>12.7}  {t:>12.5}  {w:>12.7}")?;
        }
    }
    out.flush()?;
    if let Some(path) = &args.plot {
        let weight_curve = Series {
            label: "w(t)",
            points: s.timesteps.iter().zip(&weights).map(|(&t, &w)| (t as f64, w as f64)).collect(),
            color: RGBColor(31, 119, 180),
        };
        let sigma_curve = Series {
            label: "σ",
            points: s.sigmas.iter().enumerate().map(|(i, &v)| (i as f64, v as f64)).collect(),
            color: RGBColor(214, 39, 40),
        };
        let title_w = format!("loss weight w(t), N={}, shift {}", args.steps, args.shift);
        draw_panels(
            path,
            &[
                Panel { title: &title_w, x_label: "timestep t", y_label: "w(t)", series: vec![weight_curve], log_y: false },
                Panel { title: "sigma by index (uniformly sampled)", x_label: "index", y_label: "σ", series: vec![sigma_curve], log_y: false },
            ],
            640,
            420,
        )
        .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
