//! `flowstep sample`: generate latent videos with the inference graph, draw them, and decode
//! them to RGB frames with Wan's VAE decoder when one is given.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use flowstep::artifacts::{Artifacts, ExpertRole, Manifest};
use flowstep::decode::{Tile, VaeDecoder, VideoOptions};
use flowstep::executor::{VelocityGraph, WithLora};
use flowstep::render::{centroid_motion, mean_rgb};
use flowstep::sample::{DEFAULT_SHIFT, SampleConfig, Stage, read_conditioning, read_context, sample, write_outputs};
use flowstep::tensor_file::{Staging, write_atomic};
use flowstep::video_files::Mp4;

use super::{DeviceArgs, Globals, ModelArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// LoRA file to apply (ComfyUI, DiffSynth-Studio, diffusers/PEFT or musubi-tuner/kohya
    /// keys); default: none (the base model).
    #[arg(long, value_name = "FILE")]
    pub lora: Option<PathBuf>,

    /// Prompt: a .safetensors file with a `context` tensor [L, D] (text-encoder output).
    #[arg(long, value_name = "FILE")]
    pub context: PathBuf,

    /// Negative prompt for guidance (a `context` file); default: an all-zero context.
    #[arg(long, value_name = "FILE")]
    pub negative_context: Option<PathBuf>,

    /// Classifier-free guidance scale; 1 disables guidance (half the model calls).
    #[arg(long, default_value_t = 1.0)]
    pub cfg_scale: f32,

    /// Euler steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,

    /// Timestep shift of the Wan scheduler.
    #[arg(long, default_value_t = DEFAULT_SHIFT)]
    pub shift: f32,

    /// Seed of the first sample; sample i uses SEED + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Number of samples.
    #[arg(long, default_value_t = 4)]
    pub num_samples: usize,

    /// Latent frames, height and width: F,H,W (Wan 81×480×832 is 21,60,104).
    #[arg(long, value_name = "F,H,W")]
    pub shape: String,

    /// Output directory: samples.safetensors (latents), samples.png and samples.gif (latent
    /// channels 0-2 as colours, frames left to right); with --vae-decoder also the videos.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Decode the samples to RGB frames with Wan's VAE decoder exported by
    /// `python -m flowstep_export.pipeline.vae_decoder` (this DIR holds vae_decoder.json). Writes
    /// videos.png (contact sheet: up to 8 frames per sample), videos.gif and, when `ffmpeg` is
    /// on PATH, video-XXX.mp4 (H.264).
    #[arg(long, value_name = "DIR")]
    pub vae_decoder: Option<PathBuf>,

    /// With --vae-decoder: also write the decoded frames, float32 in [-1, 1], to
    /// videos.safetensors (`frames` [N, 3, T, H, W]; ~390 MB per 81-frame 480×832 video).
    #[arg(long, requires = "vae_decoder")]
    pub save_frames: bool,

    /// With --vae-decoder: decode in spatial tiles of H×W latent pixels overlapping by half and
    /// blended, as DiffSynth's tiled decode (its default is 30,52). Bounds memory at any video
    /// size (ONNX Runtime's CPU 3-D convolution needs ~5 GB for a 30×52 tile); default: whole.
    #[arg(long, value_name = "H,W", requires = "vae_decoder", value_parser = Tile::parse)]
    pub vae_tile: Option<Tile>,

    /// Frames per second of the decoded GIF and MP4 (Wan2.1 is trained at 16).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=240))]
    pub fps: u32,

    /// Image conditioning for an I2V/TI2V model: a .safetensors with the tensors its manifest
    /// lists, as in a training sample at --shape's size (`y` [C_y, F, H, W] and `clip_feature`
    /// [257, 1280] for I2V; `first_frame_latents` [C, 1, H, W] for TI2V, kept in frame 0). A
    /// sample that `python -m flowstep_export.data.prepare` made with the Wan2.2 VAE at this size
    /// holds TI2V's.
    #[arg(long, value_name = "FILE")]
    pub condition: Option<PathBuf>,

    /// The other expert of a Wan2.2 A14B pair (its artifacts directory): the high-noise expert
    /// denoises while t ≥ the pair's switch timestep (875 T2V, 900 I2V), then the low-noise one.
    #[arg(long, value_name = "DIR", help_heading = "Wan2.2 expert pair")]
    pub expert_artifacts: Option<PathBuf>,

    /// LoRA for the other expert (e.g. lora_low_noise.safetensors); default: none.
    #[arg(long, value_name = "FILE", requires = "expert_artifacts", help_heading = "Wan2.2 expert pair")]
    pub expert_lora: Option<PathBuf>,

    /// Base checkpoint of the other expert when its artifacts do not ship one.
    #[arg(long, value_name = "FILE", requires = "expert_artifacts", help_heading = "Wan2.2 expert pair")]
    pub expert_base: Option<PathBuf>,

    /// Print each sample's centroid motion (dx, dy in latent pixels) and mean colour
    /// (channels 0-2): the toy world's measures of where the blob went and what colour it is.
    #[arg(long)]
    pub report: bool,

    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Latent values per sample: 2^28 floats (1 GiB) is 50× a 720p, 81-frame Wan video.
const MAX_SAMPLE_VALUES: usize = 1 << 28;
/// All samples are held for the pictures: 4 GiB of latents in all.
const MAX_TOTAL_VALUES: usize = 1 << 30;
const MAX_STEPS: usize = 10_000;

/// The latent shape [C, F, H, W] from `--shape F,H,W`, checked against the model and the
/// memory bounds above.
fn latent_shape(args: &Args, model: &flowstep::artifacts::ModelInfo) -> anyhow::Result<[usize; 4]> {
    let dims: Vec<usize> = args.shape.split(',').map(|d| d.trim().parse()).collect::<Result<_, _>>()
        .with_context(|| format!("--shape {}: expected F,H,W", args.shape))?;
    anyhow::ensure!(dims.len() == 3 && dims.iter().all(|&d| d > 0), "--shape {}: expected three positive numbers F,H,W", args.shape);
    let p = model.patch_size;
    anyhow::ensure!(dims[1].is_multiple_of(p[1]) && dims[2].is_multiple_of(p[2]), "--shape {}: height and width must be multiples of {}", args.shape, p[1]);
    let shape = [model.latent_channels(), dims[0], dims[1], dims[2]];
    let values = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).filter(|&v| v <= MAX_SAMPLE_VALUES);
    let Some(values) = values else {
        anyhow::bail!("--shape {}: more than {MAX_SAMPLE_VALUES} latent values per sample", args.shape);
    };
    anyhow::ensure!(values.saturating_mul(args.num_samples) <= MAX_TOTAL_VALUES,
        "--num-samples: {} samples of shape {} hold more than {MAX_TOTAL_VALUES} values", args.num_samples, args.shape);
    Ok(shape)
}

