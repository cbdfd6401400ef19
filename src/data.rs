//! The cached dataset: a directory of safetensors samples (`latents` [C,F,H,W], `context`
//! [L,D], and the conditioning an image-to-video model takes under DiffSynth's cache names:
//! `y`, `clip_feature`, `first_frame_latents`), checked against the model, visited in a
//! seeded per-epoch order.
//!
//! Samples may differ in frames, height and width (resolution and length buckets): each
//! step trains on one sample, and the graphs' axes are dynamic.
//!
//! The order is a pure function of (seed, sample counter), so a resumed run needs only the
//! counter to continue exactly where it stopped.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::artifacts::{ConditioningInput, FIRST_FRAME_LATENTS, ModelInfo};
use crate::error::{Error, IoContext, Result};
use crate::tensor_file::TensorFile;

pub const LATENTS: &str = "latents";
pub const CONTEXT: &str = "context";
/// Every conditioning tensor a DiffSynth cache may carry, whichever model it was made for.
const CONDITIONING_NAMES: [&str; 3] = ["y", "clip_feature", FIRST_FRAME_LATENTS];
/// The timestep boundaries a converted DiffSynth cache was made with (convert_diffsynth.py).
pub const BOUNDARIES_FILE: &str = "diffsynth_boundaries.json";

/// The `[min, max)` timestep boundaries stored with a dataset converted from a DiffSynth cache
/// (DiffSynth trains a cache with the boundaries it holds), or None when there are none.
pub fn stored_boundaries(dir: &Path) -> Result<Option<(f64, f64)>> {
    let path = dir.join(BOUNDARIES_FILE);
    if std::fs::symlink_metadata(&path).is_err() {
        return Ok(None);
    }
    let text = crate::small_file::read_text(&path, "timestep boundaries of a converted DiffSynth cache", 1 << 16)?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&path, format!("not valid JSON: {e}")))?;
    let get = |key: &str| value.get(key).and_then(serde_json::Value::as_f64).filter(|v| (0.0..=1.0).contains(v));
    match (get("min_timestep_boundary"), get("max_timestep_boundary")) {
        (Some(lo), Some(hi)) if lo < hi => Ok(Some((lo, hi))),
        _ => Err(bad(&path, "expected {\"min_timestep_boundary\": a, \"max_timestep_boundary\": b} with 0 <= a < b <= 1")),
    }
}

/// One training sample, as float32.
#[derive(Debug, Clone)]
pub struct Sample {
    pub path: PathBuf,
    pub latents: Vec<f32>,
    pub latent_shape: Vec<usize>,
    pub context: Vec<f32>,
    pub context_shape: Vec<usize>,
    /// The model's conditioning tensors, in the manifest's order.
    pub conditioning: Vec<Conditioning>,
}

/// One conditioning tensor of a sample (`y`, `clip_feature`, `first_frame_latents`).
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// What a sample must look like for this model.
#[derive(Debug, Clone)]
pub struct SampleSpec {
    pub channels: usize,
    pub patch: [usize; 3],
    pub text_len: usize,
    pub text_dim: usize,
    /// The model's name and variant, for the error a sample without its conditioning gets.
    pub model: String,
    pub conditioning: Vec<ConditioningInput>,
}

impl SampleSpec {
    pub fn for_model(model: &ModelInfo) -> Self {
        Self {
            channels: model.latent_channels(),
            patch: model.patch_size,
            text_len: model.text_len,
            text_dim: model.text_dim,
            model: format!("{} ({})", model.name, model.variant),
            conditioning: model.conditioning.clone(),
        }
    }

    /// Checks a sample's conditioning tensors (name and shape, from a header) for latents of
    /// shape `latent`: each the model takes must be there, with its shape.
    pub fn check_conditioning(&self, latent: &[usize], shape_of: impl Fn(&str) -> Option<Vec<usize>>) -> std::result::Result<(), String> {
        for c in &self.conditioning {
            let want = c.resolve(latent).ok_or_else(|| format!("model.conditioning `{}` has an unknown dimension in {}", c.name, c.describe()))?;
            let Some(got) = shape_of(&c.name) else {
                return Err(format!(
                    "missing tensor `{}` {} that the {} model needs (its image conditioning, under DiffSynth's cache name; \
                     convert a DiffSynth cache made with --extra_inputs input_image)",
                    c.name, c.describe(), self.model
                ));
            };
            if got != want {
                return Err(format!("tensor `{}` has shape {got:?}; with latents {latent:?} this model takes {want:?} ({})", c.name, c.describe()));
            }
        }
        if self.conditioning.iter().any(|c| c.name == FIRST_FRAME_LATENTS) && latent.get(1).is_some_and(|&f| f < 2) {
            return Err(format!("tensor `{LATENTS}` has 1 frame; first-frame conditioning trains on frames 1 and up, so it needs at least 2"));
        }
        Ok(())
    }
}

