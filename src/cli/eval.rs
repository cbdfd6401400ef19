//! `flowstep eval`: a deterministic validation loss for a LoRA (or none).

use std::path::PathBuf;
use std::process::ExitCode;

use flowstep::artifacts::Artifacts;
use flowstep::data::{Dataset, SampleSpec};
use flowstep::eval::{EvalConfig, evaluate};
use flowstep::executor::{DeviceMemory, LossGraph, load_base_weights};
use flowstep::lora_io;
use flowstep::sft::{SftConfig, SftSampler};

use super::{DeviceArgs, Globals, ModelArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Dataset directory (same format as for train).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,

    /// LoRA file to evaluate (DiffSynth or ComfyUI keys); default: the export's initial
    /// LoRA, which equals the base model (B = 0).
    #[arg(long, value_name = "FILE")]
    pub lora: Option<PathBuf>,

    /// Noise seed; the same seed gives the same number every run.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Timesteps per sample, evenly spaced over the 1000-step table.
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
    let session = super::init_runtime(globals, &args.device)?;
    let artifacts = Artifacts::open(&args.model.artifacts)?;
    let m = &artifacts.manifest;
    let dataset = Dataset::open(&args.data, SampleSpec::for_model(&m.model))?;
    let lora_path = artifacts.lora_file(args.lora.as_deref());
    let flat = lora_io::load(&lora_path, &m.lora)?;
    let memory = DeviceMemory::new(session.device);
    let base = load_base_weights(&artifacts, args.model.base.as_deref(), &memory)?;
    let mut graph = LossGraph::load(&artifacts, &session, &base)?;
    let params = memory.tensor(&[flat.len()], &flat)?;
    let sampler = SftSampler::new(SftConfig { shift: args.shift, ..SftConfig::default() }, args.seed)?;
    let result = evaluate(&mut graph, &params, &dataset, &sampler, &EvalConfig { timesteps: args.timesteps, seed: args.seed })?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!("eval loss {:.6} over {} samples × {} timesteps ({})", result.eval_loss, result.samples, result.timesteps, lora_path.display());
        for (t, l) in &result.per_timestep {
            println!("  t = {t:>8.2}  loss {l:.6}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
