//! Checks that a manifest is self-consistent, matches its files, and matches the graphs
//! ONNX Runtime actually loaded. A mismatch is an error naming the file, never a guess.

use std::collections::{BTreeMap, HashSet};

use ort::session::Session;
use ort::value::ValueType;

use super::{Artifacts, Dim, FORMAT_VERSION, IoSpec, LORA_INIT, LORA_SCALE, LOSS_INPUTS, OPTIMIZER_INPUTS, OPTIMIZER_OUTPUTS};
use crate::error::{Error, IoContext, Result};

fn bad(artifacts: &Artifacts, reason: String) -> Error {
    Error::Manifest { path: artifacts.dir.join("manifest.json"), reason }
}

/// Structure: version, LoRA layout, the graphs' input lists.
pub(super) fn check_manifest(a: &Artifacts) -> Result<()> {
    let m = &a.manifest;
    if m.format_version != FORMAT_VERSION {
        return Err(bad(a, format!("format_version {} is not supported (this flowstep reads {FORMAT_VERSION}); re-export with this version's flowstep_export", m.format_version)));
    }
    check_model(a)?;
    check_lora(a)?;
    let needs_hash = m.graphs.values().map(|g| g.file.as_str()).chain(m.base_weights.file.as_deref()).chain([LORA_INIT]);
    for file in needs_hash {
        if !m.files.contains_key(file) {
            return Err(bad(a, format!("{file} has no sha256 in `files`; every file flowstep loads must be hash-checked")));
        }
    }
    let base: Vec<&str> = m.base_weights.tensors.iter().map(|t| t.name.as_str()).collect();
    let conditioning: Vec<&str> = m.model.conditioning.iter().map(|c| c.name.as_str()).collect();
    for (name, sig) in &m.graphs {
        let inputs: Vec<&str> = sig.inputs.iter().map(|i| i.name.as_str()).collect();
        let outputs: Vec<&str> = sig.outputs.iter().map(|i| i.name.as_str()).collect();
        let (want_in, want_out): (Vec<&str>, Vec<&str>) = match name.as_str() {
            super::TRAINING => (
                ["lora_params", "grad_accum", LORA_SCALE].into_iter().chain(base.iter().copied()).chain(LOSS_INPUTS).chain(conditioning.iter().copied()).collect(),
                vec!["loss", "grad_accum_out"],
            ),
            super::EVAL => (
                ["lora_params", LORA_SCALE].into_iter().chain(base.iter().copied()).chain(LOSS_INPUTS).chain(conditioning.iter().copied()).collect(),
                vec!["loss"],
            ),
            super::INFERENCE => (
                ["lora_params", LORA_SCALE].into_iter().chain(base.iter().copied()).chain(["x_t", "timestep", "context"]).chain(conditioning.iter().copied()).collect(),
                vec!["velocity"],
            ),
            super::OPTIMIZER => (OPTIMIZER_INPUTS.to_vec(), OPTIMIZER_OUTPUTS.to_vec()),
            other => return Err(bad(a, format!("unknown graph `{other}`"))),
        };
        if want_in.contains(&LORA_SCALE) && !inputs.contains(&LORA_SCALE) {
            return Err(bad(a, format!(
                "{name} has no input `{LORA_SCALE}` (the LoRA scale alpha/rank that `train --lora-alpha` sets, which exports before it bake in); re-export with this version's flowstep_export"
            )));
        }
        if inputs != want_in {
            let first = inputs.iter().zip(&want_in).position(|(x, y)| x != y).unwrap_or(inputs.len().min(want_in.len()));
            return Err(bad(a, format!(
                "{name} inputs do not follow the contract: position {first} is {:?}, expected {:?}",
                inputs.get(first), want_in.get(first)
            )));
        }
        if outputs != want_out {
            let what = if name == super::OPTIMIZER && !outputs.contains(&"params_nonfinite") {
                format!("{name} has no output `params_nonfinite` (its count of non-finite updated parameters, which exports before it lack)")
            } else {
                format!("{name} outputs are {outputs:?}, expected {want_out:?}")
            };
            return Err(bad(a, format!("{what}; re-export with this version's flowstep_export")));
        }
        if let Some(scale) = sig.inputs.iter().find(|s| s.name == LORA_SCALE)
            && !scale.shape.is_empty()
        {
            let dims: Vec<String> = scale.shape.iter().map(|d| d.to_string()).collect();
            return Err(bad(a, format!("{name} {LORA_SCALE} has shape [{}], expected [] (one number)", dims.join(", "))));
        }
        let lora_dims = ["lora_params", "grad_accum", "grad_accum_out", "params", "grads", "m", "v", "params_out", "m_out", "v_out"];
        for spec in sig.inputs.iter().chain(&sig.outputs).filter(|s| lora_dims.contains(&s.name.as_str())) {
            if spec.shape != [Dim::Fixed(m.lora.num_params as i64)] {
                let dims: Vec<String> = spec.shape.iter().map(|d| d.to_string()).collect();
                return Err(bad(a, format!("{name} {} has shape [{}], but lora.num_params is {}", spec.name, dims.join(", "), m.lora.num_params)));
            }
        }
        for spec in sig.inputs.iter().chain(&sig.outputs) {
            // Base weights come in the export's precision; every other tensor is float32.
            let want = m.base_weights.tensors.iter().find(|t| t.name == spec.name).map_or("float32", |t| t.dtype.as_str());
            if spec.dtype != want {
                return Err(bad(a, format!("{name} {} has dtype {}, expected {want}", spec.name, spec.dtype)));
            }
        }
    }
    for required in [super::TRAINING, super::OPTIMIZER] {
        if !m.graphs.contains_key(required) {
            return Err(bad(a, format!("the export has no {required}")));
        }
    }
    Ok(())
}

