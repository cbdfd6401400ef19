//! Command-line surface (docs/DESIGN.md §7): global flags, one file per command.

mod allreduce_bench;
mod clean_prompts;
mod draws;
mod run_attention;
mod eval;
mod export_flags;
mod export_lora;
mod inspect;
mod run_config;
mod sample;
mod schedule;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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
    Train(Box<train::Args>),
    /// Deterministic validation loss of a LoRA on a dataset.
    Eval(eval::Args),
    /// Generate latent videos (Euler, optional guidance) with or without a LoRA, and draw them.
    Sample(Box<sample::Args>),
    /// Write the LoRA file of a training checkpoint (ComfyUI or DiffSynth layout).
    ExportLora(export_lora::Args),
    /// The timestep, noise and sample draws of a train run (for reference tests).
    #[command(hide = true)]
    Draws(draws::Args),
    /// Time the data-parallel gradient all-reduce across the launched ranks.
    #[command(hide = true)]
    AllreduceBench(allreduce_bench::Args),
    /// Prompts (JSON strings, one per line on stdin) cleaned as the text encoder cleans them.
    #[command(hide = true)]
    CleanPrompts(clean_prompts::Args),
    /// A graph of flowstep's attention operators on the CPU kernels (float32, for parity tests).
    #[command(hide = true)]
    RunAttention(run_attention::Args),
}

/// Global flags every command sees.
#[derive(Debug, Clone)]
pub struct Globals {
    pub ort_lib: Option<PathBuf>,
    pub verbose: u8,
    pub quiet: bool,
}

