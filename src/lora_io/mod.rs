//! The flat LoRA buffer <-> named LoRA tensors, and LoRA files: written in ComfyUI layout
//! (`diffusion_model.blocks.0.self_attn.q.lora_A.weight` plus `.alpha`, which ComfyUI,
//! diffusers, musubi-tuner's converter and DiffSynth all load) or DiffSynth's
//! (`blocks.0.self_attn.q.lora_A.default.weight`, no alpha, which only DiffSynth loads);
//! read in those and in diffusers' and musubi's layouts (`read`).

mod read;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::artifacts::{LoraInfo, Manifest};
use crate::error::{Error, Result};
use crate::tensor_file::{OutTensor, SaveDtype, TensorFile, encode_with, write_atomic};

/// Key layout of a written LoRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum LoraFormat {
    /// `diffusion_model.` keys and per-module `.alpha`: loads in ComfyUI, diffusers (Wan),
    /// musubi-tuner (convert_lora.py) and DiffSynth-Studio.
    Comfyui,
    /// DiffSynth-Studio keys (`.lora_A.default.weight`), alpha/rank baked into B: loads in
    /// DiffSynth-Studio only.
    Diffsynth,
}

const COMFY_PREFIX: &str = "diffusion_model.";
/// Metadata keys that say which model a LoRA was trained for; checked wherever one is loaded.
pub const BASE_MODEL: &str = "flowstep.base_model";
pub const EXPERT: &str = "flowstep.expert";

/// `blocks.0.self_attn.q.lora_A.default.weight` -> `diffusion_model.blocks.0.self_attn.q.lora_A.weight`
pub fn comfy_key(key: &str) -> String {
    format!("{COMFY_PREFIX}{}", key.replace(".default.", "."))
}

/// The module a LoRA key belongs to (`blocks.0.self_attn.q`).
pub fn module_of(key: &str) -> &str {
    key.split(".lora_").next().unwrap_or(key)
}

/// Named tensors of a flat buffer, in manifest order.
pub fn unflatten(lora: &LoraInfo, flat: &[f32]) -> Result<Vec<OutTensor>> {
    if flat.len() != lora.num_params {
        return Err(Error::Shape { name: "lora_params".into(), expected: vec![lora.num_params], got: vec![flat.len()] });
    }
    Ok(lora
        .tensors
        .iter()
        .map(|t| OutTensor { name: t.key.clone(), shape: t.shape.clone(), values: flat[t.offset..t.offset + t.numel()].to_vec() })
        .collect())
}

/// DiffSynth files carry no alpha: its loader applies B·A at scale 1. flowstep's graphs
/// apply alpha/rank, so DiffSynth-format files hold B·alpha/rank (identical when alpha = rank).
fn diffsynth_b_scale(lora: &LoraInfo) -> f32 {
    (lora.alpha / lora.rank as f64) as f32
}

/// Writes a LoRA file atomically, with `metadata` (full keys) besides the rank, alpha and
/// targets it always records.
pub fn save(path: &Path, lora: &LoraInfo, flat: &[f32], format: LoraFormat, dtype: SaveDtype, metadata: &BTreeMap<String, String>) -> Result<()> {
    // Checked in the file's dtype: a finite f32 near f32::MAX rounds to infinity in bf16.
    let representable = |v: f32| match dtype {
        SaveDtype::F32 => v.is_finite(),
        SaveDtype::Bf16 => half::bf16::from_f32(v).is_finite(),
    };
    if let Some(i) = flat.iter().position(|&v| !representable(v)) {
        return Err(Error::Tensor { path: path.to_path_buf(), reason: format!("not written: LoRA parameter {i} is {} (not finite in {dtype:?})", flat[i]) });
    }
    let mut tensors = unflatten(lora, flat)?;
    let scale = diffsynth_b_scale(lora);
    if format == LoraFormat::Diffsynth && scale != 1.0 {
        tensors.iter_mut().filter(|t| t.name.contains(".lora_B.")).for_each(|t| t.values.iter_mut().for_each(|v| *v *= scale));
    }
    if format == LoraFormat::Comfyui {
        let mut modules: Vec<String> = Vec::new();
        for t in &mut tensors {
            let module = module_of(&t.name).to_string();
            if !modules.contains(&module) {
                modules.push(module);
            }
            t.name = comfy_key(&t.name);
        }
        for module in modules {
            tensors.push(OutTensor { name: format!("{COMFY_PREFIX}{module}.alpha"), shape: vec![], values: vec![lora.alpha as f32] });
        }
    }
    let mut meta: HashMap<String, String> = HashMap::from([
        ("format".into(), "pt".into()),
        ("flowstep.lora_rank".into(), lora.rank.to_string()),
        ("flowstep.lora_alpha".into(), lora.alpha.to_string()),
        ("flowstep.lora_targets".into(), lora.targets.join(",")),
    ]);
    meta.extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
    // Alphas stay f32 in a bf16 file: bf16 would round an alpha like 0.3 and change the scale.
    let dtype_of = |t: &OutTensor| if t.name.ends_with(".alpha") { SaveDtype::F32 } else { dtype };
    write_atomic(path, &encode_with(&tensors, dtype_of, Some(meta))?)
}

