//! Reading LoRA files in the key layouts of the tools flowstep's users come from. Each layout
//! names the same Wan modules its own way and states its scale differently; a file is mapped
//! onto the export's modules exactly (names and alpha) or refused, naming its layout and what
//! does not fit.

use std::collections::HashMap;
use std::path::Path;

use crate::artifacts::{LoraInfo, LoraTensor};
use crate::error::{Error, Result};
use crate::tensor_file::TensorFile;

use super::module_of;

/// A LoRA file's key layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Diffsynth,
    Comfyui,
    Diffusers,
    Musubi,
}

const LAYOUTS: [Layout; 4] = [Layout::Diffsynth, Layout::Comfyui, Layout::Diffusers, Layout::Musubi];

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Diffsynth => "DiffSynth-Studio",
            Layout::Comfyui => "ComfyUI",
            Layout::Diffusers => "diffusers/PEFT",
            Layout::Musubi => "musubi-tuner/kohya",
        }
    }

    fn example(self) -> &'static str {
        match self {
            Layout::Diffsynth => "`blocks.0.self_attn.q.lora_A.default.weight`",
            Layout::Comfyui => "`diffusion_model.blocks.0.self_attn.q.lora_A.weight` + `.alpha`",
            Layout::Diffusers => "`transformer.blocks.0.attn1.to_q.lora_A.weight`",
            Layout::Musubi => "`lora_unet_blocks_0_self_attn_q.lora_down.weight` + `.alpha`",
        }
    }

    /// The keys this layout may use for one module's A, B and alpha (diffusers keeps alpha
    /// in the file's metadata, not in tensors).
    fn keys(self, module: &str) -> [Vec<String>; 3] {
        let pair = |prefix: &str, m: &str, a: &[&str], b: &[&str]| {
            let names = |parts: &[&str]| parts.iter().map(|p| format!("{prefix}{m}.{p}.weight")).collect::<Vec<_>>();
            (names(a), names(b))
        };
        match self {
            Layout::Diffsynth => {
                let (a, b) = pair("", module, &["lora_A.default", "lora_A"], &["lora_B.default", "lora_B"]);
                [a, b, vec![format!("{module}.alpha")]]
            }
            Layout::Comfyui => {
                let (a, b) = pair(COMFY, module, &["lora_A", "lora_down"], &["lora_B", "lora_up"]);
                [a, b, vec![format!("{COMFY}{module}.alpha")]]
            }
            Layout::Diffusers => match diffusers_name(module) {
                Some(d) => {
                    let (mut a, mut b) = pair("transformer.", &d, &["lora_A"], &["lora_B"]);
                    let (a2, b2) = pair("", &d, &["lora_A"], &["lora_B"]);
                    a.extend(a2);
                    b.extend(b2);
                    [a, b, vec![]]
                }
                None => [vec![], vec![], vec![]],
            },
            Layout::Musubi => {
                let k = format!("lora_unet_{}", module.replace('.', "_"));
                [vec![format!("{k}.lora_down.weight")], vec![format!("{k}.lora_up.weight")], vec![format!("{k}.alpha")]]
            }
        }
    }

    /// A best guess for a file none of whose keys name a module of this export.
    fn guess(key: &str) -> Option<Layout> {
        if key.starts_with(COMFY) {
            Some(Layout::Comfyui)
        } else if key.starts_with("transformer.") {
            Some(Layout::Diffusers)
        } else if key.starts_with("lora_unet_") {
            Some(Layout::Musubi)
        } else if key.contains(".lora_A.") || key.contains(".lora_B.") {
            Some(Layout::Diffsynth)
        } else {
            None
        }
    }
}

const COMFY: &str = super::COMFY_PREFIX;