/// Model dimensions that size buffers and divide shapes: positive, and equal to the graphs'
/// fixed input dimensions.
fn check_model(a: &Artifacts) -> Result<()> {
    let md = &a.manifest.model;
    let dims = [("in_dim", md.in_dim), ("out_dim", md.out_dim), ("text_len", md.text_len), ("text_dim", md.text_dim), ("dim", md.dim)];
    for (name, value) in dims.into_iter().chain(md.patch_size.iter().map(|&p| ("patch_size", p))) {
        if value == 0 || value > 1 << 20 {
            return Err(bad(a, format!("model.{name} is {value}; expected 1 to {}", 1 << 20)));
        }
    }
    check_conditioning(a)?;
    for (graph, sig) in &a.manifest.graphs {
        for spec in &sig.inputs {
            if let Some(c) = md.conditioning_input(&spec.name) {
                // The graph input is the per-sample shape with a batch axis of 1.
                let want: Vec<Dim> = std::iter::once(Dim::Fixed(1)).chain(c.shape.iter().cloned()).collect();
                if spec.shape != want {
                    let got: Vec<String> = spec.shape.iter().map(|d| d.to_string()).collect();
                    return Err(bad(a, format!("{graph} {} has shape [{}], model.conditioning says [1] + {}", spec.name, got.join(", "), c.describe())));
                }
                continue;
            }
            let want: &[usize] = match spec.name.as_str() {
                "x_t" | "target" => &[1, md.latent_channels()],
                "context" => &[1, md.text_len, md.text_dim],
                _ => continue,
            };
            for (i, (d, &w)) in spec.shape.iter().zip(want).enumerate() {
                if d.fixed().is_some_and(|d| d != w) {
                    return Err(bad(a, format!("{graph} {} dimension {i} is {d}, the model section says {w}", spec.name)));
                }
            }
        }
    }
    check_expert(a)
}

