//! Samples during training (`--sample-every N --sample-prompts FILE`): the inference graph,
//! on the same base weights and the current LoRA parameters, run for each prompt of the file
//! and written under `OUT/samples/step-XXXXXX/NN-<prompt>/` (a slug of the prompt text: the
//! line's text, or the text a context file records, else the file's name) in `flowstep sample`'s
//! layout (latents, their colour pictures and, with `--vae-decoder`, the decoded videos).
//!
//! The prompt file has one prompt per line; blank lines and lines starting with `#` are
//! skipped. A line is either text with musubi-tuner's per-line options (encoded by
//! `--text-encoder DIR` once, before the first step), or a context file (text-encoder output,
//! relative to this file, ending in `.safetensors`) with `key=value` options:
//!
//! ```text
//! # text, as musubi-tuner's sampling prompts (needs --text-encoder)
//! a purple blob moves up --w 96 --h 64 --f 9 --s 20 --g 5 --d 42 --n a yellow blob
//! # a context file (`#` also starts a comment inside such a line)
//! purple-up.safetensors seed=1
//! yellow-up.safetensors seed=2 shape=2,16,16 cfg=3 negative=empty.safetensors steps=20
//! ```
//!
//! Text options: `--w`/`--h` width and height in pixels (multiples of the VAE stride times the
//! patch size: 16 for Wan2.1), `--f` frames (4k+1), `--s` steps, `--g` or `--l` the guidance
//! scale, `--fs` the shift, `--d` the seed, `--n` a negative prompt (the rest of the line up to
//! the next ` --`), `--c` a conditioning file. Context options: `seed`, `shape` (latent F,H,W),
//! `steps`, `cfg`, `shift`, `negative` (a context file), `condition`. Defaults for both: seed 0,
//! the training data's largest bucket, `--sample-steps`, shift 5 (as `flowstep sample`); for a
//! text line guidance 5 against Wan's standard negative prompt (as musubi-tuner's Wan sampling
//! and `flowstep sample`), for a context line cfg 1 (no guidance) and an all-zero negative. An
//! image-to-video model needs a conditioning file on every line (`--c FILE` or `condition=FILE`:
//! the tensors `flowstep sample --condition` takes, at the line's shape, from `encode_image` or
//! a prepared sample), where musubi-tuner reads an image (`--i`, refused here with that advice).

use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use ort::value::Tensor;

use crate::artifacts::{Artifacts, ModelInfo};
use crate::text_encoder::encode_prompts;
use crate::error::{Error, Result};
use crate::decode::{Tile, VaeDecoder, VideoOptions};
use crate::executor::{BaseWeights, VelocityGraph};
use crate::runtime::SessionOptions;
use crate::data::Conditioning;
use crate::sample::{DEFAULT_CFG_SCALE, DEFAULT_SHIFT, PromptTensors, WAN_NEGATIVE_PROMPT, SampleConfig, Stage, context_prompt, prompt_slug, read_conditioning, read_context, sample, write_outputs};
use crate::tensor_file::{Staging, write_atomic};
use crate::video_files::Mp4;

/// `--sample-every`, `--sample-prompts`, `--sample-steps`, `--text-encoder`, `--vae-decoder`,
/// `--vae-tile`.
#[derive(Debug, Clone)]
pub struct SamplingConfig {
    pub every: u64,
    pub prompts: PathBuf,
    pub steps: usize,
    /// The umT5 ONNX export that encodes the file's text lines (`text_encoder.json`).
    pub text_encoder: Option<PathBuf>,
    pub vae_decoder: Option<PathBuf>,
    pub vae_tile: Option<Tile>,
}

/// Frames per second of the decoded GIFs and MP4s (Wan2.1 is trained at 16).
const FPS: u32 = 16;
/// A prompt file is a few lines; anything far larger is not one.
const MAX_PROMPT_FILE_BYTES: u64 = 1 << 20;
/// Euler steps of one training-time sample (`--sample-steps`, a line's `steps=`).
pub const MAX_SAMPLE_STEPS: usize = 10_000;
/// Latent values of one training-time sample: 2^28 float32s (1 GiB), as `flowstep sample`.
const MAX_SAMPLE_VALUES: usize = 1 << 28;