/// Wan module names in diffusers' WanTransformer3DModel (the mapping its own Wan LoRA
/// converter uses).
fn diffusers_name(module: &str) -> Option<String> {
    let rest = module.strip_prefix("blocks.")?;
    let (block, inner) = rest.split_once('.')?;
    let mapped = match inner {
        "self_attn.q" => "attn1.to_q",
        "self_attn.k" => "attn1.to_k",
        "self_attn.v" => "attn1.to_v",
        "self_attn.o" => "attn1.to_out.0",
        "cross_attn.q" => "attn2.to_q",
        "cross_attn.k" => "attn2.to_k",
        "cross_attn.v" => "attn2.to_v",
        "cross_attn.o" => "attn2.to_out.0",
        "cross_attn.k_img" => "attn2.add_k_proj",
        "cross_attn.v_img" => "attn2.add_v_proj",
        "ffn.0" => "ffn.net.0.proj",
        "ffn.2" => "ffn.net.2",
        _ => return None,
    };
    Some(format!("blocks.{block}.{mapped}"))
}

/// One adapted module of the export: its name and its A and B in the flat buffer.
struct Module<'a> {
    name: &'a str,
    a: &'a LoraTensor,
    b: &'a LoraTensor,
}

fn modules(lora: &LoraInfo) -> Result<Vec<Module<'_>>> {
    let by_key: HashMap<&str, &LoraTensor> = lora.tensors.iter().map(|t| (t.key.as_str(), t)).collect();
    lora.tensors
        .iter()
        .filter(|t| t.key.contains(".lora_A."))
        .map(|a| {
            let b_key = a.key.replace(".lora_A.", ".lora_B.");
            let b = by_key.get(b_key.as_str()).ok_or_else(|| Error::Config(format!("manifest: LoRA tensor `{}` has no `{b_key}`", a.key)))?;
            Ok(Module { name: module_of(&a.key), a, b })
        })
        .collect()
}

#[derive(Clone, Copy)]
enum Part {
    A,
    B,
    Alpha,
}

/// Where a file key belongs: module index, part, layout.
type Slot = (usize, Part, Layout);