/// The conditioning inputs the variant takes (docs/DESIGN.md §3b): t2v none; i2v `y` with
/// `in_dim - out_dim` channels at the latents' frames/height/width, and optionally
/// `clip_feature`; ti2v `first_frame_latents` [out_dim, 1, height, width].
fn check_conditioning(a: &Artifacts) -> Result<()> {
    let md = &a.manifest.model;
    let names: Vec<&str> = md.conditioning.iter().map(|c| c.name.as_str()).collect();
    let named = |s: &str| Dim::Named(s.into());
    let fixed = |n: usize| Dim::Fixed(n as i64);
    let expected: Vec<(&str, Option<Vec<Dim>>)> = match md.variant.as_str() {
        "t2v" => vec![],
        "i2v" => {
            let y = vec![fixed(md.in_dim.saturating_sub(md.out_dim)), named("frames"), named("height"), named("width")];
            let mut e = vec![("y", Some(y))];
            if names.contains(&"clip_feature") {
                e.push(("clip_feature", None)); // [tokens, clip width]: fixed by the export
            }
            e
        }
        "ti2v" => vec![(super::FIRST_FRAME_LATENTS, Some(vec![fixed(md.out_dim), fixed(1), named("height"), named("width")]))],
        other => return Err(bad(a, format!("model.variant is {other:?}; flowstep knows t2v, i2v and ti2v"))),
    };
    let want_names: Vec<&str> = expected.iter().map(|(n, _)| *n).collect();
    if names != want_names {
        return Err(bad(a, format!("model.conditioning lists {names:?}; a {} model takes {want_names:?}", md.variant)));
    }
    if (md.variant == "i2v") != (md.in_dim != md.out_dim) || md.in_dim < md.out_dim {
        return Err(bad(a, format!("model.in_dim {} and out_dim {} do not fit a {} model: only i2v adds input channels (y)", md.in_dim, md.out_dim, md.variant)));
    }
    for (c, (_, shape)) in md.conditioning.iter().zip(&expected) {
        let fits = match shape {
            Some(want) => &c.shape == want,
            None => c.shape.len() == 2 && c.shape.iter().all(|d| d.fixed().is_some_and(|n| n > 0 && n <= 1 << 20)),
        };
        if !fits {
            return Err(bad(a, format!("model.conditioning `{}` has shape {}, which a {} model with in_dim {} and out_dim {} cannot take", c.name, c.describe(), md.variant, md.in_dim, md.out_dim)));
        }
    }
    Ok(())
}

/// An expert's range is a sub-range of [0, 1] that starts at 0 (high noise) or ends at 1
/// (low noise), and its switch timestep lies inside the table.
fn check_expert(a: &Artifacts) -> Result<()> {
    let Some(e) = &a.manifest.expert else { return Ok(()) };
    let (lo, hi) = (e.min_timestep_boundary, e.max_timestep_boundary);
    let edge_ok = match e.role {
        super::ExpertRole::HighNoise => lo == 0.0,
        super::ExpertRole::LowNoise => hi == 1.0,
    };
    if !((0.0..1.0).contains(&lo) && hi > lo && hi <= 1.0 && edge_ok) {
        return Err(bad(a, format!("expert {} has timestep boundaries [{lo}, {hi}); a high_noise expert covers [0, b), a low_noise one [b, 1]", e.role.as_str())));
    }
    if !(e.switch_timestep.is_finite() && e.switch_timestep > 0.0 && e.switch_timestep < 1000.0) {
        return Err(bad(a, format!("expert switch_timestep is {}; expected a timestep in (0, 1000)", e.switch_timestep)));
    }
    Ok(())
}

