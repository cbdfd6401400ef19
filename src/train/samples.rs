//! Samples during training (`--sample-every N --sample-prompts FILE`): the inference graph,
//! on the same base weights and the current LoRA parameters, run for each prompt of the file
//! and written under `OUT/samples/step-XXXXXX/NN-<context name>/` in `flowstep sample`'s
//! layout (latents, their colour pictures and, with `--vae-decoder`, the decoded videos).
//!
//! The prompt file has one prompt per line, `#` comments and blank lines ignored:
//!
//! ```text
//! # context file (text-encoder output, relative to this file), then optional key=value
//! purple-up.safetensors seed=1
//! yellow-up.safetensors seed=2 shape=2,16,16 cfg=3 negative=empty.safetensors steps=20
//! ```
//!
//! `seed` defaults to 0, `shape` (latent F,H,W) to the training data's largest bucket,
//! `cfg` to 1 (no guidance), `negative` to an all-zero context, `steps` to `--sample-steps`,
//! `shift` to 5 (as `flowstep sample`). An image-to-video model needs `condition=FILE` (the
//! tensors `flowstep sample --condition` takes, at the line's shape).

use std::path::{Path, PathBuf};

use ort::value::Tensor;

use crate::artifacts::{Artifacts, ModelInfo};
use crate::error::{Error, Result};
use crate::decode::{Tile, VaeDecoder, VideoOptions};
use crate::executor::{BaseWeights, VelocityGraph};
use crate::runtime::SessionOptions;
use crate::data::Conditioning;
use crate::sample::{DEFAULT_SHIFT, SampleConfig, Stage, read_conditioning, read_context, sample, write_outputs};
use crate::tensor_file::{Staging, write_atomic};
use crate::video_files::Mp4;

/// `--sample-every`, `--sample-prompts`, `--sample-steps`, `--vae-decoder`, `--vae-tile`.
#[derive(Debug, Clone)]
pub struct SamplingConfig {
    pub every: u64,
    pub prompts: PathBuf,
    pub steps: usize,
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

/// One line of the prompt file, its context files read.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub name: String,
    pub context: Vec<f32>,
    pub negative: Option<Vec<f32>>,
    pub conditioning: Vec<Conditioning>,
    pub config: SampleConfig,
}

fn bad_line(file: &Path, line: usize, reason: impl std::fmt::Display) -> Error {
    Error::Config(format!("--sample-prompts {}:{line}: {reason}", file.display()))
}

/// Reads and checks the whole prompt file before training starts. `default_shape` is the
/// latent F,H,W used where a line gives none.
pub fn read_prompts(config: &SamplingConfig, model: &ModelInfo, default_shape: [usize; 3]) -> Result<Vec<Prompt>> {
    let file = &config.prompts;
    let text = crate::small_file::read_text(file, "prompt file (--sample-prompts)", MAX_PROMPT_FILE_BYTES)?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
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
                    let p = model.patch_size;
                    // Checked products: latent values (channels included) must fit the limit.
                    let values = dims.iter().try_fold(model.latent_channels(), |acc, &d| acc.checked_mul(d)).filter(|&v| v <= MAX_SAMPLE_VALUES);
                    let ok = dims.len() == 3 && dims.iter().zip(p).all(|(&d, p)| d > 0 && d.is_multiple_of(p)) && values.is_some();
                    if !ok {
                        return Err(number(&format!("three positive multiples of the patch size {p:?}, at most {MAX_SAMPLE_VALUES} latent values in all")));
                    }
                    shape = [dims[0], dims[1], dims[2]];
                }
                _ => return Err(bad_line(file, line_no, format!("unknown key `{key}` (seed, shape, steps, cfg, shift, negative, condition)"))),
            }
        }
        let name = format!("{:02}-{}", prompts.len(), Path::new(context).file_stem().and_then(|s| s.to_str()).unwrap_or("prompt"));
        let context = read_context(&dir.join(context), model)?;
        let config = SampleConfig { steps, shift, cfg_scale, seed, shape: [model.latent_channels(), shape[0], shape[1], shape[2]] };
        let conditioning = read_conditioning(condition.as_deref(), model, &config.shape).map_err(|e| bad_line(file, line_no, e))?;
        prompts.push(Prompt { name, context, negative, conditioning, config });
    }
    if prompts.is_empty() {
        return Err(Error::Config(format!("--sample-prompts {}: no prompts (one context file per line)", file.display())));
    }
    Ok(prompts)
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
    /// `models`: each model's artifacts, base weights and the timestep from which it denoises
    /// (`f32::NEG_INFINITY` for one model and a pair's low-noise expert).
    pub fn load(models: &[(Artifacts, BaseWeights, f32)], options: &SessionOptions, prompts: Vec<Prompt>, config: &SamplingConfig) -> Result<Self> {
        let Some((first, _, _)) = models.first() else { return Err(Error::Config("no model to sample with".into())) };
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
        let graphs = models.iter().map(|(a, base, from)| Ok((VelocityGraph::load(a, options, base)?, *from))).collect::<Result<_>>()?;
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
            let video = sample(&mut stages, (&self.context_shape, &prompt.context), prompt.negative.as_deref(), &prompt.conditioning, &prompt.config)?;
            let decoding = self.decoder.as_mut().map(|(d, o)| (d, *o));
            if let Some(files) = write_outputs(&dir.join(&prompt.name), vec![video], prompt.config.shape, decoding)? {
                if let Mp4::NoFfmpeg(message) = files.mp4 {
                    warning = Some(message);
                }
                contact_sheets.push((prompt.name.clone(), files.contact_sheet));
            }
            let c = &prompt.config;
            listed.push(serde_json::json!({"name": prompt.name, "seed": c.seed, "shape": c.shape, "steps": c.steps, "cfg_scale": c.cfg_scale, "shift": c.shift}));
        }
        let json = serde_json::to_vec_pretty(&listed).map_err(|e| Error::Config(e.to_string()))?;
        write_atomic(&dir.join("prompts.json"), &json)?;
        Ok(Written { warning, contact_sheets })
    }
}
