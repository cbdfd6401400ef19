//! Checks that a manifest is self-consistent, matches its files, and matches the graphs
//! ONNX Runtime actually loaded. A mismatch is an error naming the file, never a guess.

use std::io::Read;

use ort::session::Session;
use ort::value::ValueType;
use sha2::{Digest, Sha256};

use super::{Artifacts, Dim, FORMAT_VERSION, IoSpec, LOSS_INPUTS, OPTIMIZER_INPUTS, OPTIMIZER_OUTPUTS};
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
    let mut offset = 0;
    for t in &m.lora.tensors {
        if t.offset != offset {
            return Err(bad(a, format!("LoRA tensor {} starts at {} but the previous one ends at {offset}", t.key, t.offset)));
        }
        offset += t.numel();
    }
    if offset != m.lora.num_params || offset == 0 {
        return Err(bad(a, format!("LoRA tensors hold {offset} values but num_params is {}", m.lora.num_params)));
    }
    let base: Vec<&str> = m.base_weights.tensors.iter().map(|t| t.name.as_str()).collect();
    for (name, sig) in &m.graphs {
        let inputs: Vec<&str> = sig.inputs.iter().map(|i| i.name.as_str()).collect();
        let outputs: Vec<&str> = sig.outputs.iter().map(|i| i.name.as_str()).collect();
        let (want_in, want_out): (Vec<&str>, Vec<&str>) = match name.as_str() {
            super::TRAINING => (
                ["lora_params", "grad_accum"].into_iter().chain(base.iter().copied()).chain(LOSS_INPUTS).collect(),
                vec!["loss", "grad_accum_out"],
            ),
            super::EVAL => (std::iter::once("lora_params").chain(base.iter().copied()).chain(LOSS_INPUTS).collect(), vec!["loss"]),
            super::INFERENCE => (
                std::iter::once("lora_params").chain(base.iter().copied()).chain(["x_t", "timestep", "context"]).collect(),
                vec!["velocity"],
            ),
            super::OPTIMIZER => (OPTIMIZER_INPUTS.to_vec(), OPTIMIZER_OUTPUTS.to_vec()),
            other => return Err(bad(a, format!("unknown graph `{other}`"))),
        };
        if inputs != want_in {
            let first = inputs.iter().zip(&want_in).position(|(x, y)| x != y).unwrap_or(inputs.len().min(want_in.len()));
            return Err(bad(a, format!(
                "{name} inputs do not follow the contract: position {first} is {:?}, expected {:?}",
                inputs.get(first), want_in.get(first)
            )));
        }
        if outputs != want_out {
            return Err(bad(a, format!("{name} outputs are {outputs:?}, expected {want_out:?}")));
        }
        if !m.files.contains_key(&sig.file) {
            return Err(bad(a, format!("{name} file {} has no sha256 in `files`", sig.file)));
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

/// Every listed file exists and has its sha256.
pub(super) fn check_files(a: &Artifacts) -> Result<()> {
    for (file, want) in &a.manifest.files {
        let path = a.dir.join(file);
        let mut f = std::fs::File::open(&path).at(&path)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).at(&path)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let got = hex(&hasher.finalize());
        if &got != want {
            return Err(Error::Manifest {
                path,
                reason: format!("sha256 {got} does not match the manifest ({want}); the file was changed or truncated after export"),
            });
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The loaded session's inputs and outputs equal the manifest's (names, dtypes, shapes).
pub fn check_session_io(a: &Artifacts, graph: &str, session: &Session) -> Result<()> {
    let sig = a.graph(graph)?;
    let path = a.dir.join(&sig.file);
    let check = |kind: &str, specs: &[IoSpec], actual: Vec<(String, ValueType)>| -> Result<()> {
        if specs.len() != actual.len() {
            return Err(Error::Manifest { path: path.clone(), reason: format!("graph has {} {kind}s, the manifest lists {}", actual.len(), specs.len()) });
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