/// One line of the prompt file, its context files read or its text encoded.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub name: String,
    /// The prompt and negative prompt of a text line.
    pub text: Option<(String, String)>,
    pub context: Vec<f32>,
    pub negative: Option<Vec<f32>>,
    pub conditioning: Vec<Conditioning>,
    pub config: SampleConfig,
}

fn bad_line(file: &Path, line: usize, reason: impl std::fmt::Display) -> Error {
    Error::Config(format!("--sample-prompts {}:{line}: {reason}", file.display()))
}

/// Reads and checks the whole prompt file before training starts, encoding its text lines
/// with the text encoder (then dropped). `default_shape` is the latent F,H,W used where a line
/// gives none; `threads` are the encoder's (`--threads`).
pub fn read_prompts(config: &SamplingConfig, model: &ModelInfo, default_shape: [usize; 3], threads: Option<usize>) -> Result<Vec<Prompt>> {
    let file = &config.prompts;
    let text = crate::small_file::read_text(file, "prompt file (--sample-prompts)", MAX_PROMPT_FILE_BYTES)?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut prompts = Vec::new();
    let mut texts: Vec<(usize, TextLine)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or_default();
        if !first.to_ascii_lowercase().ends_with(".safetensors") {
            if config.text_encoder.is_none() {
                return Err(bad_line(file, line_no, format!(
                    "`{}` is text, and text prompts need --text-encoder DIR (python -m flowstep_export.pipeline.text_encoder); \
                     without it a line must be a context file: `NAME.safetensors [seed=N] [shape=F,H,W] [steps=N] [cfg=X] [shift=X] [negative=FILE]`",
                    line.chars().take(40).collect::<String>()
                )));
            }
            let parsed = parse_text_line(line, model, default_shape, config.steps).map_err(|reason| bad_line(file, line_no, reason))?;
            if !model.conditioning.is_empty() && parsed.condition.is_none() {
                return Err(bad_line(file, line_no, format!("{} needs image conditioning: add `--c FILE` to the line ({CONDITION_FILE})", model.name)));
            }
            let condition = parsed.condition.as_ref().map(|c| dir.join(c));
            let conditioning = read_conditioning(condition.as_deref(), model, &parsed.config.shape).map_err(|e| bad_line(file, line_no, e))?;
            texts.push((prompts.len(), parsed.clone()));
            let name = format!("{:02}-{}", prompts.len(), Some(prompt_slug(&parsed.prompt)).filter(|s| !s.is_empty()).unwrap_or_else(|| "prompt".into()));
            prompts.push(Prompt { name, text: Some((parsed.prompt, parsed.negative)), context: Vec::new(), negative: None, conditioning, config: parsed.config });
            continue;
        }
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        let Some(context) = words.next() else { continue };
        let (mut seed, mut shape, mut cfg_scale, mut negative, mut steps, mut shift) = (0, default_shape, 1.0f32, None, config.steps, DEFAULT_SHIFT);
        let mut condition = None;
        for word in words {
            let (key, value) = word.split_once('=').ok_or_else(|| bad_line(file, line_no, format!("`{word}`: expected key=value")))?;
            let number = |what: &str| bad_line(file, line_no, format!("{key}={value}: expected {what}"));
            match key {
                "seed" => seed = value.parse().map_err(|_| number("a non-negative integer"))?,
                "steps" => steps = value.parse().ok().filter(|s| (1..=MAX_SAMPLE_STEPS).contains(s)).ok_or_else(|| number(&format!("1 to {MAX_SAMPLE_STEPS}")))?,
                "cfg" => cfg_scale = value.parse().ok().filter(|c: &f32| c.is_finite()).ok_or_else(|| number("a finite number"))?,
                "shift" => shift = value.parse().ok().filter(|s: &f32| s.is_finite() && *s > 0.0).ok_or_else(|| number("a positive number"))?,
                "negative" => negative = Some(read_context(&dir.join(value), model)?),
                "condition" => condition = Some(dir.join(value)),
                "shape" => {
                    let dims: Vec<usize> = value.split(',').map(str::parse).collect::<std::result::Result<_, _>>().map_err(|_| number("F,H,W"))?;
                    shape = check_latent_shape(&dims, model).map_err(|what| number(&what))?;
                }
                _ => return Err(bad_line(file, line_no, format!("unknown key `{key}` (seed, shape, steps, cfg, shift, negative, condition)"))),
            }
        }
        let path = dir.join(context);
        // The folder is named after the prompt text the context file records, else the file.
        let slug = context_prompt(&path)?.map(|text| prompt_slug(&text)).filter(|slug| !slug.is_empty());
        let label = slug.unwrap_or_else(|| Path::new(context).file_stem().and_then(|s| s.to_str()).unwrap_or("prompt").to_string());
        let name = format!("{:02}-{label}", prompts.len());
        let context = read_context(&path, model)?;
        let config = SampleConfig { steps, shift, cfg_scale, seed, shape: [model.latent_channels(), shape[0], shape[1], shape[2]] };
        let conditioning = read_conditioning(condition.as_deref(), model, &config.shape).map_err(|e| bad_line(file, line_no, e))?;
        prompts.push(Prompt { name, text: None, context, negative, conditioning, config });
    }
    if prompts.is_empty() {
        return Err(Error::Config(format!("--sample-prompts {}: no prompts (one text prompt or context file per line)", file.display())));
    }
    if let (Some(encoder), true) = (&config.text_encoder, texts.is_empty()) {
        return Err(Error::Config(format!("--text-encoder {}: --sample-prompts {} has no text lines to encode (only context files)", encoder.display(), file.display())));
    }
    if let Some(encoder) = &config.text_encoder {
        let mut unique: Vec<&str> = texts.iter().flat_map(|(_, t)| [t.prompt.as_str(), t.negative.as_str()]).collect();
        unique.sort_unstable();
        unique.dedup();
        let encoded = encode_prompts(encoder, &unique, model, threads)?;
        let lookup = |text: &str| unique.binary_search(&text).map(|i| encoded[i].clone()).ok();
        for (index, line) in &texts {
            let prompt = &mut prompts[*index];
            prompt.context = lookup(&line.prompt).unwrap_or_default();
            prompt.negative = lookup(&line.negative);
        }
    }
    Ok(prompts)
}

