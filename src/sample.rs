//! Euler sampling through the inference graph with the scheduler's `step`, optionally
//! with classifier-free guidance against a negative (or empty) context, with image
//! conditioning, and with a Wan2.2 A14B expert pair switching at its boundary timestep.

use std::path::Path;

use indicatif::ProgressBar;
use ort::value::Tensor;
use rand::Rng;
use rand_distr::StandardNormal;

use crate::artifacts::{FIRST_FRAME_LATENTS, ModelInfo, Y};
use crate::data::Conditioning;
use crate::decode::{VaeDecoder, VideoFiles, VideoOptions, write_videos};
use crate::error::{Error, IoContext, Result};
use crate::render::Grid;
use crate::tensor_file::{OutTensor, SaveDtype, TensorFile, encode, write_atomic};
use crate::executor::{Batch, VelocityGraph};
use crate::scheduler::FlowMatchScheduler;
use crate::sft::step_rng;

/// Sampling settings.
#[derive(Debug, Clone)]
pub struct SampleConfig {
    pub steps: usize,
    pub shift: f32,
    /// 1.0 disables guidance (one model call per step).
    pub cfg_scale: f32,
    pub seed: u64,
    /// Latent shape [C, F, H, W].
    pub shape: [usize; 4],
}

/// Timestep shift of the Wan scheduler for sampling, where none is given.
pub const DEFAULT_SHIFT: f32 = 5.0;
/// Wan's sampling steps and guidance scale (Wan2.1's `generate.py` t2v config and
/// DiffSynth-Studio's `WanVideoPipeline` defaults): `flowstep sample`'s defaults.
pub const DEFAULT_STEPS: usize = 50;
pub const DEFAULT_CFG_SCALE: f32 = 5.0;
/// Wan's standard negative prompt (`sample_neg_prompt` in Wan2.1's `wan/configs/shared_config.py`,
/// the `negative_prompt` of DiffSynth-Studio's Wan examples): the negative prompt text sampling
/// uses where the prompt is text and none is given.
pub const WAN_NEGATIVE_PROMPT: &str = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走";
/// Characters of a prompt kept in a folder name.
const SLUG_CHARS: usize = 48;

/// A prompt as a folder-name part: letters and digits (any script) lower-cased, every other
/// run of characters one `-`, at most [`SLUG_CHARS`] characters; empty when nothing is left.
pub fn prompt_slug(text: &str) -> String {
    let mut slug = String::new();
    for c in text.chars().flat_map(char::to_lowercase) {
        if c.is_alphanumeric() {
            slug.push(c);
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
        if slug.chars().count() >= SLUG_CHARS {
            break;
        }
    }
    slug.trim_end_matches('-').to_string()
}

/// The prompt text a context file was encoded from (its `prompt` metadata, written by
/// `python -m flowstep_export.data.encode_prompts`), if it records one.
pub fn context_prompt(path: &Path) -> Result<Option<String>> {
    Ok(TensorFile::open(path)?.metadata().and_then(|m| m.get("prompt")).cloned())
}

/// The prompt's `context` and optional `negative_context` ([text_len, text_dim] each) saved
/// beside the latents: a text prompt's embeddings that way are a context file for `--context`.
#[derive(Debug, Clone, Copy)]
pub struct PromptTensors<'a> {
    pub shape: [usize; 2],
    pub context: &'a [f32],
    pub negative: Option<&'a [f32]>,
}

/// Initial noise for a seed, N(0, 1), independent of thread count.
pub fn initial_noise(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = step_rng(seed, u64::MAX - 1, 0);
    (0..len).map(|_| rng.sample::<f32, _>(StandardNormal)).collect()
}

/// One denoiser of a sampling run: a velocity graph with its LoRA, used for the steps whose
/// timestep is at least `from_timestep` (and below the previous stage's).
pub struct Stage<'a> {
    pub graph: &'a mut VelocityGraph,
    pub params: &'a Tensor<f32>,
    pub from_timestep: f32,
}

/// Writes the first-frame conditioning ([C, 1, H, W]) into frame 0 of `x` ([C, F, H, W]),
/// as DiffSynth's TI2V pipeline does before the first step and after every step.
fn put_first_frame(x: &mut [f32], shape: [usize; 4], first: &[f32]) {
    let [c, f, h, w] = shape;
    for ch in 0..c {
        x[ch * f * h * w..][..h * w].copy_from_slice(&first[ch * h * w..][..h * w]);
    }
}