/// Reads a LoRA file in any of the four layouts into the flat buffer, in flowstep's
/// convention (delta = B·A·alpha/rank), for `alpha`, or when None for the file's own (its
/// first module's: ComfyUI's W += up·down·alpha/rank). Each module's own scale (its `.alpha`,
/// diffusers' `lora_alpha` metadata, or 1 when it states none) that differs from that alpha
/// is moved into B; A is kept as stored. Returns the buffer and the alpha it is scaled for.
pub(super) fn load(path: &Path, lora: &LoraInfo, alpha: Option<f64>) -> Result<(Vec<f32>, f64)> {
    let mut target = alpha;
    let file = TensorFile::open(path)?;
    let fail = |reason: String| Error::Tensor { path: path.to_path_buf(), reason };
    let shape_of_export = || format!("rank {}, targets {}", lora.rank, lora.targets.join(","));
    let modules = modules(lora)?;
    let mut table: HashMap<String, Slot> = HashMap::new();
    for (i, m) in modules.iter().enumerate() {
        for layout in LAYOUTS {
            let [a, b, alpha] = layout.keys(m.name);
            for (keys, part) in [(a, Part::A), (b, Part::B), (alpha, Part::Alpha)] {
                table.extend(keys.into_iter().map(|k| (k, (i, part, layout))));
            }
        }
    }

    let names = file.names();
    let mut found: Vec<[Option<&str>; 3]> = vec![[None; 3]; modules.len()];
    let mut layouts: Vec<(Layout, &str)> = Vec::new();
    let mut unknown: Vec<&str> = Vec::new();
    for name in &names {
        let Some(&(i, part, layout)) = table.get(name) else {
            unknown.push(name);
            continue;
        };
        if !layouts.iter().any(|(l, _)| *l == layout) {
            layouts.push((layout, name));
        }
        if let Some(other) = found[i][part as usize].replace(name) {
            return Err(fail(format!("has both `{other}` and `{name}` for module `{}`", modules[i].name)));
        }
    }
    if let [(first, a), (second, b), ..] = layouts[..] {
        return Err(fail(format!("mixes key layouts: `{a}` is {}, `{b}` is {}", first.name(), second.name())));
    }
    let layout = layouts.first().map(|(l, _)| *l).or_else(|| names.iter().find_map(|n| Layout::guess(n)));
    unknown.sort_unstable();
    if let Some(first) = unknown.first() {
        let more = if unknown.len() > 1 { format!(" and {} more", unknown.len() - 1) } else { String::new() };
        let what = match layout {
            Some(l) => format!("{} LoRA", l.name()),
            None => {
                let known: Vec<String> = LAYOUTS.iter().map(|l| format!("{} ({})", l.name(), l.example())).collect();
                return Err(fail(format!("is not a LoRA in a layout flowstep reads (tensor `{first}`{more}); it reads {}", known.join(", "))));
            }
        };
        return Err(fail(match kind_of_unsupported(first) {
            Some(kind) => format!("{what}: `{first}` is {kind}; flowstep loads plain LoRA pairs (A/B or down/up, optional alpha) on the DiT"),
            None => format!("{what} has tensor `{first}`{more} that this model does not have ({}); it was made for another model or export", shape_of_export()),
        }));
    }
    let Some(layout) = layout else {
        return Err(fail("has no tensors".into()));
    };
    let file_alpha = file_alpha(&file, layout, lora.rank).map_err(fail)?;

    let mut flat = vec![0.0f32; lora.num_params];
    for (m, keys) in modules.iter().zip(&found) {
        let expected = layout.keys(m.name);
        let read = |t: &LoraTensor, part: Part| -> Result<Vec<f32>> {
            let Some(key) = keys[part as usize] else {
                return Err(fail(match expected[part as usize].first() {
                    Some(want) => format!(
                        "{} LoRA has no `{want}`: this export adapts module `{}` ({}); export with --lora-targets that match the file",
                        layout.name(),
                        m.name,
                        shape_of_export()
                    ),
                    None => format!("{} LoRA cannot name module `{}` of this export", layout.name(), m.name),
                }));
            };
            let (shape, values) = file.read_f32(key)?;
            if shape != t.shape {
                return Err(fail(format!("{} LoRA tensor `{key}` has shape {shape:?}, this export needs {:?} (rank {})", layout.name(), t.shape, lora.rank)));
            }
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(fail(format!("LoRA tensor `{key}` has a non-finite value at {i}")));
            }
            Ok(values)
        };
        let a = read(m.a, Part::A)?;
        let mut b = read(m.b, Part::B)?;
        let alpha = match keys[Part::Alpha as usize] {
            Some(key) => {
                let alpha = file.read_scalar(key)?;
                if !alpha.is_finite() {
                    return Err(fail(format!("LoRA alpha `{key}` is {alpha}")));
                }
                // kohya's and musubi-tuner's LoRAModule: `alpha = lora_dim if alpha is None or
                // alpha == 0`, i.e. scale 1; a literal 0 would switch the LoRA off.
                if alpha == 0.0 && layout == Layout::Musubi { lora.rank as f64 } else { alpha }
            }
            None => file_alpha,
        };
        // delta = B_file·A·alpha/rank must equal B·A·target/rank.
        let factor = alpha / *target.get_or_insert(alpha);
        if factor != 1.0 {
            b.iter_mut().for_each(|v| *v *= factor as f32);
            if let Some(i) = b.iter().position(|v| !v.is_finite()) {
                return Err(fail(format!("LoRA tensor `{}` times its alpha scale {factor} is non-finite at {i}", keys[Part::B as usize].unwrap_or_default())));
            }
        }
        flat[m.a.offset..m.a.offset + a.len()].copy_from_slice(&a);
        flat[m.b.offset..m.b.offset + b.len()].copy_from_slice(&b);
    }
    Ok((flat, target.unwrap_or(lora.alpha)))
}