/// What a conditioning file is, for the messages that ask for one.
const CONDITION_FILE: &str = "the tensors `flowstep sample --condition` takes: made from a start image once by \
                              `python -m flowstep_export.data.encode_image`, or a prepared sample of the dataset";

/// A text line's prompt, negative prompt, conditioning file (relative to the prompt file) and
/// sampling settings.
#[derive(Debug, Clone)]
struct TextLine {
    prompt: String,
    negative: String,
    condition: Option<String>,
    config: SampleConfig,
}

/// One text line in musubi-tuner's syntax (`PROMPT --w W --h H --f F --s S --g G --d D --n NEG`):
/// the prompt up to the first ` --`, then options, each a letter code (any case, as musubi-tuner
/// reads them) and a value.
fn parse_text_line(line: &str, model: &ModelInfo, default_shape: [usize; 3], default_steps: usize) -> std::result::Result<TextLine, String> {
    let mut parts = line.split(" --");
    let prompt = parts.next().unwrap_or_default().trim().to_string();
    if prompt.starts_with("--") {
        return Err(format!("`{prompt}`: the prompt text comes first, then the options"));
    }
    let [stride_f, stride_h, stride_w] = model.vae_stride();
    let [default_f, default_h, default_w] = default_shape;
    let (mut frames, mut height, mut width) = ((default_f - 1) * stride_f + 1, default_h * stride_h, default_w * stride_w);
    // Guidance as musubi-tuner's Wan sampling (its config's sample_guide_scale) and `flowstep sample`.
    let (mut seed, mut steps, mut cfg_scale, mut shift) = (0u64, default_steps, DEFAULT_CFG_SCALE, DEFAULT_SHIFT);
    let mut negative = WAN_NEGATIVE_PROMPT.to_string();
    let mut condition = None;
    for part in parts {
        let (option, value) = part.split_once(' ').map_or((part.trim(), ""), |(o, v)| (o.trim(), v.trim()));
        let expected = |what: &str| format!("{}: expected {what}", format!("--{option} {value}").trim_end());
        let integer = |what: &str| value.parse::<usize>().map_err(|_| expected(what));
        match option.to_ascii_lowercase().as_str() {
            "w" => width = integer("the width in pixels")?,
            "h" => height = integer("the height in pixels")?,
            "f" => frames = integer("the frame count")?,
            "s" => steps = value.parse().ok().filter(|s| (1..=MAX_SAMPLE_STEPS).contains(s)).ok_or_else(|| expected(&format!("1 to {MAX_SAMPLE_STEPS} steps")))?,
            "d" => seed = value.parse().map_err(|_| expected("a non-negative integer seed"))?,
            "g" | "l" => cfg_scale = value.parse().ok().filter(|c: &f32| c.is_finite()).ok_or_else(|| expected("a finite guidance scale"))?,
            "fs" => shift = value.parse().ok().filter(|s: &f32| s.is_finite() && *s > 0.0).ok_or_else(|| expected("a positive shift"))?,
            "n" if !value.is_empty() => negative = value.to_string(),
            "n" => return Err(expected("a negative prompt")),
            "c" if !value.is_empty() => condition = Some(value.to_string()),
            "c" => return Err(expected("a conditioning file")),
            // musubi-tuner's image options: flowstep encodes images once, outside training.
            "i" | "ei" | "ci" | "cn" => return Err(format!("`--{option}`: musubi-tuner's image path is not read here; give the image's conditioning file with `--c FILE` ({CONDITION_FILE})")),
            _ => return Err(format!("unknown option `--{option}` (--w, --h, --f, --s, --g or --l, --fs, --d, --n, --c)")),
        }
    }
    let pixels = |name: &str, value: usize, stride: usize| {
        let step = stride * model.patch_size[1];
        if value == 0 || !value.is_multiple_of(step) {
            return Err(format!("--{name} {value}: must be a positive multiple of {step} (VAE stride {stride} × patch size {})", model.patch_size[1]));
        }
        Ok(value / stride)
    };
    let (h, w) = (pixels("h", height, stride_h)?, pixels("w", width, stride_w)?);
    if frames == 0 || (frames - 1) % stride_f != 0 {
        return Err(format!("--f {frames}: the frame count must be {stride_f}k+1 (1, {}, {}, ...)", stride_f + 1, 2 * stride_f + 1));
    }
    let shape = check_latent_shape(&[(frames - 1) / stride_f + 1, h, w], model)
        .map_err(|what| format!("--w {width} --h {height} --f {frames}: latents must be {what}"))?;
    let config = SampleConfig { steps, shift, cfg_scale, seed, shape: [model.latent_channels(), shape[0], shape[1], shape[2]] };
    Ok(TextLine { prompt, negative, condition, config })
}