pub fn run() -> ExitCode {
    let expanded = match run_config::expand(std::env::args_os().collect()) {
        Ok(expanded) => expanded,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            return ExitCode::from(2);
        }
    };
    let parsed = Cli::command().try_get_matches_from(expanded.argv).and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(err) => match export_flags::hint(&err) {
            Some(line) => {
                eprintln!("error: {line}");
                // clap's status for a usage error.
                return ExitCode::from(2);
            }
            None => err.exit(),
        },
    };
    let globals = Globals { ort_lib: cli.ort_lib, verbose: cli.verbose, quiet: cli.quiet };
    let result = match cli.command {
        Command::Schedule(args) => schedule::run(args, &globals),
        Command::Inspect(args) => inspect::run(args, &globals),
        Command::Train(args) => {
            let given = matches.subcommand_matches("train").map(run_config::resolved).unwrap_or_default();
            train::run(*args, given, expanded.stored, &globals)
        }
        Command::Eval(args) => eval::run(args, &globals),
        Command::Sample(args) => sample::run(*args, &globals),
        Command::ExportLora(args) => export_lora::run(args, &globals),
        Command::Draws(args) => draws::run(args, &globals),
        Command::CleanPrompts(args) => clean_prompts::run(args),
        Command::RunAttention(args) => run_attention::run(args, &globals),
        Command::AllreduceBench(args) => allreduce_bench::run(args, &globals),
    };
    match result {
        Ok(code) => code,
        // `flowstep inspect | head`: the reader has all it wanted.
        Err(err) if err.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) => ExitCode::SUCCESS,
        Err(err) => {
            flowstep::distributed::report_failure(&one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: a library error's message often
/// already contains its source (`path: No such file`), and ONNX Runtime's has newlines.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(text.trim()) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line.split_whitespace().collect::<Vec<_>>().join(" ")
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

/// The options that shape a training step's draws (timestep, noise), shared by `train` and
/// the hidden `draws` so that both draw the same.
#[derive(Debug, Clone, clap::Args)]
pub struct SftArgs {
    /// Timestep shift of the Wan scheduler.
    #[arg(long, default_value_t = 5.0)]
    pub shift: f32,

    /// Lower timestep boundary in DiffSynth's units: a fraction of the training table, not σ
    /// (indices ⌊min·1000⌋ and up). Default: a Wan2.2 expert's own range from its manifest
    /// (low_noise: 0.417 for T2V-A14B, 0.358 for I2V-A14B), else the boundaries a converted
    /// DiffSynth cache was made with, else 0.
    #[arg(long, value_name = "FRACTION")]
    pub min_timestep_boundary: Option<f64>,

    /// Upper timestep boundary, exclusive (indices below ⌊max·1000⌋). Default: the expert's
    /// range (high_noise: 0.417, i.e. t ≥ 875, for T2V-A14B; 0.358, t ≥ 900, for I2V-A14B),
    /// else the DiffSynth cache's, else 1.
    #[arg(long, value_name = "FRACTION")]
    pub max_timestep_boundary: Option<f64>,

    /// Scale of the Gaussian noise ε.
    #[arg(long, default_value_t = 1.0)]
    pub noise_scale: f32,

    /// Round the timestep to bfloat16 as DiffSynth does (exact parity; default: exact float32).
    #[arg(long)]
    pub bf16_timestep: bool,

    /// How each step's timestep is drawn. uniform: DiffSynth-Studio's draw, a table index
    /// uniform in the timestep boundaries. The others are musubi-tuner's (30c658c4), each
    /// from one uniform variate through the normal quantile: sigmoid (t = sigmoid(scale·z)) and
    /// shift (that t shifted by --discrete-flow-shift) draw a continuous t with σ = t and the
    /// model fed 1000·t + 1, as musubi, t scaled into the boundaries' σ range; logit_normal is
    /// musubi's `--timestep_sampling sigma --weighting_scheme logit_normal`: table index
    /// ⌊sigmoid(mean + std·z)·(range)⌋ within the boundaries (musubi's table is unshifted: pass
    /// --shift 1 for its exact σ).
    #[arg(long, value_enum, default_value = "uniform", value_name = "MODE")]
    pub timestep_sampling: flowstep::timesteps::SamplingMode,

    /// sigmoid and shift: the scale of z in sigmoid(scale·z) (musubi's default 1).
    #[arg(long, value_name = "X")]
    pub sigmoid_scale: Option<f64>,

    /// shift: the shift applied to the sigmoid draw, t' = s·t/(1 + (s − 1)·t) (musubi's
    /// default 1; musubi's Wan guides use 3). Not --shift, which shapes DiffSynth's table.
    #[arg(long, value_name = "S")]
    pub discrete_flow_shift: Option<f64>,

    /// logit_normal: the mean of the normal before the sigmoid (default 0).
    #[arg(long, value_name = "M", allow_negative_numbers = true)]
    pub logit_mean: Option<f64>,

    /// logit_normal: its standard deviation (default 1).
    #[arg(long, value_name = "S")]
    pub logit_std: Option<f64>,

    /// The loss weight w(t): diffsynth (DiffSynth's table weight of the timestep's entry) or
    /// none (1, musubi-tuner's weighting_scheme none). Default: diffsynth with uniform, so that
    /// the default step is DiffSynth's exactly; none with musubi's modes, as musubi.
    #[arg(long, value_enum, value_name = "W")]
    pub loss_weighting: Option<flowstep::timesteps::LossWeighting>,
}

impl SftArgs {
    /// The draws' settings for these artifacts and dataset: boundaries from the flags, else
    /// the expert's manifest, else the dataset's DiffSynth cache (`sft::resolve_boundaries`).
    /// `pair`: a pair job, which draws over the whole table (each expert keeps its manifest's
    /// range), so boundary flags and a cache's boundaries are refused.
    pub fn config(&self, manifest: &flowstep::artifacts::Manifest, data: &std::path::Path, pair: bool) -> anyhow::Result<(flowstep::sft::SftConfig, flowstep::sft::Boundaries)> {
        let stored = flowstep::data::stored_boundaries(data)?;
        let flags = (self.min_timestep_boundary, self.max_timestep_boundary);
        if pair {
            let flag = if flags.0.is_some() { Some("--min-timestep-boundary") } else { flags.1.map(|_| "--max-timestep-boundary") };
            if let Some(flag) = flag {
                anyhow::bail!("{flag}: a pair job (--expert-artifacts) trains each expert over its own manifest's range; leave it out");
            }
            if let Some((lo, hi)) = stored.filter(|&s| s != (0.0, 1.0)) {
                anyhow::bail!("--data {}: cached by DiffSynth for timestep boundaries [{lo}, {hi}) (diffsynth_boundaries.json), one expert's range; a pair job trains both experts over [0, 1)", data.display());
            }
        }
        let expert = manifest.expert.as_ref().filter(|_| !pair);
        let b = flowstep::sft::resolve_boundaries(flags, expert, stored)?;
        let params = flowstep::timesteps::SamplingParams {
            sigmoid_scale: self.sigmoid_scale,
            discrete_flow_shift: self.discrete_flow_shift,
            logit_mean: self.logit_mean,
            logit_std: self.logit_std,
        };
        let sampling = flowstep::timesteps::TimestepSampling::from_flags(self.timestep_sampling, params)?;
        let config = flowstep::sft::SftConfig {
            shift: self.shift,
            min_boundary: b.min,
            max_boundary: b.max,
            noise_scale: self.noise_scale,
            bf16_timestep: self.bf16_timestep,
            sampling,
            loss_weighting: self.loss_weighting.unwrap_or(flowstep::timesteps::LossWeighting::default_for(&sampling)),
            ..flowstep::sft::SftConfig::default()
        };
        Ok((config, b))
    }
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

    /// On cuda/tensorrt: let nodes the GPU provider has no kernel for run on the CPU. By
    /// default such a graph is refused at load, naming the nodes (a CPU round trip per step
    /// is a silent slowdown); shape arithmetic that ONNX Runtime keeps on the CPU by design
    /// is always allowed.
    #[arg(long, help_heading = "GPU options")]
    pub allow_cpu_fallback: bool,

    /// On cuda: grow ONNX Runtime's memory arena in powers of two instead of by exactly what
    /// is requested. Exact growth (the default) keeps the arena close to the live peak.
    #[arg(long, help_heading = "GPU options")]
    pub arena_power_of_two: bool,

    /// On cuda: the most GPU memory ONNX Runtime's arena may take, in GiB.
    #[arg(long, value_name = "GIB", help_heading = "GPU options")]
    pub gpu_mem_limit: Option<f64>,

    /// On cuda: TensorFloat-32 matmuls in float32 graphs (faster, ~10 mantissa bits). Off by
    /// default, as PyTorch's matmuls are; bfloat16 exports do not use it.
    #[arg(long, help_heading = "GPU options")]
    pub tf32: bool,
}

/// More threads than this is a typo, and spawning them would exhaust the process.
const MAX_THREADS: usize = 1024;

/// Loads ONNX Runtime (once) and returns the session options for the device.
pub fn init_runtime(globals: &Globals, device: &DeviceArgs) -> anyhow::Result<flowstep::runtime::SessionOptions> {
    if let Some(t) = device.threads {
        anyhow::ensure!((1..=MAX_THREADS).contains(&t), "--threads: must be 1 to {MAX_THREADS}, got {t}");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if t > cores && !globals.quiet {
            eprintln!("warning: --threads {t} is more than the {cores} cores this process may use; ONNX Runtime's threads will contend and steps can be many times slower");
        }
    }
    if let Some(prefix) = &device.ort_profile {
        // ONNX Runtime writes PREFIX_<time>.json when the session ends, and says nothing if it cannot.
        let dir = prefix.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        anyhow::ensure!(dir.is_dir(), "--ort-profile {}: directory {} does not exist", prefix.display(), dir.display());
    }
    let lib = flowstep::runtime::init(globals.ort_lib.as_deref(), device.device.is_gpu(), device.threads)?;
    if globals.verbose > 0 {
        eprintln!("ONNX Runtime: {} (found by {})", lib.path.display(), lib.found_by);
    }
    if let Some(t) = device.threads {
        // The host-side work (noise, x_t, target) uses the same budget.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(t).build_global();
    }
    let memory_limit = match device.gpu_mem_limit {
        Some(gib) if !(gib.is_finite() && gib > 0.0 && gib < 1e6) => anyhow::bail!("--gpu-mem-limit must be a positive number of GiB, got {gib}"),
        Some(gib) => Some((gib * (1u64 << 30) as f64) as usize),
        None => None,
    };
    Ok(flowstep::runtime::SessionOptions {
        device: device.device,
        threads: device.threads,
        profile: device.ort_profile.clone(),
        cuda: flowstep::runtime::CudaOptions { arena_exact: !device.arena_power_of_two, memory_limit, tf32: device.tf32 },
        allow_cpu_fallback: device.allow_cpu_fallback,
        disabled_optimizers: Vec::new(),
        attention: flowstep::runtime::AttentionImpl::Chunked,
    })
}
