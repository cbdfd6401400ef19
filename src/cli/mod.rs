//! Command-line surface (DESIGN.md §7): global flags, one file per command.

mod draws;
mod eval;
mod inspect;
mod sample;
mod schedule;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// LoRA fine-tuning of the Wan video diffusion transformer on ONNX Runtime.
///
/// Export the model once with `python -m flowstep_export`, then train, evaluate and
/// sample with this binary on the CPU, CUDA or TensorRT execution provider.
#[derive(Debug, Parser)]
#[command(name = "flowstep", version, max_term_width = 100)]
pub struct Cli {
    /// ONNX Runtime shared library to load (libonnxruntime.so). Otherwise flowstep tries
    /// ORT_DYLIB_PATH, the executable's directory, then .ort/{cpu,gpu}/ from scripts/setup_ort.sh.
    #[arg(long, global = true, value_name = "PATH", help_heading = "Global options")]
    pub ort_lib: Option<PathBuf>,

    /// More output (repeat for more): per-step lines, ONNX Runtime details.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet", help_heading = "Global options")]
    pub verbose: u8,

    /// Only errors and the final summary; no progress bar.
    #[arg(short, long, global = true, help_heading = "Global options")]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the training timestep schedule: sigma, timestep and loss weight per index.
    Schedule(schedule::Args),
    /// Validate an artifacts directory (manifest, sha256s, graph inputs) and summarise it.
    Inspect(inspect::Args),
    /// Fine-tune the LoRA on a cached dataset (latents + text embeddings).
    Train(train::Args),
    /// Deterministic validation loss of a LoRA on a dataset.
    Eval(eval::Args),
    /// Generate latent videos (Euler, optional guidance) with or without a LoRA, and draw them.
    Sample(sample::Args),
    /// The timestep, noise and sample draws of a train run (for reference tests).
    #[command(hide = true)]
    Draws(draws::Args),
}

/// Global flags every command sees.
#[derive(Debug, Clone)]
pub struct Globals {
    pub ort_lib: Option<PathBuf>,
    pub verbose: u8,
    pub quiet: bool,
}

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let globals = Globals { ort_lib: cli.ort_lib, verbose: cli.verbose, quiet: cli.quiet };
    let result = match cli.command {
        Command::Schedule(args) => schedule::run(args, &globals),
        Command::Inspect(args) => inspect::run(args, &globals),
        Command::Train(args) => train::run(args, &globals),
        Command::Eval(args) => eval::run(args, &globals),
        Command::Sample(args) => sample::run(args, &globals),
        Command::Draws(args) => draws::run(args, &globals),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The exported model: shared by every command that runs it.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Artifacts directory written by `python -m flowstep_export` (manifest.json, graphs).
    #[arg(long, value_name = "DIR")]
    pub artifacts: PathBuf,

    /// Base Wan checkpoint (.safetensors) when the artifacts do not ship base weights.
    #[arg(long, value_name = "FILE")]
    pub base: Option<PathBuf>,
}

/// Where the graphs run; shared by every command that runs them.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// Execution provider: cpu, cuda[:N] or tensorrt[:N]. A GPU provider that cannot load
    /// is an error, never a silent fall back to CPU.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: flowstep::runtime::Device,

    /// Intra-op threads for ONNX Runtime (default: all physical cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Write an ONNX Runtime profile (JSON) with this file prefix.
    #[arg(long, value_name = "PREFIX", hide_short_help = true)]
    pub ort_profile: Option<PathBuf>,
}

/// Loads ONNX Runtime (once) and returns the session options for the device.
pub fn init_runtime(globals: &Globals, device: &DeviceArgs) -> anyhow::Result<flowstep::runtime::SessionOptions> {
    let lib = flowstep::runtime::init(globals.ort_lib.as_deref(), device.device.is_gpu())?;
    if globals.verbose > 0 {
        eprintln!("ONNX Runtime: {} (found by {})", lib.path.display(), lib.found_by);
    }
    if device.threads == Some(0) {
        anyhow::bail!("--threads must be at least 1");
    }
    if let Some(t) = device.threads {
        // The host-side work (noise, x_t, target) uses the same budget.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(t).build_global();
    }
    Ok(flowstep::runtime::SessionOptions { device: device.device, threads: device.threads, profile: device.ort_profile.clone() })
}