/// Samples one latent video [C, F, H, W] for `context` ([L, D]) and the model's
/// `conditioning`. `stages` run from high to low noise: each step uses the first stage whose
/// `from_timestep` the timestep reaches (Wan2.2's expert switch); one stage for one model.
/// `progress` advances by one per step.
pub fn sample(stages: &mut [Stage<'_>], context: (&[usize], &[f32]), negative: Option<&[f32]>, conditioning: &[Conditioning], config: &SampleConfig, progress: &ProgressBar) -> Result<Vec<f32>> {
    if config.steps == 0 {
        return Err(Error::Config("--steps must be at least 1".into()));
    }
    let scheduler = FlowMatchScheduler::new(config.steps, 1.0, config.shift);
    let len: usize = config.shape.iter().product();
    let mut x = initial_noise(config.seed, len);
    let first_frame = conditioning.iter().find(|c| c.name == FIRST_FRAME_LATENTS).map(|c| c.values.as_slice());
    if let Some(first) = first_frame {
        put_first_frame(&mut x, config.shape, first);
    }
    let mut batch = Batch::new(&config.shape, context.0)?;
    batch.set_conditioning(conditioning)?;
    let (mut v, mut v_neg) = (Vec::with_capacity(len), Vec::with_capacity(len));
    let guided = config.cfg_scale != 1.0;
    let zeros;
    let negative = match negative {
        Some(n) => n,
        None => {
            zeros = vec![0.0; context.1.len()];
            &zeros
        }
    };
    for &t in &scheduler.timesteps {
        let Some(stage) = stages.iter_mut().find(|s| t >= s.from_timestep) else {
            return Err(Error::Config(format!("no model to sample timestep {t}: the last stage starts at {:?}", stages.last().map(|s| s.from_timestep))));
        };
        batch.x_t.extract_tensor_mut().1.copy_from_slice(&x);
        batch.set_scalars(t, 1.0);
        batch.context.extract_tensor_mut().1.copy_from_slice(context.1);
        stage.graph.velocity(stage.params, &batch, config.shape[0], &mut v)?;
        if guided {
            batch.context.extract_tensor_mut().1.copy_from_slice(negative);
            stage.graph.velocity(stage.params, &batch, config.shape[0], &mut v_neg)?;
            for (p, n) in v.iter_mut().zip(&v_neg) {
                *p = n + config.cfg_scale * (*p - n);
            }
        }
        scheduler.step(&v, t, &mut x);
        if let Some(first) = first_frame {
            put_first_frame(&mut x, config.shape, first);
        }
        progress.inc(1);
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite { step: config.steps as u64, what: "sampled latent", value: x[i] as f64 });
    }
    Ok(x)
}

/// Writes sampled latent videos ([C, F, H, W] each) under `out`: `samples.safetensors`
/// (`latents` [N, C, F, H, W] and the `prompt` tensors the videos were sampled with),
/// `samples.png` and `samples.gif` (latent channels 0-2 as colours, frames left to right) and,
/// with a VAE decoder, the decoded videos ([`write_videos`]). `flowstep sample` and samples
/// during training both write this layout.
pub fn write_outputs(out: &Path, videos: Vec<Vec<f32>>, shape: [usize; 4], prompt: PromptTensors<'_>, decoder: Option<(&mut VaeDecoder, VideoOptions)>) -> Result<Option<VideoFiles>> {
    std::fs::create_dir_all(out).at(out)?;
    let all: Vec<f32> = videos.iter().flatten().copied().collect();
    let mut tensors = vec![OutTensor { name: "latents".into(), shape: [videos.len()].into_iter().chain(shape).collect(), values: all }];
    for (name, values) in [("context", Some(prompt.context)), ("negative_context", prompt.negative)] {
        if let Some(values) = values {
            tensors.push(OutTensor { name: name.into(), shape: prompt.shape.to_vec(), values: values.to_vec() });
        }
    }
    write_atomic(&out.join("samples.safetensors"), &encode(&tensors, SaveDtype::F32, None)?)?;
    let decoded = decoder.map(|(decoder, options)| write_videos(decoder, &videos, shape, out, options)).transpose()?;
    let grid = Grid { videos, shape, scale: (128 / shape[3].max(1)).clamp(1, 16) as u32 };
    grid.write_png(&out.join("samples.png"))?;
    grid.write_gif(&out.join("samples.gif"))?;
    Ok(decoded)
}

