//! Command-line surface (DESIGN.md §7): global flags, one file per command.

mod schedule;

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
    #[arg(long, global = true, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,

    /// More output (repeat for more): per-step lines, ONNX Runtime details.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Only errors and the final summary; no progress bar.
    #[arg(short, long, global = true)]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the training timestep schedule: sigma, timestep and loss weight per index.
    Schedule(schedule::Args),
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
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