/// Reads a LoRA file into the flat buffer: DiffSynth-Studio, ComfyUI, diffusers/PEFT or
/// musubi-tuner/kohya keys, rescaled to `lora.alpha`; anything else is refused.
pub fn load(path: &Path, lora: &LoraInfo) -> Result<Vec<f32>> {
    refuse_checkpoint(path)?;
    Ok(read::load(path, lora, Some(lora.alpha))?.0)
}

/// A training checkpoint given where a LoRA file belongs gets the command that makes one.
fn refuse_checkpoint(path: &Path) -> Result<()> {
    if crate::checkpoint::is_checkpoint(path) {
        return Err(Error::Tensor {
            path: path.to_path_buf(),
            reason: "is a flowstep training checkpoint, not a LoRA file; make one with `flowstep export-lora CHECKPOINT_DIR --out FILE`, or use the run's OUT/loras/ files".into(),
        });
    }
    Ok(())
}

/// [`load`] for the model `manifest` describes, refusing first a LoRA that flowstep trained for
/// another base model or for the other expert of a Wan2.2 pair (its `flowstep.base_model` and
/// `flowstep.expert` metadata, written by [`save`]): such a file can have the same shapes and
/// would load without a word. Files from other tools carry neither and are judged by their keys.
/// The buffer is scaled for `alpha` (a run's `--lora-alpha`), or when None for the file's own
/// alpha (`sample`, `eval`); returns it with that alpha.
pub fn load_for(path: &Path, manifest: &Manifest, alpha: Option<f64>) -> Result<(Vec<f32>, f64)> {
    refuse_checkpoint(path)?;
    let file = TensorFile::open(path)?;
    let refuse = |reason: String| Error::Tensor { path: path.to_path_buf(), reason };
    let meta = file.metadata();
    let field = |key: &str| meta.and_then(|m| m.get(key));
    if let Some(base) = field(BASE_MODEL)
        && base != &manifest.model.name
    {
        return Err(refuse(format!("is a LoRA flowstep trained on base model `{base}` ({BASE_MODEL}); this export is `{}`", manifest.model.name)));
    }
    let role = manifest.expert.as_ref().map(|e| e.role.as_str());
    if let Some(expert) = field(EXPERT)
        && Some(expert.as_str()) != role
    {
        let this = role.map_or_else(|| "a single model, not an expert of a Wan2.2 pair".to_string(), |r| format!("the {r} expert"));
        return Err(refuse(format!("is a LoRA for the {expert} expert of a Wan2.2 pair ({EXPERT}); this export is {this}")));
    }
    read::load(path, &manifest.lora, alpha)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::LoraTensor;

    /// One module (block 0's q), rank 2, with the export's `alpha`.
    pub(crate) fn one_module(alpha: f64) -> LoraInfo {
        LoraInfo {
            rank: 2,
            alpha,
            targets: vec!["q".into()],
            num_params: 8,
            tensors: vec![
                LoraTensor { key: "blocks.0.self_attn.q.lora_A.default.weight".into(), shape: vec![2, 2], offset: 0 },
                LoraTensor { key: "blocks.0.self_attn.q.lora_B.default.weight".into(), shape: vec![2, 2], offset: 4 },
            ],
        }
    }

    fn info() -> LoraInfo {
        one_module(2.0)
    }

    #[test]
    fn diffsynth_files_bake_alpha_over_rank_into_b() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let info = LoraInfo { alpha: 4.0, ..info() };
        let flat = [0.5, -1.0, 2.0, 0.25, 1.5, -0.5, 0.125, 3.0];
        let path = dir.path().join("a.safetensors");
        save(&path, &info, &flat, LoraFormat::Diffsynth, SaveDtype::F32, &BTreeMap::new())?;
        let mut bad = flat;
        bad[3] = f32::NAN;
        assert!(save(&dir.path().join("nan.safetensors"), &info, &bad, LoraFormat::Diffsynth, SaveDtype::F32, &BTreeMap::new()).is_err());
        bad[3] = 3.4e38;
        assert!(save(&dir.path().join("big.safetensors"), &info, &bad, LoraFormat::Comfyui, SaveDtype::Bf16, &BTreeMap::new()).is_err());
        let b = TensorFile::open(&path)?.read_f32("blocks.0.self_attn.q.lora_B.default.weight")?.1;
        assert_eq!(b, vec![3.0, -1.0, 0.25, 6.0]);
        assert_eq!(load(&path, &info)?, flat);
        Ok(())
    }

    /// ComfyUI files keep B unscaled (the scale is their `.alpha`); loading one whose alpha
    /// differs from the export's rescales B only, by alpha_file / alpha_export.
    #[test]
    fn comfyui_alpha_scales_b_only() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let flat = [0.5, -1.0, 2.0, 0.25, 1.5, -0.5, 0.125, 3.0];
        let path = dir.path().join("c.safetensors");
        save(&path, &LoraInfo { alpha: 4.0, ..info() }, &flat, LoraFormat::Comfyui, SaveDtype::F32, &BTreeMap::new())?;
        let file = TensorFile::open(&path)?;
        assert_eq!(file.read_f32("diffusion_model.blocks.0.self_attn.q.lora_B.weight")?.1, flat[4..].to_vec());
        assert_eq!(file.read_f32("diffusion_model.blocks.0.self_attn.q.alpha")?.1, vec![4.0]);
        let loaded = load(&path, &info())?; // the export's alpha is 2
        assert_eq!(loaded[..4], flat[..4], "A is not rescaled");
        assert_eq!(loaded[4..], [3.0, -1.0, 0.25, 6.0], "B · 4/2");
        Ok(())
    }

    /// A bf16 ComfyUI file keeps each alpha in f32, so an alpha bf16 cannot hold (0.3)
    /// reads back as the export's and B is not rescaled.
    #[test]
    fn bf16_files_keep_alpha_in_f32() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let info = LoraInfo { alpha: 0.3, ..info() };
        let flat = [0.5, -1.0, 2.0, 0.25, 1.5, -0.5, 0.125, 3.0]; // all exact in bf16
        let path = dir.path().join("a.safetensors");
        save(&path, &info, &flat, LoraFormat::Comfyui, SaveDtype::Bf16, &BTreeMap::new())?;
        let file = TensorFile::open(&path)?;
        assert_eq!(file.info("diffusion_model.blocks.0.self_attn.q.alpha").map(|i| i.dtype), Some(safetensors::Dtype::F32));
        assert_eq!(file.info("diffusion_model.blocks.0.self_attn.q.lora_B.weight").map(|i| i.dtype), Some(safetensors::Dtype::BF16));
        assert_eq!(load(&path, &info)?, flat);
        Ok(())
    }

    #[test]
    fn keys() {
        assert_eq!(comfy_key("blocks.0.self_attn.q.lora_A.default.weight"), "diffusion_model.blocks.0.self_attn.q.lora_A.weight");
        assert_eq!(module_of("blocks.3.ffn.0.lora_B.default.weight"), "blocks.3.ffn.0");
    }

    #[test]
    fn roundtrip_both_formats() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let flat = [0.5, -1.0, 2.0, 0.25, 1.5, -0.5, 0.125, 3.0];
        for format in [LoraFormat::Diffsynth, LoraFormat::Comfyui] {
            let path = dir.path().join(format!("{format:?}.safetensors"));
            save(&path, &info(), &flat, format, SaveDtype::F32, &BTreeMap::new())?;
            assert_eq!(load(&path, &info())?, flat);
            let names = TensorFile::open(&path)?.names();
            match format {
                LoraFormat::Diffsynth => assert!(names.iter().all(|n| n.contains(".default.")) && names.len() == 2),
                LoraFormat::Comfyui => assert!(names.contains(&"diffusion_model.blocks.0.self_attn.q.alpha".to_string())),
            }
        }
        Ok(())
    }
}
