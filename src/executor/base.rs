//! Base weights: read once from safetensors, checked against the manifest, placed on the
//! device once and shared by every graph's binding.

use std::path::Path;

use ort::session::IoBinding;
use ort::value::Tensor;

use super::DeviceMemory;
use crate::artifacts::Artifacts;
use crate::error::{Error, Result};
use crate::tensor_file::TensorFile;

/// The frozen base weights in graph-input order, in the dtype the graphs take.
pub struct BaseWeights {
    pub tensors: Vec<(String, BaseTensor)>,
    pub num_values: usize,
}

/// One base weight on the device.
pub enum BaseTensor {
    F32(Tensor<f32>),
    Bf16(Tensor<half::bf16>),
}

impl BaseTensor {
    pub fn bind(&self, binding: &mut IoBinding, name: &str) -> Result<()> {
        match self {
            BaseTensor::F32(t) => binding.bind_input(name, t),
            BaseTensor::Bf16(t) => binding.bind_input(name, t),
        }
        .map_err(Error::ort(format!("binding base weight {name}")))
    }
}

/// Loads every tensor the manifest lists from `path` (the user's checkpoint, a leading
/// `model.` allowed) or the shipped `base.safetensors`.
pub fn load_base_weights(artifacts: &Artifacts, path: Option<&Path>, memory: &DeviceMemory) -> Result<BaseWeights> {
    let path = match path.map(Path::to_path_buf).or_else(|| artifacts.shipped_base()) {
        Some(p) => p,
        None => {
            return Err(Error::Config(format!(
                "{} was exported without base weights: pass --base WAN.safetensors (the checkpoint the export was made for)",
                artifacts.dir.display()
            )));
        }
    };
    let file = TensorFile::open(&path)?;
    let names = file.names();
    let prefixed = !names.iter().any(|n| n == "head.head.weight") && names.iter().any(|n| n == "model.head.head.weight");
    let mut tensors = Vec::with_capacity(artifacts.manifest.base_weights.tensors.len());
    let mut num_values = 0;
    for spec in &artifacts.manifest.base_weights.tensors {
        let key = if prefixed { format!("model.{}", spec.name) } else { spec.name.clone() };
        let Some(info) = file.info(&key) else {
            return Err(Error::Tensor { path: path.clone(), reason: format!("missing base weight `{}` that the graphs need", spec.name) });
        };
        if info.shape != spec.shape {
            return Err(Error::Tensor {
                path: path.clone(),
                reason: format!("base weight `{}` has shape {:?}, the export needs {:?}", spec.name, info.shape, spec.shape),
            });
        }
        let non_finite = |i: usize| Error::Tensor { path: path.clone(), reason: format!("base weight `{}` has a non-finite value at {i}", spec.name) };
        let tensor = match spec.dtype.as_str() {
            "float32" => {
                let (shape, values) = file.read_f32(&key)?;
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(non_finite(i));
                }
                BaseTensor::F32(memory.tensor(&shape, &values)?)
            }
            "bfloat16" => {
                let (shape, values) = file.read_bf16(&key)?;
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(non_finite(i));
                }
                BaseTensor::Bf16(memory.tensor_bf16(&shape, &values)?)
            }
            other => {
                return Err(Error::Manifest {
                    path: artifacts.dir.join("manifest.json"),
                    reason: format!("base weight `{}` has dtype {other:?}; flowstep binds float32 or bfloat16", spec.name),
                });
            }
        };
        num_values += spec.shape.iter().product::<usize>();
        tensors.push((spec.name.clone(), tensor));
    }
    Ok(BaseWeights { tensors, num_values })
}