/// I2V samples beside the image they were conditioned on: `first_frame.png`, a row per sample
/// with `y`'s image latents (its last C channels, latent frame 0) left of the sampled frames,
/// drawn as `samples.png` draws latents. Nothing for other conditioning.
pub fn write_first_frame_picture(out: &Path, videos: &[Vec<f32>], shape: [usize; 4], conditioning: &[Conditioning]) -> Result<()> {
    let Some(y) = conditioning.iter().find(|c| c.name == Y) else {
        return Ok(());
    };
    let [c, frames, h, w] = shape;
    let plane = h * w;
    // y is [mask channels + C, F, H, W]: the image's latents are its last C channels.
    let image_channel = |ch: usize| &y.values[((y.shape[0] - c + ch) * frames) * plane..][..plane];
    let rows = videos.iter().map(|video| {
        (0..c).flat_map(|ch| image_channel(ch).iter().chain(&video[ch * frames * plane..(ch + 1) * frames * plane]).copied()).collect()
    });
    let grid = Grid { videos: rows.collect(), shape: [c, frames + 1, h, w], scale: (128 / w.max(1)).clamp(1, 16) as u32 };
    grid.write_png(&out.join("first_frame.png"))
}

/// The image conditioning of an I2V/TI2V model for latents of `shape` [C, F, H, W], read from
/// a file holding the tensors its manifest lists (`flowstep sample --condition`, a prompt
/// line's `condition=`); none for a text-to-video model.
pub fn read_conditioning(path: Option<&Path>, model: &ModelInfo, shape: &[usize; 4]) -> Result<Vec<Conditioning>> {
    let needs = || model.conditioning.iter().map(|c| format!("`{}` {}", c.name, c.describe())).collect::<Vec<_>>().join(", ");
    let Some(path) = path else {
        if !model.conditioning.is_empty() {
            return Err(Error::Config(format!("{} ({}) needs image conditioning: a condition file (--condition, condition=) with {}", model.name, model.variant, needs())));
        }
        return Ok(Vec::new());
    };
    if model.conditioning.is_empty() {
        return Err(Error::Config(format!("{}: {} is a text-to-video model and takes no conditioning", path.display(), model.name)));
    }
    let file = TensorFile::open(path)?;
    let bad = |reason: String| Error::Config(format!("{}: {reason}", path.display()));
    model.conditioning.iter().map(|c| {
        let want = c.resolve(shape).ok_or_else(|| bad(format!("model.conditioning `{}` has an unknown dimension", c.name)))?;
        if file.info(&c.name).is_none() {
            return Err(bad(format!("missing tensor `{}` {} that {} needs", c.name, c.describe(), model.name)));
        }
        let (got, values) = file.read_f32(&c.name)?;
        if got != want {
            return Err(bad(format!("`{}` has shape {got:?}; with latents {:?} this model takes {want:?}", c.name, &shape[1..])));
        }
        if values.iter().any(|v| !v.is_finite()) {
            return Err(bad(format!("`{}` has NaN or Inf values", c.name)));
        }
        Ok(Conditioning { name: c.name.clone(), shape: got, values })
    }).collect()
}

/// A prompt's `context` [text_len, text_dim] (text-encoder output) from a .safetensors file,
/// checked against the model and for NaN/Inf.
pub fn read_context(path: &Path, model: &ModelInfo) -> Result<Vec<f32>> {
    let (shape, values) = TensorFile::open(path)?.read_f32("context")?;
    if shape != [model.text_len, model.text_dim] {
        return Err(Error::Config(format!("{}: `context` has shape {shape:?}, this model takes [{}, {}]", path.display(), model.text_len, model.text_dim)));
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::Config(format!("{}: `context` has NaN or infinite values", path.display())));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_keep_words_of_any_script() {
        assert_eq!(prompt_slug("A red fox runs, through SNOW!"), "a-red-fox-runs-through-snow");
        assert_eq!(prompt_slug("  --purple up--  "), "purple-up");
        assert_eq!(prompt_slug("一只狐狸 in snow"), "一只狐狸-in-snow");
        assert_eq!(prompt_slug("?!"), "");
        assert_eq!(prompt_slug(&"ab ".repeat(40)), "ab-".repeat(16).trim_end_matches('-'), "cut at the limit, no trailing dash");
    }
}