/// A directory of samples whose headers were all checked when it was opened.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub spec: SampleSpec,
    /// Each file's size and modification time when the dataset was opened.
    stamps: Vec<(u64, Option<SystemTime>)>,
    /// Each file's latent shape [C, F, H, W], from its header.
    latent_shapes: Vec<Vec<usize>>,
}

/// The samples that share one latent shape.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Bucket {
    /// [C, F, H, W]
    pub latent_shape: Vec<usize>,
    pub samples: usize,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Data { path: path.to_path_buf(), reason: reason.into() }
}

impl Dataset {
    /// Lists `*.safetensors` in `dir` (sorted) and checks every sample's tensor names,
    /// dtypes and shapes against the model; the first problem is an error naming the file.
    pub fn open(dir: &Path, spec: SampleSpec) -> Result<Self> {
        match std::fs::metadata(dir) {
            Ok(meta) if !meta.is_dir() => return Err(bad(dir, format!("is {}, expected the dataset directory", crate::artifacts::kind_of(&meta)))),
            Ok(_) => {}
            Err(_) => return Err(bad(dir, "dataset directory does not exist")),
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .at(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(bad(dir, "no *.safetensors samples in the dataset directory"));
        }
        let mut stamps = Vec::with_capacity(files.len());
        for path in &files {
            let meta = std::fs::metadata(path).at(path)?;
            if !meta.is_file() {
                return Err(bad(path, format!("is {}, expected a .safetensors sample file", crate::artifacts::kind_of(&meta))));
            }
            stamps.push((meta.len(), meta.modified().ok()));
        }
        let latent_shapes = files.iter().map(|path| check_header(path, &spec)).collect::<Result<_>>()?;
        Ok(Self { dir: dir.to_path_buf(), files, spec, stamps, latent_shapes })
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The latent shapes present, largest token count first, with how many samples each.
    pub fn buckets(&self) -> Vec<Bucket> {
        let mut counts = std::collections::BTreeMap::<&[usize], usize>::new();
        for shape in &self.latent_shapes {
            *counts.entry(shape).or_default() += 1;
        }
        let mut buckets: Vec<Bucket> = counts.into_iter().map(|(shape, samples)| Bucket { latent_shape: shape.to_vec(), samples }).collect();
        buckets.sort_by_key(|b| std::cmp::Reverse(b.latent_shape.iter().product::<usize>()));
        buckets
    }

    /// The sample's size and modification time are still those the run opened.
    fn check_unchanged(&self, index: usize) -> Result<()> {
        let path = &self.files[index];
        let (len, modified) = self.stamps[index];
        let meta = std::fs::metadata(path).at(path)?;
        if meta.len() != len || meta.modified().ok() != modified {
            return Err(bad(path, format!("changed since the run opened the dataset ({len} bytes then, {} now); a sample must not change under a running job", meta.len())));
        }
        Ok(())
    }

    /// Reads a sample; non-finite values are an error naming the sample and tensor.
    pub fn load(&self, index: usize) -> Result<Sample> {
        let path = &self.files[index];
        self.check_unchanged(index)?;
        let file = TensorFile::read(path, self.stamps[index].0).map_err(|e| {
            // Rewritten while being read: say so, not what the half-written bytes look like.
            self.check_unchanged(index).err().unwrap_or_else(|| bad(path, format!("cannot read sample: {}", strip_path(&e, path))))
        })?;
        let (latent_shape, latents) = file.read_f32(LATENTS)?;
        let (context_shape, context) = file.read_f32(CONTEXT)?;
        for (name, values) in [(LATENTS, &latents), (CONTEXT, &context)] {
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(Error::NonFiniteSample { path: path.clone(), tensor: name.into(), index: i, value: values[i] });
            }
        }
        let mut conditioning = Vec::with_capacity(self.spec.conditioning.len());
        for c in &self.spec.conditioning {
            let (shape, values) = file.read_f32(&c.name)?;
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(Error::NonFiniteSample { path: path.clone(), tensor: c.name.clone(), index: i, value: values[i] });
            }
            conditioning.push(Conditioning { name: c.name.clone(), shape, values });
        }
        Ok(Sample { path: path.clone(), latents, latent_shape, context, context_shape, conditioning })
    }
}