/// Why `other` cannot be the other expert of `main`'s Wan2.2 A14B pair, or None: both are
/// experts, of opposite roles, that switch at the same timestep and meet at one boundary
/// (high noise `[0, b)`, low noise `[b, 1]`), and whose models take the same inputs.
/// `same_model` (a pair job, which trains both LoRAs) also asks for the same base model name
/// and the same LoRA rank, alpha and targets.
pub fn pair_mismatch(main: &super::Manifest, other: &super::Manifest, same_model: bool) -> Option<String> {
    let (Some(a), Some(b)) = (&main.expert, &other.expert) else {
        return Some("both exports must be experts of a Wan2.2 A14B pair (manifest `expert`)".into());
    };
    if a.role == b.role {
        return Some(format!("both exports are the {} expert", a.role.as_str()));
    }
    if a.switch_timestep != b.switch_timestep {
        return Some(format!("switch timestep {} differs from {}", b.switch_timestep, a.switch_timestep));
    }
    let (high, low) = if a.role == super::ExpertRole::HighNoise { (a, b) } else { (b, a) };
    if high.max_timestep_boundary != low.min_timestep_boundary {
        return Some(format!("the high_noise expert's range ends at {} but the low_noise one's starts at {}: different boundaries", high.max_timestep_boundary, low.min_timestep_boundary));
    }
    let (x, y) = (&main.model, &other.model);
    let same_inputs = x.latent_channels() == y.latent_channels() && x.in_dim == y.in_dim && x.text_len == y.text_len
        && x.text_dim == y.text_dim && x.patch_size == y.patch_size && x.conditioning == y.conditioning;
    if !same_inputs {
        return Some(format!("its model ({}) takes other inputs than {}", y.name, x.name));
    }
    if same_model {
        if x.name != y.name {
            return Some(format!("base model {} differs from {}", y.name, x.name));
        }
        let (l, m) = (&main.lora, &other.lora);
        if (l.rank, l.alpha, &l.targets) != (m.rank, m.alpha, &m.targets) {
            return Some(format!("LoRA rank {}, alpha {}, targets {} differ from rank {}, alpha {}, targets {}", m.rank, m.alpha, m.targets.join(","), l.rank, l.alpha, l.targets.join(",")));
        }
    }
    None
}

/// The LoRA layout, against itself and the base weights it adapts: rank ≥ 1, unique keys,
/// one A `[rank, in]` and one B `[out, rank]` per module with `in`/`out` from the module's
/// base weight, offsets contiguous from 0 to `num_params`. Runs before anything is allocated.
fn check_lora(a: &Artifacts) -> Result<()> {
    let lora = &a.manifest.lora;
    if lora.rank == 0 {
        return Err(bad(a, "lora.rank is 0; a LoRA needs rank ≥ 1".into()));
    }
    if !(lora.alpha.is_finite() && lora.alpha > 0.0) {
        return Err(bad(a, format!("lora.alpha is {}; expected a positive number", lora.alpha)));
    }
    if lora.tensors.is_empty() {
        return Err(bad(a, "lora.tensors is empty".into()));
    }
    let base: BTreeMap<&str, &[usize]> = a.manifest.base_weights.tensors.iter().map(|t| (t.name.as_str(), t.shape.as_slice())).collect();
    let mut seen = HashSet::new();
    let mut halves: BTreeMap<&str, (u8, u8)> = BTreeMap::new();
    let mut offset = 0usize;
    for t in &lora.tensors {
        if !seen.insert(t.key.as_str()) {
            return Err(bad(a, format!("LoRA tensor `{}` is listed twice", t.key)));
        }
        let (module, is_a) = match (t.key.strip_suffix(".lora_A.default.weight"), t.key.strip_suffix(".lora_B.default.weight")) {
            (Some(m), _) => (m, true),
            (_, Some(m)) => (m, false),
            _ => return Err(bad(a, format!("LoRA tensor `{}` is not named MODULE.lora_A.default.weight or MODULE.lora_B.default.weight", t.key))),
        };
        let weight = format!("{module}.weight");
        let Some(&&[out_dim, in_dim]) = base.get(weight.as_str()) else {
            return Err(bad(a, format!("LoRA tensor `{}` adapts `{weight}`, which is not a 2-D base weight of this export", t.key)));
        };
        let want = if is_a { [lora.rank, in_dim] } else { [out_dim, lora.rank] };
        if t.shape != want {
            return Err(bad(a, format!("LoRA tensor `{}` has shape {:?}; rank {} on `{weight}` {:?} needs {want:?}", t.key, t.shape, lora.rank, [out_dim, in_dim])));
        }
        let count = halves.entry(module).or_default();
        if is_a { count.0 += 1 } else { count.1 += 1 }
        if t.offset != offset {
            return Err(bad(a, format!("LoRA tensor `{}` starts at {} but the previous one ends at {offset}", t.key, t.offset)));
        }
        offset = offset.checked_add(t.numel()).filter(|&o| o <= lora.num_params).ok_or_else(|| {
            bad(a, format!("LoRA tensor `{}` ends past lora.num_params {}", t.key, lora.num_params))
        })?;
    }
    if let Some((module, _)) = halves.iter().find(|(_, c)| **c != (1, 1)) {
        return Err(bad(a, format!("LoRA module `{module}` needs exactly one lora_A and one lora_B tensor")));
    }
    if offset != lora.num_params {
        return Err(bad(a, format!("LoRA tensors hold {offset} values but num_params is {}", lora.num_params)));
    }
    Ok(())
}

