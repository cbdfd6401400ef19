//! `flowstep sample`: generate latent videos with the inference graph, draw them, and decode
//! them to RGB frames with Wan's VAE decoder when one is given.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use flowstep::artifacts::{Artifacts, ExpertRole};
use flowstep::decode::{Tile, VaeDecoder, VideoOptions};
use flowstep::executor::{VelocityGraph, WithLora};
use flowstep::render::{centroid_motion, mean_rgb};
use flowstep::sample::{DEFAULT_CFG_SCALE, DEFAULT_SHIFT, DEFAULT_STEPS, PromptTensors, SampleConfig, WAN_NEGATIVE_PROMPT, Stage, context_prompt, read_conditioning, read_context, sample, write_first_frame_picture, write_outputs};
use flowstep::tensor_file::{Staging, write_atomic};
use flowstep::text_encoder::encode_prompts;
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

    /// Prompt text, encoded by --text-encoder.
    #[arg(long, value_name = "TEXT", requires = "text_encoder", conflicts_with = "context")]
    pub prompt: Option<String>,

    /// Negative prompt text for guidance, encoded by --text-encoder; default with --prompt:
    /// Wan's standard negative prompt (as Wan's, DiffSynth-Studio's and musubi-tuner's samplers).
    #[arg(long, value_name = "TEXT", requires = "text_encoder", conflicts_with = "negative_context")]
    pub negative_prompt: Option<String>,

    /// Wan's umT5 text encoder exported by `python -m flowstep_export.pipeline.text_encoder`
    /// (this DIR holds text_encoder.json): encodes --prompt and --negative-prompt on the CPU
    /// before sampling, then is freed.
    #[arg(long, value_name = "DIR")]
    pub text_encoder: Option<PathBuf>,

    /// Prompt as an encoded context: a .safetensors file with a `context` tensor [L, D]
    /// (text-encoder output); instead of --prompt.
    #[arg(long, value_name = "FILE", required_unless_present = "prompt")]
    pub context: Option<PathBuf>,

    /// Negative prompt for guidance (a `context` file); default: Wan's standard negative
    /// prompt with --prompt, else an all-zero context.
    #[arg(long, value_name = "FILE")]
    pub negative_context: Option<PathBuf>,

    /// Classifier-free guidance scale (Wan's default 5); 1 disables guidance (half the model
    /// calls).
    #[arg(long, default_value_t = DEFAULT_CFG_SCALE)]
    pub cfg_scale: f32,

    /// Euler steps (Wan's default 50).
    #[arg(long, default_value_t = DEFAULT_STEPS)]
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

    /// Video width in pixels, a multiple of 16 (32 for Wan2.2 TI2V-5B's VAE); with --height and
    /// --frames instead of --shape.
    #[arg(long, value_name = "PX", requires_all = ["height", "frames"], conflicts_with = "shape")]
    pub width: Option<usize>,

    /// Video height in pixels, a multiple of 16 (32 for TI2V-5B).
    #[arg(long, value_name = "PX", requires_all = ["width", "frames"])]
    pub height: Option<usize>,

    /// Video frames, 4n+1 (Wan: 81); the latent has (frames − 1)/4 + 1.
    #[arg(long, value_name = "N", requires_all = ["width", "height"])]
    pub frames: Option<usize>,

    /// Latent frames, height and width: F,H,W (Wan 81×480×832 is 21,60,104); or give the
    /// video's size with --width, --height and --frames.
    #[arg(long, value_name = "F,H,W", required_unless_present = "width")]
    pub shape: Option<String>,

    /// Output directory: samples.safetensors (latents), samples.png and samples.gif (latent
    /// channels 0-2 as colours, frames left to right); with --vae-decoder also the videos. An
    /// existing directory with files in it is refused unless --overwrite.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Replace an existing --out directory as a whole (its old files removed once the new
    /// samples are complete).
    #[arg(long)]
    pub overwrite: bool,

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

/// Wan's VAEs: 4 video frames per latent frame after the first, 8 pixels per latent pixel
/// (16 for Wan2.2's 48-channel VAE).
const VAE_TIME_STRIDE: usize = 4;
fn vae_space_stride(model: &flowstep::artifacts::ModelInfo) -> usize {
    if model.latent_channels() == 48 { 16 } else { 8 }
}

/// The latent F,H,W of `--width --height --frames` in pixels, as Wan's pipelines make them;
/// refused unless they map exactly (frames 4n+1, sides multiples of the VAE and patch strides).
fn latent_dims_of_pixels(width: usize, height: usize, frames: usize, model: &flowstep::artifacts::ModelInfo) -> anyhow::Result<[usize; 3]> {
    anyhow::ensure!(frames % VAE_TIME_STRIDE == 1, "--frames {frames}: must be 4n+1 (1, 5, ..., 49, 81): the VAE packs 4 frames per latent frame after the first");
    let space = vae_space_stride(model);
    let multiple = space * model.patch_size[1].max(model.patch_size[2]);
    for (flag, px) in [("--width", width), ("--height", height)] {
        anyhow::ensure!(px > 0 && px.is_multiple_of(multiple), "{flag} {px}: must be a positive multiple of {multiple} (the VAE's {space} pixels times the patch size {:?})", &model.patch_size[1..]);
    }
    Ok([(frames - 1) / VAE_TIME_STRIDE + 1, height / space, width / space])
}