/// Latent F,H,W from a line: positive multiples of the patch size within the value limit, or
/// what they must be.
fn check_latent_shape(dims: &[usize], model: &ModelInfo) -> std::result::Result<[usize; 3], String> {
    let p = model.patch_size;
    // Checked products: latent values (channels included) must fit the limit.
    let values = dims.iter().try_fold(model.latent_channels(), |acc, &d| acc.checked_mul(d)).filter(|&v| v <= MAX_SAMPLE_VALUES);
    let ok = dims.len() == 3 && dims.iter().zip(p).all(|(&d, p)| d > 0 && d.is_multiple_of(p)) && values.is_some();
    if !ok {
        return Err(format!("three positive multiples of the patch size {p:?}, at most {MAX_SAMPLE_VALUES} latent values in all"));
    }
    Ok([dims[0], dims[1], dims[2]])
}

/// What one [`SampleWriter::write`] produced beyond its files.
pub struct Written {
    /// Why videos could not be written as MP4, to show once.
    pub warning: Option<String>,
    /// Each prompt's name and decoded contact sheet (`videos.png`), with a VAE decoder.
    pub contact_sheets: Vec<(String, PathBuf)>,
}

/// The inference graphs (one model, or a pair's experts switching at their timestep), the
/// prompts and the optional VAE decoder, loaded once per run.
pub struct SampleWriter {
    /// Each model's graph and the timestep from which it denoises (high noise first).
    graphs: Vec<(VelocityGraph, f32)>,
    prompts: Vec<Prompt>,
    context_shape: [usize; 2],
    decoder: Option<(VaeDecoder, VideoOptions)>,
}