/// Checks a sample's header against the model; returns its latent shape.
fn check_header(path: &Path, s: &SampleSpec) -> Result<Vec<usize>> {
    let file = TensorFile::open(path).map_err(|e| bad(path, format!("cannot read sample: {}", strip_path(&e, path))))?;
    let latents = file.info(LATENTS).ok_or_else(|| bad(path, format!("missing tensor `{LATENTS}` ([C, F, H, W] VAE latents)")))?;
    let context = file.info(CONTEXT).ok_or_else(|| bad(path, format!("missing tensor `{CONTEXT}` ([L, D] text embeddings)")))?;
    for (name, info) in [(LATENTS, &latents), (CONTEXT, &context)] {
        if !matches!(info.dtype, safetensors::Dtype::F32 | safetensors::Dtype::BF16 | safetensors::Dtype::F16) {
            return Err(bad(path, format!("tensor `{name}` has dtype {:?}; expected F32, BF16 or F16", info.dtype)));
        }
    }
    let l = &latents.shape;
    if l.len() != 4 {
        return Err(bad(path, format!("tensor `{LATENTS}` has shape {l:?}; expected 4 dims [C, F, H, W]")));
    }
    if l[0] != s.channels {
        return Err(bad(path, format!("tensor `{LATENTS}` has {} channels; this model takes {}", l[0], s.channels)));
    }
    for (axis, (&n, &p)) in ["frames", "height", "width"].iter().zip(l[1..].iter().zip(&s.patch)) {
        if n == 0 || n % p != 0 {
            return Err(bad(path, format!("tensor `{LATENTS}` {axis} {n} is not a positive multiple of the patch size {p}")));
        }
    }
    if context.shape != [s.text_len, s.text_dim] {
        return Err(bad(path, format!("tensor `{CONTEXT}` has shape {:?}; this model takes [{}, {}]", context.shape, s.text_len, s.text_dim)));
    }
    for c in &s.conditioning {
        if let Some(info) = file.info(&c.name)
            && !matches!(info.dtype, safetensors::Dtype::F32 | safetensors::Dtype::BF16 | safetensors::Dtype::F16)
        {
            return Err(bad(path, format!("tensor `{}` has dtype {:?}; expected F32, BF16 or F16", c.name, info.dtype)));
        }
    }
    s.check_conditioning(l, |name| file.info(name).map(|i| i.shape)).map_err(|reason| bad(path, reason))?;
    // A cache made for another variant (an I2V cache on a T2V model) would train without the
    // conditioning it was made with: refused rather than silently ignored.
    if let Some(extra) = CONDITIONING_NAMES.iter().find(|n| file.info(n).is_some() && !s.conditioning.iter().any(|c| c.name == **n)) {
        let takes = if s.conditioning.is_empty() { "takes no image conditioning".to_string() } else {
            format!("takes only {}", s.conditioning.iter().map(|c| format!("`{}`", c.name)).collect::<Vec<_>>().join(", "))
        };
        return Err(bad(path, format!(
            "has conditioning tensor `{extra}`, but the {} model {takes}: this sample was made for another variant (an I2V/TI2V cache); \
             train it with that variant's export, or remove `{extra}`",
            s.model
        )));
    }
    Ok(l.clone())
}

fn strip_path(e: &Error, path: &Path) -> String {
    let s = e.to_string();
    s.strip_prefix(&format!("{}: ", path.display())).map(str::to_string).unwrap_or(s)
}

/// Seeded visiting order: each epoch is a fresh permutation of `len · repeat` slots.
#[derive(Debug, Clone, Copy)]
pub struct DataOrder {
    pub seed: u64,
    pub len: usize,
    pub repeat: usize,
}

impl DataOrder {
    pub fn epoch_len(&self) -> usize {
        self.len * self.repeat.max(1)
    }

    /// The sample index of the `counter`-th sample drawn since the start of training.
    pub fn sample(&self, counter: u64) -> usize {
        let n = self.epoch_len() as u64;
        let (epoch, position) = (counter / n, (counter % n) as usize);
        self.permutation(epoch)[position] % self.len
    }

    pub fn epoch_of(&self, counter: u64) -> u64 {
        counter / self.epoch_len() as u64
    }

    pub fn permutation(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.epoch_len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0xda7a_04d3_u64.wrapping_mul(epoch.wrapping_add(1)));
        order.shuffle(&mut rng);
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_a_seeded_permutation_per_epoch() {
        let order = DataOrder { seed: 7, len: 5, repeat: 2 };
        let epoch0: Vec<usize> = (0..10).map(|c| order.sample(c)).collect();
        let epoch1: Vec<usize> = (10..20).map(|c| order.sample(c)).collect();
        for e in [&epoch0, &epoch1] {
            let mut counts = [0; 5];
            e.iter().for_each(|&i| counts[i] += 1);
            assert_eq!(counts, [2; 5], "each sample twice per epoch with repeat 2");
        }
        assert_ne!(epoch0, epoch1, "epochs are reshuffled");
        let again: Vec<usize> = (0..10).map(|c| DataOrder { seed: 7, len: 5, repeat: 2 }.sample(c)).collect();
        assert_eq!(epoch0, again);
        let other: Vec<usize> = (0..10).map(|c| DataOrder { seed: 8, len: 5, repeat: 2 }.sample(c)).collect();
        assert_ne!(epoch0, other);
    }
}
