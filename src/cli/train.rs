//! `flowstep train`: fine-tune the LoRA on a cached dataset.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use flowstep::decode::Tile;
use flowstep::distributed::{Launch, Ranks};
use flowstep::eval::EvalConfig;
use flowstep::executor::AdamW;
use flowstep::lora_io::LoraFormat;
use flowstep::metrics::{Observer, Progress, TrainEvent};
use flowstep::runtime::Device;
use flowstep::optim::LrSchedule;
use flowstep::tensor_file::SaveDtype;
use flowstep::train::{Length, NonFinitePolicy, PairConfig, SamplingConfig, TrainConfig, train};

use super::{DeviceArgs, Globals, ModelArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Read flags from this TOML file: each key a flag's long name (`lr = 1e-4`,
    /// `grad-accum = 4`, `eval-data = "data/eval"`, `skip-bad-samples = true`); flags given on
    /// the command line override it. OUT/config.toml records every flag a run used, and
    /// `--resume --out OUT` reads it, so that nothing else needs repeating.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub model: ModelArgs,

    /// Dataset directory: one .safetensors per sample with `latents` [C,F,H,W], `context`
    /// [L,D] and the conditioning an I2V/TI2V model takes (`y`, `clip_feature`,
    /// `first_frame_latents`; see `python -m flowstep_export.data.convert_diffsynth` for DiffSynth caches).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,

    /// Output directory: metrics.jsonl, tensorboard/, checkpoints/, loras/ (a LoRA per
    /// checkpoint), loss.png and the final LoRA: lora.safetensors, or lora_high_noise /
    /// lora_low_noise.safetensors for a Wan2.2 A14B expert (both for a pair job).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Start from this LoRA file instead of lora_init.safetensors: ComfyUI, DiffSynth-Studio,
    /// diffusers/PEFT or musubi-tuner/kohya keys, rescaled to this export's alpha. It must
    /// have the export's rank and modules (--lora-targets of the export).
    #[arg(long, value_name = "FILE")]
    pub init_lora: Option<PathBuf>,

    /// The other expert of a Wan2.2 A14B pair (its artifacts directory), trained in the same
    /// job beside the expert of --artifacts (either role; the manifests say which is which):
    /// two LoRAs, two AdamW states, one checkpoint, OUT/lora_high_noise.safetensors and
    /// OUT/lora_low_noise.safetensors. Each sample's timestep, drawn over the whole table, picks
    /// the expert whose range holds it (DiffSynth's boundary, t ≥ 875 high noise for T2V);
    /// see --switch-expert-every. Both experts stay loaded.
    #[arg(long, value_name = "DIR", help_heading = "Wan2.2 expert pair")]
    pub expert_artifacts: Option<PathBuf>,

    /// Base checkpoint of the other expert when its artifacts do not ship one.
    #[arg(long, value_name = "FILE", requires = "expert_artifacts", help_heading = "Wan2.2 expert pair")]
    pub expert_base: Option<PathBuf>,

    /// Start the other expert from this LoRA file (as --init-lora for --artifacts).
    #[arg(long, value_name = "FILE", requires = "expert_artifacts", help_heading = "Wan2.2 expert pair")]
    pub expert_init_lora: Option<PathBuf>,

    /// Train the high-noise expert for N samples (micro-steps), then the low-noise one for N,
    /// and so on, each drawing timesteps only in its own range: ai-toolkit's
    /// switch_boundary_every. With N a multiple of --grad-accum each optimizer step trains
    /// one expert; with 1 and --grad-accum 2, every step trains both.
    #[arg(long, value_name = "N", requires = "expert_artifacts", help_heading = "Wan2.2 expert pair")]
    pub switch_expert_every: Option<u64>,

    /// Optimizer steps to run (each is --grad-accum samples).
    #[arg(long, conflicts_with = "epochs", value_name = "N")]
    pub steps: Option<u64>,

    /// Passes over the dataset (× --repeat) instead of --steps.
    #[arg(long, value_name = "E")]
    pub epochs: Option<u64>,

    /// Seed for timesteps, noise and data order; a run is reproducible from it.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Peak learning rate (DiffSynth default 1e-4).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,

    /// Learning-rate schedule: constant, warmup:N, cosine[:WARMUP[:MIN_RATIO]], or diffsynth
    /// (lr/3 for the first 5 steps, as DiffSynth-Studio's ConstantLR).
    #[arg(long, default_value = "constant", value_name = "SCHEDULE")]
    pub lr_schedule: LrSchedule,

    /// AdamW beta1.
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,

    /// AdamW beta2.
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f64,

    /// AdamW epsilon (added outside the square root, as torch).
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f64,

    /// AdamW decoupled weight decay (DiffSynth default 0.01).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,

    /// Clip the gradient to this total L2 norm before each update, as torch's clip_grad_norm_
    /// (the norm of the averaged gradient of all --grad-accum samples; factor
    /// X/(norm+1e-6), at most 1). Default off, as DiffSynth-Studio; musubi-tuner clips at
    /// 1.0 by default. metrics.jsonl then has grad_norm (before) and grad_norm_clipped.
    #[arg(long, value_name = "X")]
    pub max_grad_norm: Option<f64>,

    /// LoRA alpha: the update is (A/rank)·B·A, as musubi-tuner's --network_alpha and
    /// DiffSynth-Studio's --lora_alpha (rank and targets are fixed at export). Default: the
    /// export's alpha (`lora.alpha` in its manifest; alpha = rank unless exported with
    /// --lora-alpha). Recorded in the checkpoints and LoRA files; a resume keeps it.
    #[arg(long, value_name = "A")]
    pub lora_alpha: Option<f64>,

    /// Samples per optimizer step; gradients are summed in the graph and scaled by 1/K.
    #[arg(long, default_value_t = 1, value_name = "K")]
    pub grad_accum: usize,

    /// Visit each sample this many times per epoch (DiffSynth's dataset_repeat).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,

    #[command(flatten)]
    pub sft: super::SftArgs,

    /// Write a checkpoint every N steps (always one at the end).
    #[arg(long, value_name = "N")]
    pub save_every: Option<u64>,

    /// Keep only the newest N checkpoints (0 keeps all).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub keep_checkpoints: usize,

    /// Continue from the newest complete checkpoint in --out, bit-identically, with the flags
    /// of OUT/config.toml (or --config) and those given now; each flag that differs from
    /// OUT/config.toml is reported.
    #[arg(long)]
    pub resume: bool,

    /// With --resume: accept a changed --lr, --lr-schedule, --steps of a cosine schedule,
    /// --max-grad-norm or AdamW setting (otherwise refused); the change is printed and written to metrics.jsonl.
    #[arg(long, requires = "resume")]
    pub allow_changed_hyperparameters: bool,

    /// Held-out samples for a deterministic eval loss (before, every --eval-every, after).
    #[arg(long, value_name = "DIR")]
    pub eval_data: Option<PathBuf>,

    /// Evaluate every N steps (needs --eval-data).
    #[arg(long, value_name = "N")]
    pub eval_every: Option<u64>,

    /// Timesteps per eval sample, evenly spaced over the timestep boundaries the run trains.
    #[arg(long, default_value_t = 8)]
    pub eval_timesteps: usize,

    /// Write samples every N steps and after the last one, with the current LoRA, to
    /// OUT/samples/step-XXXXXX/ (latents, PNG contact sheet, GIF per prompt); 0 samples only
    /// after the last step. Sampling time is reported apart and never counted in the step
    /// times. Needs --sample-prompts.
    #[arg(long, value_name = "N", requires = "sample_prompts")]
    pub sample_every: Option<u64>,

    /// Prompts to sample, one per line (`#` lines are comments): text with musubi-tuner's
    /// options (`a fox runs --w 832 --h 480 --f 81 --s 30 --g 5 --d 42 --n NEGATIVE`, guidance 5
    /// and Wan's negative prompt by default, `--c FILE` the conditioning an image-to-video model
    /// needs; needs --text-encoder), or a context file (relative to this file) then optional
    /// seed=N shape=F,H,W steps=N cfg=X shift=X negative=FILE condition=FILE. The size defaults
    /// to the training data's largest bucket. Checked, and text encoded, before training starts.
    #[arg(long, value_name = "FILE", requires = "sample_every")]
    pub sample_prompts: Option<PathBuf>,

    /// Wan's umT5 text encoder exported by `python -m flowstep_export.pipeline.text_encoder`
    /// (this DIR holds text_encoder.json): encodes the text lines of --sample-prompts on the
    /// CPU once before the first step, then is freed.
    #[arg(long, value_name = "DIR", requires = "sample_prompts")]
    pub text_encoder: Option<PathBuf>,

    /// Euler steps per training-time sample, where a prompt line gives none.
    #[arg(long, default_value_t = 30, value_name = "N")]
    pub sample_steps: usize,

    /// Decode the training-time samples to RGB with Wan's VAE decoder exported by
    /// `python -m flowstep_export.pipeline.vae_decoder` (as `flowstep sample --vae-decoder`): each
    /// prompt's folder also gets videos.png (contact sheet), videos.gif and, when `ffmpeg` is
    /// on PATH, an MP4.
    #[arg(long, value_name = "DIR", requires = "sample_every")]
    pub vae_decoder: Option<PathBuf>,

    /// With --vae-decoder: decode in spatial tiles of H×W latent pixels overlapping by half
    /// (DiffSynth's tiled decode; its default is 30,52), which bounds the decoder's memory.
    #[arg(long, value_name = "H,W", requires = "vae_decoder", value_parser = Tile::parse)]
    pub vae_tile: Option<Tile>,

    /// Key layout of the final LoRA file: comfyui loads in ComfyUI, diffusers, musubi-tuner
    /// (convert_lora.py) and DiffSynth-Studio; diffsynth in DiffSynth-Studio only.
    #[arg(long, value_enum, default_value_t = LoraFormat::Comfyui)]
    pub lora_format: LoraFormat,

    /// Precision of the final LoRA file (training always keeps float32 master weights).
    #[arg(long, value_enum, default_value_t = SaveDtype::Bf16)]
    pub lora_dtype: SaveDtype,

    /// Name of the LoRA written with each checkpoint (and on Ctrl-C),
    /// OUT/loras/NAME-step-XXXXXX.safetensors, and its ss_output_name metadata, as musubi's
    /// output_name option. Default: the --out directory's name.
    #[arg(long, value_name = "NAME")]
    pub output_name: Option<String>,

    /// On a NaN/Inf loss or gradient: stop (default) or skip that step's update.
    #[arg(long, value_enum, default_value_t = NonFinitePolicy::Stop)]
    pub on_nonfinite: NonFinitePolicy,

    /// Skip samples containing NaN/Inf (counted in the summary) instead of stopping.
    #[arg(long)]
    pub skip_bad_samples: bool,

    /// Stop after N steps of this process, leaving a checkpoint (for testing resume).
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,

    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `resolved`: every flag's effective value (written to OUT/config.toml once the run may
/// start); `stored`: the OUT/config.toml this resume continues.
pub fn run(args: Args, resolved: toml::Table, stored: Option<(PathBuf, toml::Table)>, globals: &Globals) -> anyhow::Result<ExitCode> {
    if let Some((path, stored)) = &stored {
        for change in super::run_config::changes(stored, &resolved) {
            eprintln!("warning: resuming with a flag unlike {}: {change}", path.display());
        }
    }
    let launch = Launch::from_env()?;
    let mut device_args = args.device;
    // Rank r of a launch uses the GPU of its LOCAL_RANK.
    device_args.device = match device_args.device {
        Device::Cuda(_) if launch != Launch::Alone => Device::Cuda(launch.local_rank() as i32),
        Device::TensorRt(_) if launch != Launch::Alone => Device::TensorRt(launch.local_rank() as i32),
        other => other,
    };
    let session = super::init_runtime(globals, &device_args)?;
    let mut ranks = Ranks::join(&launch, session.device)?;
    let length = match (args.steps, args.epochs) {
        (Some(s), _) => Length::Steps(s),
        (None, Some(e)) => Length::Epochs(e),
        (None, None) => anyhow::bail!("give --steps N or --epochs E"),
    };
    // The expert's default boundaries: the manifest is read (and checked) again by the trainer.
    let artifacts = flowstep::artifacts::Artifacts::open(&args.model.artifacts)?;
    let (sft, boundaries) = args.sft.config(&artifacts.manifest, &args.data, args.expert_artifacts.is_some())?;
    if !globals.quiet && boundaries.source != "the default" {
        eprintln!("timestep boundaries [{}, {}) from {}", boundaries.min, boundaries.max, boundaries.source);
    }
    let config = TrainConfig {
        artifacts: args.model.artifacts,
        data: args.data,
        out: args.out,
        base: args.model.base,
        init_lora: args.init_lora,
        length,
        seed: args.seed,
        lr: args.lr,
        schedule: args.lr_schedule,
        adamw: AdamW { beta1: args.beta1, beta2: args.beta2, eps: args.eps, weight_decay: args.weight_decay },
        max_grad_norm: args.max_grad_norm,
        lora_alpha: args.lora_alpha,
        grad_accum: args.grad_accum,
        repeat: args.repeat,
        sft,
        save_every: args.save_every,
        keep_checkpoints: args.keep_checkpoints,
        resume: args.resume,
        allow_changed_hyperparameters: args.allow_changed_hyperparameters,
        eval_data: args.eval_data,
        eval_every: args.eval_every,
        eval: EvalConfig { timesteps: args.eval_timesteps, seed: args.seed },
        session,
        lora_format: args.lora_format,
        lora_dtype: args.lora_dtype,
        output_name: args.output_name,
        on_nonfinite: args.on_nonfinite,
        skip_bad_samples: args.skip_bad_samples,
        sampling: args.sample_every.zip(args.sample_prompts).map(|(every, prompts)| SamplingConfig {
            every,
            prompts,
            steps: args.sample_steps,
            text_encoder: args.text_encoder.clone(),
            vae_decoder: args.vae_decoder.clone(),
            vae_tile: args.vae_tile,
        }),
        stop_after: args.stop_after,
        pair: args.expert_artifacts.map(|artifacts| PairConfig {
            artifacts,
            base: args.expert_base,
            init_lora: args.expert_init_lora,
            switch_every: args.switch_expert_every,
        }),
        run_config: Some((super::run_config::FILE_NAME.into(), format!(
            "# Every `flowstep train` flag of this run; `flowstep train --resume --out OUT` reads it.\n{}",
            toml::to_string(&resolved)?
        ))),
    };
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&interrupt);
    // A second Ctrl-C while saving exits at once.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)");
    });
    let (rank, world_size) = (ranks.rank(), ranks.world_size());
    let mut progress = Progress::new(globals.quiet);
    let mut lines = RankLines { rank };
    let observer: &mut dyn Observer = if ranks.writes_files() { &mut progress } else { &mut lines };
    let summary = match train(&config, &mut ranks, &mut [observer], &interrupt) {
        Ok(summary) => summary,
        Err(e) if world_size > 1 => {
            flowstep::distributed::report_failure(&format!("rank {rank} of {world_size}: {e:#}"));
            // Every rank reaches the non-finite decision together and stops by itself; any
            // other failure is this rank's alone, and the others must not wait for it.
            if !e.is_shared_by_ranks() {
                ranks.abort();
            }
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e.into()),
    };
    if !ranks.writes_files() {
        return Ok(if summary.interrupted { ExitCode::from(130) } else { ExitCode::SUCCESS });
    }
    print_summary(&summary);
    if summary.interrupted {
        eprintln!("interrupted at step {}; resume with the same command plus --resume", summary.start_step + summary.steps);
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_summary(s: &flowstep::train::TrainSummary) {
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.5}"));
    eprintln!("── summary ─────────────────────────────────────");
    eprintln!("steps          {} → {} of {}", s.start_step, s.start_step + s.steps, s.total_steps);
    if s.world_size > 1 {
        eprintln!("ranks          {} (data parallel)", s.world_size);
    }
    eprintln!("loss           first {}  last-10 mean {}", fmt(s.first_loss), fmt(s.final_loss));
    if s.eval_before.is_some() || s.eval_after.is_some() {
        eprintln!("eval loss      before {}  after {}", fmt(s.eval_before), fmt(s.eval_after));
    }
    eprintln!("time           {:.1} s total, {:.3} s/step ({:.2} it/s), host work {:.1}%", s.seconds, s.seconds_per_step,
        if s.seconds_per_step > 0.0 { 1.0 / s.seconds_per_step } else { 0.0 }, 100.0 * s.host_fraction);
    let buckets: Vec<String> = s.buckets.iter().map(|b| format!("{} × {}", b.samples, b.latent_shape.iter().map(usize::to_string).collect::<Vec<_>>().join("×"))).collect();
    eprintln!("data           {} samples, latents [C×F×H×W] {}", s.buckets.iter().map(|b| b.samples).sum::<usize>(), buckets.join(", "));
    if let Some(bytes) = s.graph_peak_bytes {
        eprintln!("graph memory   {:.2} GB peak in use by the graphs' working tensors (ONNX Runtime arenas)", bytes as f64 / 1e9);
    }
    if s.skipped_steps + s.skipped_samples > 0 {
        eprintln!("skipped        {} steps (non-finite), {} samples (NaN/Inf)", s.skipped_steps, s.skipped_samples);
    }
    if !s.samples.is_empty() {
        eprintln!("samples        {} sets in {:.1} s (not in the step times), last {}", s.samples.len(), s.sample_seconds,
            s.samples.last().map(|p| p.display().to_string()).unwrap_or_default());
    }
    if let Some(p) = &s.lora {
        eprintln!("LoRA           {}", p.display());
    }
    for e in &s.experts {
        eprintln!("{:<14} {} steps ({} samples), loss first {}  last-10 mean {}", e.role, e.steps, e.micro_steps, fmt(e.first_loss), fmt(e.final_loss));
        if let Some(p) = &e.lora {
            eprintln!("  LoRA         {}", p.display());
        }
        if let Some(p) = &e.checkpoint_lora {
            eprintln!("  its LoRA     {}", p.display());
        }
    }
    if let Some(p) = &s.checkpoint {
        eprintln!("checkpoint     {}", p.display());
    }
    if let Some(p) = &s.checkpoint_lora {
        eprintln!("its LoRA       {}", p.display());
    }
    eprintln!("metrics        {}", s.metrics.display());
    if let Some(p) = &s.plot {
        eprintln!("loss curve     {}", p.display());
    }
}

/// What a rank other than 0 prints: its own messages and warnings, named by rank (rank 0
/// shows the progress and writes every file).
struct RankLines {
    rank: usize,
}

impl Observer for RankLines {
    fn on_event(&mut self, event: &TrainEvent<'_>) -> flowstep::Result<()> {
        match event {
            TrainEvent::Message(m) => eprintln!("rank {}: {m}", self.rank),
            TrainEvent::Warning(m) => eprintln!("rank {}: warning: {m}", self.rank),
            _ => {}
        }
        Ok(())
    }
}