impl SampleWriter {
    /// `models`: each model's artifacts, base weights, the timestep from which it denoises
    /// (`f32::NEG_INFINITY` for one model and a pair's low-noise expert) and its LoRA scale.
    pub fn load(models: &[(Artifacts, BaseWeights, f32, f32)], options: &SessionOptions, prompts: Vec<Prompt>, config: &SamplingConfig) -> Result<Self> {
        let Some((first, _, _, _)) = models.first() else { return Err(Error::Config("no model to sample with".into())) };
        let m = &first.manifest.model;
        let decoder = match &config.vae_decoder {
            Some(dir) => {
                let decoder = VaeDecoder::open(dir, options, m.latent_channels())?;
                for prompt in &prompts {
                    decoder.check_shape(prompt.config.shape).map_err(|e| Error::Config(format!("--vae-decoder {}: prompt {}: {e}", dir.display(), prompt.name)))?;
                }
                Some((decoder, VideoOptions { fps: FPS, save_frames: false, tile: config.vae_tile }))
            }
            None => None,
        };
        let graphs = models.iter().map(|(a, base, from, lora_scale)| Ok((VelocityGraph::load(a, options, base, *lora_scale)?, *from))).collect::<Result<_>>()?;
        Ok(Self { graphs, prompts, context_shape: [m.text_len, m.text_dim], decoder })
    }

    /// Samples every prompt with `params` (one per model, in `load`'s order) into
    /// `dir/NN-name/`; `dir/prompts.json` lists the settings. `dir` appears only when every prompt's files are written (they are written
    /// into a hidden sibling and renamed), so a failure leaves no partial step directory.
    pub fn write(&mut self, params: &[&Tensor<f32>], dir: &Path) -> Result<Written> {
        let staging = Staging::new(dir)?;
        let mut written = self.write_into(params, staging.path())?;
        for (_, path) in &mut written.contact_sheets {
            if let Ok(inside) = path.strip_prefix(staging.path()) {
                *path = dir.join(inside);
            }
        }
        staging.commit()?;
        Ok(written)
    }

    fn write_into(&mut self, params: &[&Tensor<f32>], dir: &Path) -> Result<Written> {
        let mut listed = Vec::new();
        let mut warning = None;
        let mut contact_sheets = Vec::new();
        for prompt in &self.prompts {
            let mut stages: Vec<Stage<'_>> =
                self.graphs.iter_mut().zip(params).map(|((graph, from_timestep), params)| Stage { graph, params, from_timestep: *from_timestep }).collect();
            let video = sample(&mut stages, (&self.context_shape, &prompt.context), prompt.negative.as_deref(), &prompt.conditioning, &prompt.config, &ProgressBar::hidden())?;
            let decoding = self.decoder.as_mut().map(|(d, o)| (d, *o));
            let prompt_tensors = PromptTensors { shape: self.context_shape, context: &prompt.context, negative: prompt.negative.as_deref() };
            if let Some(files) = write_outputs(&dir.join(&prompt.name), vec![video], prompt.config.shape, prompt_tensors, decoding)? {
                if let Mp4::NoFfmpeg(message) = files.mp4 {
                    warning = Some(message);
                }
                contact_sheets.push((prompt.name.clone(), files.contact_sheet));
            }
            let c = &prompt.config;
            let (text, negative) = prompt.text.clone().unzip();
            listed.push(serde_json::json!({"name": prompt.name, "prompt": text, "negative_prompt": negative, "seed": c.seed,
                "shape": c.shape, "steps": c.steps, "cfg_scale": c.cfg_scale, "shift": c.shift}));
        }
        let json = serde_json::to_vec_pretty(&listed).map_err(|e| Error::Config(e.to_string()))?;
        write_atomic(&dir.join("prompts.json"), &json)?;
        Ok(Written { warning, contact_sheets })
    }
}
