//! `flowstep sample`: generate latent videos with the inference graph and draw them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use flowstep::artifacts::Artifacts;
use flowstep::executor::{VelocityGraph, WithLora};
use flowstep::render::{Grid, centroid_motion, mean_rgb};
use flowstep::sample::{SampleConfig, sample};
use flowstep::tensor_file::{OutTensor, SaveDtype, TensorFile, encode, write_atomic};

use super::{DeviceArgs, Globals, ModelArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// LoRA file to apply (DiffSynth or ComfyUI keys); default: none (the base model).
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
    #[arg(long, default_value_t = 5.0)]
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

    /// Output directory: samples.safetensors, samples.png (frames left to right), samples.gif.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

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
    let read_context = |path: &PathBuf| -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
        let (s, v) = TensorFile::open(path)?.read_f32("context")?;
        anyhow::ensure!(s == [m.model.text_len, m.model.text_dim], "{}: `context` has shape {s:?}, this model takes [{}, {}]", path.display(), m.model.text_len, m.model.text_dim);
        Ok((s, v))
    };
    let (ctx_shape, ctx) = read_context(&args.context)?;
    let negative = args.negative_context.as_ref().map(read_context).transpose()?.map(|(_, v)| v);
    let mut model = WithLora::<VelocityGraph>::load(&artifacts, &session, args.model.base.as_deref(), args.lora.as_deref())?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mut videos = Vec::with_capacity(args.num_samples);
    let mut motions = Vec::new();
    for i in 0..args.num_samples {
        let config = SampleConfig { steps: args.steps, shift: args.shift, cfg_scale: args.cfg_scale, seed: args.seed + i as u64, shape };
        let video = sample(&mut model.graph, &model.params, (&ctx_shape, &ctx), negative.as_deref(), &config)?;
        let (dx, dy) = centroid_motion(&video, shape);
        let [r, g, b] = mean_rgb(&video, shape);
        if args.report {
            println!("sample {i}: motion dx {dx:+.2} dy {dy:+.2}  colour r {r:.2} g {g:.2} b {b:.2}");
        }
        motions.push(serde_json::json!({"seed": config.seed, "dx": dx, "dy": dy, "rgb": [r, g, b]}));
        videos.push(video);
    }
    let all: Vec<f32> = videos.iter().flatten().copied().collect();
    let tensor = OutTensor { name: "latents".into(), shape: [args.num_samples].into_iter().chain(shape).collect(), values: all };
    write_atomic(&args.out.join("samples.safetensors"), &encode(&[tensor], SaveDtype::F32, None)?)?;
    let summary = serde_json::json!({"lora": args.lora, "context": args.context, "steps": args.steps, "cfg_scale": args.cfg_scale, "samples": motions});
    write_atomic(&args.out.join("samples.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    let grid = Grid { videos, shape, scale: (128 / shape[3].max(1)).clamp(1, 16) as u32 };
    grid.write_png(&args.out.join("samples.png"))?;
    grid.write_gif(&args.out.join("samples.gif"))?;
    if !globals.quiet {
        eprintln!("wrote {} samples to {} (samples.png, samples.gif, samples.safetensors)", args.num_samples, args.out.display());
    }
    Ok(ExitCode::SUCCESS)
}