/// The flags that gave the size, as typed: for error messages.
fn size_flags(args: &Args) -> String {
    match (&args.shape, args.width, args.height, args.frames) {
        (Some(shape), ..) => format!("--shape {shape}"),
        (None, Some(w), Some(h), Some(f)) => format!("--width {w} --height {h} --frames {f}"),
        _ => "--shape".into(),
    }
}

/// The latent shape [C, F, H, W] from `--shape F,H,W` or the pixel flags, checked against the
/// model and the memory bounds above.
fn latent_shape(args: &Args, model: &flowstep::artifacts::ModelInfo) -> anyhow::Result<[usize; 4]> {
    let flag = size_flags(args);
    let dims = match (&args.shape, args.width, args.height, args.frames) {
        (Some(shape), ..) => {
            let dims: Vec<usize> = shape.split(',').map(|d| d.trim().parse()).collect::<Result<_, _>>()
                .with_context(|| format!("--shape {shape}: expected F,H,W"))?;
            anyhow::ensure!(dims.len() == 3 && dims.iter().all(|&d| d > 0), "--shape {shape}: expected three positive numbers F,H,W");
            let p = model.patch_size;
            anyhow::ensure!(dims[1].is_multiple_of(p[1]) && dims[2].is_multiple_of(p[2]), "--shape {shape}: height and width must be multiples of {}", p[1]);
            dims
        }
        (None, Some(w), Some(h), Some(f)) => latent_dims_of_pixels(w, h, f, model)?.to_vec(),
        // clap requires --shape or all three pixel flags.
        _ => anyhow::bail!("give --shape F,H,W or --width, --height and --frames"),
    };
    let shape = [model.latent_channels(), dims[0], dims[1], dims[2]];
    let values = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).filter(|&v| v <= MAX_SAMPLE_VALUES);
    let Some(values) = values else {
        anyhow::bail!("{flag}: more than {MAX_SAMPLE_VALUES} latent values per sample");
    };
    anyhow::ensure!(values.saturating_mul(args.num_samples) <= MAX_TOTAL_VALUES,
        "--num-samples: {} samples of {flag} hold more than {MAX_TOTAL_VALUES} values", args.num_samples);
    Ok(shape)
}

/// A bar on stderr when it is a terminal and not --quiet; hidden otherwise.
fn progress_bar(len: u64, what: &str, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{msg} {bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}]").unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The negative prompt text to encode: --negative-prompt, or Wan's standard one for a text
/// --prompt without a --negative-context.
fn negative_prompt(args: &Args) -> Option<&str> {
    match (&args.negative_prompt, &args.prompt, &args.negative_context) {
        (Some(text), _, _) => Some(text),
        (None, Some(_), None) => Some(WAN_NEGATIVE_PROMPT),
        _ => None,
    }
}

/// The prompt's and the optional negative prompt's contexts: text encoded by --text-encoder
/// (which is dropped before the DiT loads), or read from context files.
fn prompt_contexts(args: &Args, model: &flowstep::artifacts::ModelInfo, threads: Option<usize>) -> anyhow::Result<(Vec<f32>, Option<Vec<f32>>)> {
    if let Some(context) = &args.context {
        // Text where a file belongs: say where text goes.
        if !context.exists() && !context.to_string_lossy().to_ascii_lowercase().ends_with(".safetensors") {
            anyhow::bail!("--context {}: no such file; --context takes a .safetensors file with `context` [L, D], text goes to --prompt \"TEXT\" --text-encoder DIR", context.display());
        }
    }
    let texts: Vec<&str> = args.prompt.as_deref().into_iter().chain(negative_prompt(args)).collect();
    let mut encoded = match &args.text_encoder {
        Some(dir) => {
            anyhow::ensure!(!texts.is_empty(), "--text-encoder {}: nothing to encode; give --prompt or --negative-prompt", dir.display());
            encode_prompts(dir, &texts, model, threads)?.into_iter()
        }
        None => Vec::new().into_iter(),
    };
    let context = match &args.context {
        Some(path) => read_context(path, model)?,
        None => encoded.next().context("--prompt: no text encoded")?,
    };
    let negative = match &args.negative_context {
        Some(path) => Some(read_context(path, model)?),
        None => encoded.next(),
    };
    Ok((context, negative))
}