/// Sizes that only the files can vouch for: the initial LoRA must be able to hold
/// `num_params` values (2 bytes each at least), so a manifest cannot ask for more memory
/// than the export shipped.
pub(super) fn check_sizes(a: &Artifacts) -> Result<()> {
    let path = a.file(LORA_INIT)?;
    let len = std::fs::metadata(&path).at(&path)?.len();
    if (a.manifest.lora.num_params as u64).saturating_mul(2) > len {
        return Err(bad(a, format!("lora.num_params {} is more than {LORA_INIT} ({len} bytes) can hold", a.manifest.lora.num_params)));
    }
    Ok(())
}

/// The loaded session's inputs and outputs equal the manifest's (names, dtypes, shapes).
pub fn check_session_io(a: &Artifacts, graph: &str, session: &Session) -> Result<()> {
    let sig = a.graph(graph)?;
    let path = a.dir.join(&sig.file);
    let check = |kind: &str, specs: &[IoSpec], actual: Vec<(String, ValueType)>| -> Result<()> {
        if specs.len() != actual.len() {
            // Name what is missing on either side (a few: a training graph has thousands of inputs).
            let names = |v: &mut dyn Iterator<Item = &str>| v.take(3).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
            let in_graph: HashSet<&str> = actual.iter().map(|(n, _)| n.as_str()).collect();
            let in_manifest: HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            let lacks = names(&mut specs.iter().map(|s| s.name.as_str()).filter(|n| !in_graph.contains(n)));
            let extra = names(&mut actual.iter().map(|(n, _)| n.as_str()).filter(|n| !in_manifest.contains(n)));
            let mut reason = format!("graph has {} {kind}s, the manifest lists {}", actual.len(), specs.len());
            if !lacks.is_empty() {
                reason += &format!("; the graph has no {lacks}");
            }
            if !extra.is_empty() {
                reason += &format!("; the manifest does not list {extra}");
            }
            reason += "; the graph and the manifest are from different exports: re-export with this version's flowstep_export";
            return Err(Error::Manifest { path: path.clone(), reason });
        }
        for (spec, (name, ty)) in specs.iter().zip(actual) {
            let mismatch = |what: String| Error::Manifest { path: path.clone(), reason: format!("{kind} `{name}`: {what}") };
            if spec.name != name {
                return Err(mismatch(format!("manifest names it `{}`", spec.name)));
            }
            let (Some(elem), Some(shape)) = (ty.tensor_type(), ty.tensor_shape()) else {
                return Err(mismatch("is not a tensor".into()));
            };
            let want = match spec.dtype.as_str() {
                "float32" => ort::value::TensorElementType::Float32,
                "float8_e4m3fn" => ort::value::TensorElementType::Float8E4M3FN,
                "bfloat16" => ort::value::TensorElementType::Bfloat16,
                other => return Err(mismatch(format!("manifest dtype {other}, which flowstep does not bind"))),
            };
            if elem != want {
                return Err(mismatch(format!("graph dtype {elem:?}, manifest {}", spec.dtype)));
            }
            let dims: Vec<i64> = shape.iter().copied().collect();
            let same = dims.len() == spec.shape.len()
                && dims.iter().zip(&spec.shape).all(|(&d, s)| match s {
                    Dim::Fixed(n) => d == *n,
                    Dim::Named(_) => d < 0,
                });
            if !same {
                let want: Vec<String> = spec.shape.iter().map(|d| d.to_string()).collect();
                return Err(mismatch(format!("graph shape {dims:?}, manifest [{}]", want.join(", "))));
            }
        }
        Ok(())
    };
    check("input", &sig.inputs, session.inputs().iter().map(|o| (o.name().to_string(), o.dtype().clone())).collect())?;
    check("output", &sig.outputs, session.outputs().iter().map(|o| (o.name().to_string(), o.dtype().clone())).collect())
}