/// The alpha of a module whose file states none, in flowstep's convention (delta =
/// B·A·alpha/rank): rank (scale 1, as DiffSynth, ComfyUI and kohya apply such files), or
/// what diffusers' `lora_adapter_metadata` says (`lora_alpha`, over √r with rsLoRA).
fn file_alpha(file: &TensorFile, layout: Layout, rank: usize) -> std::result::Result<f64, String> {
    let rank = rank as f64;
    let meta = file.metadata().and_then(|m| m.get("lora_adapter_metadata"));
    let (Layout::Diffusers, Some(meta)) = (layout, meta) else {
        return Ok(rank);
    };
    let json: serde_json::Value = serde_json::from_str(meta).map_err(|e| format!("lora_adapter_metadata is not JSON: {e}"))?;
    // Pipeline-level saves prefix every field with `transformer.`.
    let field = |name: &str| json.get(name).or_else(|| json.get(format!("transformer.{name}")));
    let non_empty = |name: &str| field(name).is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty()));
    if let Some(pattern) = ["rank_pattern", "alpha_pattern"].into_iter().find(|p| non_empty(p)) {
        return Err(format!("diffusers/PEFT LoRA with a per-module {pattern}; flowstep maps one rank and alpha for all modules"));
    }
    if field("use_dora").and_then(|v| v.as_bool()) == Some(true) {
        return Err("diffusers/PEFT LoRA uses DoRA; flowstep loads plain LoRA pairs".into());
    }
    let number = |name: &str| field(name).and_then(|v| v.as_f64());
    let (Some(r), Some(lora_alpha)) = (number("r"), number("lora_alpha")) else {
        return Ok(rank);
    };
    if r != rank {
        return Err(format!("diffusers/PEFT LoRA has r = {r} in its metadata, this export has rank {rank}"));
    }
    let rslora = field("use_rslora").and_then(|v| v.as_bool()) == Some(true);
    // PEFT scales by lora_alpha/r, or lora_alpha/√r with rsLoRA.
    Ok(if rslora { lora_alpha * rank / rank.sqrt() } else { lora_alpha })
}