pub fn run(args: Args, globals: &Globals) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.num_samples >= 1, "--num-samples: must be at least 1");
    anyhow::ensure!((1..=MAX_STEPS).contains(&args.steps), "--steps: must be 1 to {MAX_STEPS}, got {}", args.steps);
    anyhow::ensure!(args.shift.is_finite() && args.shift > 0.0, "--shift: must be a positive number, got {}", args.shift);
    anyhow::ensure!(args.cfg_scale.is_finite(), "--cfg-scale: must be a finite number, got {}", args.cfg_scale);
    anyhow::ensure!(args.seed.checked_add(args.num_samples as u64).is_some(), "--seed: {} + {} samples overflows", args.seed, args.num_samples);
    if let Ok(meta) = std::fs::metadata(&args.out) {
        anyhow::ensure!(meta.is_dir(), "--out {}: is {}, expected a directory", args.out.display(), flowstep::artifacts::kind_of(&meta));
        let holds_files = std::fs::read_dir(&args.out).with_context(|| format!("--out {}", args.out.display()))?.next().is_some();
        anyhow::ensure!(args.overwrite || !holds_files, "--out {}: already exists with files in it; pass --overwrite to replace it, or choose another --out", args.out.display());
    }
    let session = super::init_runtime(globals, &args.device)?;
    let artifacts = Artifacts::open(&args.model.artifacts)?;
    let m = &artifacts.manifest;
    // Refuse a device without kernels for these graphs before reading any input.
    session.for_artifacts(m)?;
    let shape = latent_shape(&args, &m.model)?;
    let ctx_shape = [m.model.text_len, m.model.text_dim];
    let (ctx, negative) = prompt_contexts(&args, &m.model, session.threads)?;
    let conditioning = read_conditioning(args.condition.as_deref(), &m.model, &shape)?;
    let other = match &args.expert_artifacts {
        Some(dir) => {
            let a = Artifacts::open(dir)?;
            if let Some(reason) = flowstep::artifacts::pair_mismatch(m, &a.manifest, false) {
                anyhow::bail!("--expert-artifacts {}: {reason}", dir.display());
            }
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
        d.check_shape(shape).with_context(|| format!("--vae-decoder {} with {}", dir.display(), size_flags(&args)))?;
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
    // The prompt text: --prompt, else what the context file records.
    let prompt = match (&args.prompt, &args.context) {
        (Some(text), _) => Some(text.clone()),
        (None, Some(path)) => context_prompt(path)?,
        (None, None) => None,
    };
    let mut videos = Vec::with_capacity(args.num_samples);
    let mut motions = Vec::new();
    let bar = progress_bar((args.num_samples * args.steps) as u64, "sampling", globals.quiet);
    for i in 0..args.num_samples {
        let config = SampleConfig { steps: args.steps, shift: args.shift, cfg_scale: args.cfg_scale, seed: args.seed + i as u64, shape };
        let video = sample(&mut stages, (&ctx_shape, &ctx), negative.as_deref(), &conditioning, &config, &bar)?;
        let (dx, dy) = centroid_motion(&video, shape);
        let [r, g, b] = mean_rgb(&video, shape);
        if args.report {
            println!("sample {i}: motion dx {dx:+.2} dy {dy:+.2}  colour r {r:.2} g {g:.2} b {b:.2}");
        }
        motions.push(serde_json::json!({"seed": config.seed, "dx": dx, "dy": dy, "rgb": [r, g, b]}));
        videos.push(video);
    }
    bar.finish_and_clear();
    let summary = serde_json::json!({"prompt": prompt, "negative_prompt": negative_prompt(&args), "lora": args.lora, "expert_lora": args.expert_lora,
        "condition": args.condition, "context": args.context, "negative_context": args.negative_context, "shape": shape, "steps": args.steps,
        "cfg_scale": args.cfg_scale, "shift": args.shift, "samples": motions});
    // Every output is written aside and moved into --out only once all are complete.
    let staging = Staging::new(&args.out)?;
    write_atomic(&staging.path().join("samples.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    let count = videos.len();
    let decoding_bar = progress_bar(count as u64 * VaeDecoder::work(shape, args.vae_tile), "decoding", globals.quiet || decoder.is_none());
    if let Some(d) = &mut decoder {
        d.set_progress(decoding_bar.clone());
    }
    let decoding = decoder.as_mut().map(|d| (d, VideoOptions { fps: args.fps, save_frames: args.save_frames, tile: args.vae_tile }));
    let prompt_tensors = PromptTensors { shape: ctx_shape, context: &ctx, negative: negative.as_deref() };
    write_first_frame_picture(staging.path(), &videos, shape, &conditioning)?;
    let written = write_outputs(staging.path(), videos, shape, prompt_tensors, decoding)?;
    decoding_bar.finish_and_clear();
    if args.overwrite { staging.commit_replacing()? } else { staging.commit()? }
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
