//! `flowstep eval`: a deterministic validation loss for a LoRA (or none).

use std::path::PathBuf;
use std::process::ExitCode;

use flowstep::artifacts::Artifacts;
use flowstep::data::{Dataset, SampleSpec};
use flowstep::eval::{EvalConfig, evaluate};
use flowstep::executor::{LossGraph, WithLora};
use flowstep::sft::{SftConfig, SftSampler};

use super::{DeviceArgs, Globals, ModelArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Dataset directory (same format as for train).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,

    /// LoRA file to evaluate (ComfyUI, DiffSynth-Studio, diffusers/PEFT or musubi-tuner/kohya
    /// keys); default: the export's initial
    /// LoRA, which equals the base model (B = 0).
    #[arg(long, value_name = "FILE")]
    pub lora: Option<PathBuf>,

    /// Noise seed; the same seed gives the same number every run.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Timesteps per sample, evenly spaced over the 1000-step table (a Wan2.2 expert: over its
    /// own range from the manifest).
    #[arg(long, default_value_t = 8)]
    pub timesteps: usize,

    /// Timestep shift of the Wan scheduler.
    #[arg(long, default_value_t = 5.0)]
    pub shift: f32,

    /// Print one JSON object {"eval_loss", "samples", "timesteps", "per_timestep"} on stdout.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: Args, globals: &Globals) -> anyhow::Result<ExitCode> {
    let max = flowstep::scheduler::NUM_TRAIN_TIMESTEPS;
    anyhow::ensure!((1..=max).contains(&args.timesteps), "--timesteps: must be 1 to {max}, got {}", args.timesteps);
    anyhow::ensure!(args.shift.is_finite() && args.shift > 0.0, "--shift: must be a positive number, got {}", args.shift);
    let session = super::init_runtime(globals, &args.device)?;
    let artifacts = Artifacts::open(&args.model.artifacts)?;
    let m = &artifacts.manifest;
    // Refuse a device without kernels for these graphs before reading any input.
    session.for_artifacts(m)?;
    let dataset = Dataset::open(&args.data, SampleSpec::for_model(&m.model))?;
    let mut model = WithLora::<LossGraph>::load(&artifacts, &session, args.model.base.as_deref(), args.lora.as_deref())?;
    // A Wan2.2 expert is evaluated on its own timestep range.
    let (min_boundary, max_boundary) = m.expert.as_ref().map_or((0.0, 1.0), |e| (e.min_timestep_boundary, e.max_timestep_boundary));
    let sampler = SftSampler::new(SftConfig { shift: args.shift, min_boundary, max_boundary, ..SftConfig::default() }, args.seed)?;
    let result = evaluate(&mut model.graph, &model.params, &dataset, &sampler, &EvalConfig { timesteps: args.timesteps, seed: args.seed })?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!("eval loss {:.6} over {} samples × {} timesteps ({})", result.eval_loss, result.samples, result.timesteps, model.lora.display());
        for (t, l) in &result.per_timestep {
            println!("  t = {t:>8.2}  loss {l:.6}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