/// Tensors of LoRA variants flowstep has no mapping for.
fn kind_of_unsupported(key: &str) -> Option<&'static str> {
    if key.contains("hada_") || key.contains("lokr_") {
        Some("a LyCORIS LoHa/LoKr tensor")
    } else if key.contains("dora_scale") || key.contains("lora_magnitude_vector") {
        Some("a DoRA magnitude")
    } else if key.ends_with(".diff") || key.ends_with(".diff_b") {
        Some("a full weight or bias difference")
    } else if key.starts_with("lora_te") || key.starts_with("text_encoder") {
        Some("a text-encoder tensor")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor_file::{OutTensor, SaveDtype, encode, write_atomic};

    /// One module, rank 2, export alpha 4: flowstep's delta is B·A·2.
    fn info() -> LoraInfo {
        super::super::tests::one_module(4.0)
    }

    const A: [f32; 4] = [0.5, -1.0, 2.0, 0.25];
    const B: [f32; 4] = [1.5, -0.5, 0.125, 3.0];

    /// Writes `a`, `b` and optionally a scalar alpha under the given names.
    fn write(dir: &Path, a: &str, b: &str, alpha: Option<(&str, f32)>, meta: Option<(&str, &str)>) -> std::path::PathBuf {
        let mut tensors = vec![
            OutTensor { name: a.into(), shape: vec![2, 2], values: A.to_vec() },
            OutTensor { name: b.into(), shape: vec![2, 2], values: B.to_vec() },
        ];
        if let Some((name, value)) = alpha {
            tensors.push(OutTensor { name: name.into(), shape: vec![], values: vec![value] });
        }
        let meta = meta.map(|(k, v)| HashMap::from([(k.to_string(), v.to_string())]));
        let path = dir.join(format!("{a}.safetensors"));
        write_atomic(&path, &encode(&tensors, SaveDtype::F32, meta).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
        path
    }

    /// Scaled for the export's alpha, as training reads a file.
    fn load(path: &Path, lora: &LoraInfo) -> Result<Vec<f32>> {
        super::load(path, lora, Some(lora.alpha)).map(|(flat, _)| flat)
    }

    /// `sample` and `eval` apply a file at its own alpha: B as stored, whatever the export's.
    #[test]
    fn own_alpha_keeps_b_as_stored() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let d = dir.path();
        let comfy = write(d, "diffusion_model.blocks.0.self_attn.q.lora_A.weight", "diffusion_model.blocks.0.self_attn.q.lora_B.weight",
            Some(("diffusion_model.blocks.0.self_attn.q.alpha", 6.0)), None);
        assert_eq!(super::load(&comfy, &info(), None)?, ([A, B].concat(), 6.0));
        // No alpha (DiffSynth): scale 1, alpha = rank.
        let diffsynth = write(d, "blocks.0.self_attn.q.lora_A.default.weight", "blocks.0.self_attn.q.lora_B.default.weight", None, None);
        assert_eq!(super::load(&diffsynth, &info(), None)?, ([A, B].concat(), 2.0));
        Ok(())
    }

    /// B as flowstep holds it when the file's delta is B_file·A·`file_scale`.
    fn b_for(file_scale: f32) -> Vec<f32> {
        B.iter().map(|v| v * file_scale / 2.0).collect()
    }

    #[test]
    fn every_layout_maps_onto_the_export_with_its_own_scale() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let d = dir.path();
        let cases = [
            // DiffSynth: no alpha, scale 1.
            (write(d, "blocks.0.self_attn.q.lora_A.default.weight", "blocks.0.self_attn.q.lora_B.default.weight", None, None), 1.0),
            // ComfyUI with down/up names and alpha 1: scale 1/2.
            (write(d, "diffusion_model.blocks.0.self_attn.q.lora_down.weight", "diffusion_model.blocks.0.self_attn.q.lora_up.weight", Some(("diffusion_model.blocks.0.self_attn.q.alpha", 1.0)), None), 0.5),
            // ComfyUI without alpha (musubi's `--target other` output): scale 1.
            (write(d, "diffusion_model.blocks.0.self_attn.q.lora_A.weight", "diffusion_model.blocks.0.self_attn.q.lora_B.weight", None, None), 1.0),
            // musubi/kohya with alpha 8: scale 4.
            (write(d, "lora_unet_blocks_0_self_attn_q.lora_down.weight", "lora_unet_blocks_0_self_attn_q.lora_up.weight", Some(("lora_unet_blocks_0_self_attn_q.alpha", 8.0)), None), 4.0),
            // diffusers without metadata: scale 1.
            (write(d, "transformer.blocks.0.attn1.to_q.lora_A.weight", "transformer.blocks.0.attn1.to_q.lora_B.weight", None, None), 1.0),
            // diffusers, model-level save (no prefix), lora_alpha 6 over r 2: scale 3.
            (write(d, "blocks.0.attn1.to_q.lora_A.weight", "blocks.0.attn1.to_q.lora_B.weight", None, Some(("lora_adapter_metadata", r#"{"r": 2, "lora_alpha": 6, "use_rslora": false}"#))), 3.0),
        ];
        for (path, scale) in cases {
            let flat = load(&path, &info())?;
            assert_eq!(flat[..4], A, "{}: A is kept as stored", path.display());
            assert_eq!(flat[4..], b_for(scale), "{}", path.display());
        }
        // musubi/kohya with alpha 0, which musubi reads as alpha = rank: scale 1.
        let zero = write(d, "lora_unet_blocks_0_self_attn_q.lora_down.weight", "lora_unet_blocks_0_self_attn_q.lora_up.weight", Some(("lora_unet_blocks_0_self_attn_q.alpha", 0.0)), None);
        assert_eq!(load(&zero, &info())?[4..], b_for(1.0));
        // Pipeline-level diffusers metadata (fields prefixed) with rsLoRA: scale 4/√2.
        let path = write(d, "transformer.blocks.0.attn1.to_q.lora_A.weight", "transformer.blocks.0.attn1.to_q.lora_B.weight", None,
            Some(("lora_adapter_metadata", r#"{"transformer.r": 2, "transformer.lora_alpha": 4, "transformer.use_rslora": true}"#)));
        let got = load(&path, &info())?;
        let want = b_for(4.0 / 2f32.sqrt());
        assert!(got[4..].iter().zip(&want).all(|(g, w)| (g - w).abs() <= 1e-6 * w.abs()), "{got:?} vs {want:?}");
        Ok(())
    }

    fn refused(path: &Path) -> String {
        match load(path, &info()) {
            Ok(_) => panic!("{} loaded", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn files_that_do_not_map_exactly_are_refused_naming_their_layout() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let d = dir.path();
        let check = |path: std::path::PathBuf, parts: &[&str]| {
            let message = refused(&path);
            for part in parts {
                assert!(message.contains(part), "`{part}` not in: {message}");
            }
        };
        // A musubi file for other modules: its layout, the stray key, and "does not have".
        check(write(d, "lora_unet_blocks_0_cross_attn_q.lora_down.weight", "lora_unet_blocks_0_cross_attn_q.lora_up.weight", None, None),
            &["musubi-tuner/kohya LoRA", "lora_unet_blocks_0_cross_attn_q.lora_down.weight", "and 1 more", "does not have"]);
        // Mixed layouts.
        check(write(d, "diffusion_model.blocks.0.self_attn.q.lora_A.weight", "blocks.0.self_attn.q.lora_B.default.weight", None, None),
            &["mixes key layouts", "ComfyUI", "DiffSynth-Studio"]);
        // A ComfyUI file with only A for the module: names the layout and the missing key.
        check(write(d, "diffusion_model.blocks.0.self_attn.q.lora_A.weight", "diffusion_model.blocks.0.self_attn.q.alpha", None, None),
            &["ComfyUI LoRA has no `diffusion_model.blocks.0.self_attn.q.lora_B.weight`", "--lora-targets"]);
        // Two names for one tensor.
        check(write(d, "diffusion_model.blocks.0.self_attn.q.lora_A.weight", "diffusion_model.blocks.0.self_attn.q.lora_down.weight", None, None),
            &["has both", "blocks.0.self_attn.q"]);
        // LyCORIS, and per-module PEFT patterns.
        check(write(d, "lora_unet_blocks_0_self_attn_q.hada_w1_a", "lora_unet_blocks_0_self_attn_q.hada_w1_b", None, None),
            &["musubi-tuner/kohya LoRA", "LoHa/LoKr"]);
        check(write(d, "transformer.blocks.0.attn1.to_q.lora_A.weight", "transformer.blocks.0.attn1.to_q.lora_B.weight", None,
            Some(("lora_adapter_metadata", r#"{"r": 2, "lora_alpha": 2, "alpha_pattern": {"blocks.0.attn1.to_q": 4}}"#))),
            &["diffusers/PEFT", "alpha_pattern"]);
        // An alpha whose scale overflows B.
        let huge = write(d, "diffusion_model.blocks.0.self_attn.q.lora_down.weight", "diffusion_model.blocks.0.self_attn.q.lora_up.weight",
            Some(("diffusion_model.blocks.0.self_attn.q.alpha", 1e10)), None);
        let message = load(&huge, &LoraInfo { alpha: 1e-30, ..info() }).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("lora_up.weight` times its alpha scale") && message.contains("non-finite"), "{message}");
        // Not a LoRA at all.
        check(write(d, "latents", "context", None, None), &["not a LoRA in a layout flowstep reads", "(tensor `context` and 1 more)", "musubi-tuner/kohya"]);
        Ok(())
    }

    #[test]
    fn diffusers_names_follow_wan_transformer_3d() {
        assert_eq!(diffusers_name("blocks.7.self_attn.o").as_deref(), Some("blocks.7.attn1.to_out.0"));
        assert_eq!(diffusers_name("blocks.0.cross_attn.k_img").as_deref(), Some("blocks.0.attn2.add_k_proj"));
        assert_eq!(diffusers_name("blocks.3.ffn.0").as_deref(), Some("blocks.3.ffn.net.0.proj"));
        assert_eq!(diffusers_name("head.head"), None);
    }
}