/// The other expert must complete the pair: the opposite role, the same switch timestep and
/// the same inputs.
fn check_pair(main: &Manifest, other: &Manifest, dir: &std::path::Path) -> anyhow::Result<()> {
    let (Some(a), Some(b)) = (&main.expert, &other.expert) else {
        anyhow::bail!("--expert-artifacts {}: both --artifacts and --expert-artifacts must be experts of a Wan2.2 A14B pair", dir.display());
    };
    anyhow::ensure!(a.role != b.role, "--expert-artifacts {}: both exports are the {} expert", dir.display(), a.role.as_str());
    anyhow::ensure!(a.switch_timestep == b.switch_timestep, "--expert-artifacts {}: switch timestep {} differs from {}", dir.display(), b.switch_timestep, a.switch_timestep);
    let (x, y) = (&main.model, &other.model);
    let same = x.latent_channels() == y.latent_channels() && x.in_dim == y.in_dim && x.text_len == y.text_len
        && x.text_dim == y.text_dim && x.patch_size == y.patch_size && x.conditioning == y.conditioning;
    anyhow::ensure!(same, "--expert-artifacts {}: its model ({}) takes other inputs than {}", dir.display(), y.name, x.name);
    Ok(())
}

pub fn run(args: Args, globals: &Globals) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.num_samples >= 1, "--num-samples: must be at least 1");
    anyhow::ensure!((1..=MAX_STEPS).contains(&args.steps), "--steps: must be 1 to {MAX_STEPS}, got {}", args.steps);
    anyhow::ensure!(args.shift.is_finite() && args.shift > 0.0, "--shift: must be a positive number, got {}", args.shift);
    anyhow::ensure!(args.cfg_scale.is_finite(), "--cfg-scale: must be a finite number, got {}", args.cfg_scale);
    anyhow::ensure!(args.seed.checked_add(args.num_samples as u64).is_some(), "--seed: {} + {} samples overflows", args.seed, args.num_samples);
    if let Ok(meta) = std::fs::metadata(&args.out) {
        anyhow::ensure!(meta.is_dir(), "--out {}: is {}, expected a directory", args.out.display(), flowstep::artifacts::kind_of(&meta));
    }
    let session = super::init_runtime(globals, &args.device)?;
    let artifacts = Artifacts::open(&args.model.artifacts)?;
    let m = &artifacts.manifest;
    // Refuse a device without kernels for these graphs before reading any input.
    session.for_artifacts(m)?;
    let shape = latent_shape(&args, &m.model)?;
    let ctx_shape = [m.model.text_len, m.model.text_dim];
    let ctx = read_context(&args.context, &m.model)?;
    let negative = args.negative_context.as_deref().map(|p| read_context(p, &m.model)).transpose()?;
    let conditioning = read_conditioning(args.condition.as_deref(), &m.model, &shape)?;
    let other = match &args.expert_artifacts {
        Some(dir) => {
            let a = Artifacts::open(dir)?;
            check_pair(m, &a.manifest, dir)?;
            session.for_artifacts(&a.manifest)?;
            Some(a)
        }
        None => None,
    };
    if let (Some(e), None, false) = (&m.expert, &other, globals.quiet) {
        eprintln!("warning: {} is the {} expert alone; pass the other expert with --expert-artifacts to sample as Wan2.2 does", m.model.name, e.role.as_str());
    }
    let mut decoder = args.vae_decoder.as_deref().map(|dir| VaeDecoder::open(dir, &session, shape[0])).transpose()?;
    if let (Some(d), Some(dir)) = (&decoder, &args.vae_decoder) {
        d.check_shape(shape).with_context(|| format!("--vae-decoder {} with --shape {}", dir.display(), args.shape))?;
    }
    let mut model = WithLora::<VelocityGraph>::load(&artifacts, &session, args.model.base.as_deref(), args.lora.as_deref())?;
    let mut other_model = match &other {
        Some(a) => Some(WithLora::<VelocityGraph>::load(a, &session, args.expert_base.as_deref(), args.expert_lora.as_deref())?),
        None => None,
    };
    let mut stages = match (&mut other_model, &m.expert) {
        (Some(o), Some(e)) => {
            let (high, low) = if e.role == ExpertRole::HighNoise { (&mut model, o) } else { (o, &mut model) };
            vec![
                Stage { graph: &mut high.graph, params: &high.params, from_timestep: e.switch_timestep },
                Stage { graph: &mut low.graph, params: &low.params, from_timestep: f32::NEG_INFINITY },
            ]
        }
        _ => vec![Stage { graph: &mut model.graph, params: &model.params, from_timestep: f32::NEG_INFINITY }],
    };
    let mut videos = Vec::with_capacity(args.num_samples);
    let mut motions = Vec::new();
    for i in 0..args.num_samples {
        let config = SampleConfig { steps: args.steps, shift: args.shift, cfg_scale: args.cfg_scale, seed: args.seed + i as u64, shape };
        let video = sample(&mut stages, (&ctx_shape, &ctx), negative.as_deref(), &conditioning, &config)?;
        let (dx, dy) = centroid_motion(&video, shape);
        let [r, g, b] = mean_rgb(&video, shape);
        if args.report {
            println!("sample {i}: motion dx {dx:+.2} dy {dy:+.2}  colour r {r:.2} g {g:.2} b {b:.2}");
        }
        motions.push(serde_json::json!({"seed": config.seed, "dx": dx, "dy": dy, "rgb": [r, g, b]}));
        videos.push(video);
    }
    let summary = serde_json::json!({"lora": args.lora, "expert_lora": args.expert_lora, "condition": args.condition, "context": args.context,
        "steps": args.steps, "cfg_scale": args.cfg_scale, "samples": motions});
    // Every output is written aside and moved into --out only once all are complete.
    let staging = Staging::new(&args.out)?;
    write_atomic(&staging.path().join("samples.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    let count = videos.len();
    let decoding = decoder.as_mut().map(|d| (d, VideoOptions { fps: args.fps, save_frames: args.save_frames, tile: args.vae_tile }));
    let written = write_outputs(staging.path(), videos, shape, decoding)?;
    staging.commit()?;
    match written.map(|files| files.mp4) {
        Some(Mp4::Written(paths)) if !globals.quiet => eprintln!("decoded {count} videos to {} (videos.png, videos.gif, {} MP4)", args.out.display(), paths.len()),
        Some(Mp4::NoFfmpeg(message)) => eprintln!("warning: {message}"),
        _ => {}
    }
    if !globals.quiet {
        eprintln!("wrote {} samples to {} (samples.png, samples.gif, samples.safetensors)", args.num_samples, args.out.display());
    }
    Ok(ExitCode::SUCCESS)
}
