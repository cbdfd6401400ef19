//! Base weights: read once from safetensors, checked against the manifest, placed on the
//! device once and shared by every graph's binding.

use std::path::Path;

use ort::session::IoBinding;
use ort::value::{DynTensor, Tensor};
use safetensors::Dtype;

use super::DeviceMemory;
use crate::artifacts::{Artifacts, NamedShape};
use crate::error::{Error, Result};
use crate::fp8;
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
    /// float8_e4m3fn bytes (the ort crate has no Rust element type for them).
    Fp8(DynTensor),
}

impl BaseTensor {
    pub fn bind(&self, binding: &mut IoBinding, name: &str) -> Result<()> {
        match self {
            BaseTensor::F32(t) => binding.bind_input(name, t),
            BaseTensor::Bf16(t) => binding.bind_input(name, t),
            BaseTensor::Fp8(t) => binding.bind_input(name, t),
        }
        .map_err(Error::ort(format!("binding base weight {name}")))
    }
}

/// Loads every tensor the manifest lists from `path` (the user's checkpoint, a leading
/// `model.` or `model.diffusion_model.` allowed) or the shipped `base.safetensors`.
///
/// fp8 checkpoints (ComfyUI's `*_fp8_e4m3fn` and `*_fp8_scaled`, musubi's block-wise
/// `fp8_scaled`) are read as stored where the export takes float8_e4m3fn weights, and
/// dequantized (`fp8 · scale`, float32) where it takes float32 or bfloat16 ones.
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
    let checkpoint = Checkpoint::new(&file);
    let specs = &artifacts.manifest.base_weights.tensors;
    let mut tensors = Vec::with_capacity(specs.len());
    let mut num_values = 0;
    for spec in specs {
        let weight_of_scale = spec.name.strip_suffix(".scale_weight").map(|m| format!("{m}.weight"));
        let scaled_weight = weight_of_scale.and_then(|w| specs.iter().find(|s| s.name == w && s.dtype == FP8));
        let tensor = match scaled_weight {
            Some(weight) => BaseTensor::F32(memory.tensor(&spec.shape, &checkpoint.scales_for(spec, weight)?)?),
            None => checkpoint.load(spec, memory, &artifacts.dir)?,
        };
        num_values += spec.shape.iter().product::<usize>();
        tensors.push((spec.name.clone(), tensor));
    }
    Ok(BaseWeights { tensors, num_values })
}

/// The manifest dtype of fp8 base weights.
const FP8: &str = "float8_e4m3fn";

/// The user's checkpoint, with its key prefix and fp8 layout worked out once.
struct Checkpoint<'a> {
    file: &'a TensorFile,
    /// What precedes Wan's names: nothing, DiffSynth's `model.` or ComfyUI's `model.diffusion_model.`.
    prefix: &'static str,
    /// Any `*.scale_weight` present: a scaled fp8 file, where a weight without one is an error
    /// (in a plain `*_fp8_e4m3fn` file every scale is 1).
    scaled: bool,
}

impl<'a> Checkpoint<'a> {
    fn new(file: &'a TensorFile) -> Self {
        let names = file.names();
        let prefix = ["", "model.", "model.diffusion_model."].into_iter().find(|p| names.iter().any(|n| *n == format!("{p}head.head.weight"))).unwrap_or("");
        let scaled = names.iter().any(|n| n.ends_with(".scale_weight"));
        Self { file, prefix, scaled }
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn error(&self, reason: String) -> Error {
        Error::Tensor { path: self.file.path().to_path_buf(), reason }
    }

    /// A weight as the manifest's `spec` asks: name, shape and finite values checked.
    fn load(&self, spec: &NamedShape, memory: &DeviceMemory, artifacts: &Path) -> Result<BaseTensor> {
        let key = self.key(&spec.name);
        let Some(info) = self.file.info(&key) else {
            return Err(self.error(format!("missing base weight `{}` that the graphs need", spec.name)));
        };
        if info.shape != spec.shape {
            return Err(self.error(format!("base weight `{}` has shape {:?}, the export needs {:?}", spec.name, info.shape, spec.shape)));
        }
        let non_finite = |i: usize| self.error(format!("base weight `{}` has a non-finite value at {i}", spec.name));
        match spec.dtype.as_str() {
            FP8 => {
                if info.dtype != Dtype::F8_E4M3 {
                    let convert = if matches!(info.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
                        format!("pass a ComfyUI fp8 checkpoint, or convert this one with `python -m {QUANTIZE_MODULE} {} OUT.safetensors`", self.file.path().display())
                    } else {
                        "pass a float8_e4m3fn checkpoint (ComfyUI's *_fp8_e4m3fn or *_fp8_scaled)".to_string()
                    };
                    return Err(self.error(format!("base weight `{}` is {:?}, and this export takes float8_e4m3fn (F8_E4M3) weights: {convert}", spec.name, info.dtype)));
                }
                let (shape, bits) = self.file.read_fp8(&key)?;
                if let Some(i) = bits.iter().position(|&b| fp8::is_nan(b)) {
                    return Err(non_finite(i));
                }
                Ok(BaseTensor::Fp8(memory.tensor_fp8(&shape, bits)?))
            }
            "float32" => {
                let values = if info.dtype == Dtype::F8_E4M3 { self.dequantized(spec)? } else { self.file.read_f32(&key)?.1 };
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(non_finite(i));
                }
                Ok(BaseTensor::F32(memory.tensor(&spec.shape, &values)?))
            }
            "bfloat16" => {
                let values = match info.dtype {
                    Dtype::F8_E4M3 => self.dequantized(spec)?.into_iter().map(half::bf16::from_f32).collect(),
                    _ => self.file.read_bf16(&key)?.1,
                };
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(non_finite(i));
                }
                Ok(BaseTensor::Bf16(memory.tensor_bf16(&spec.shape, &values)?))
            }
            other => Err(Error::Manifest {
                path: artifacts.join("manifest.json"),
                reason: format!("base weight `{}` has dtype {other:?}; flowstep binds float32, bfloat16 or {FP8}", spec.name),
            }),
        }
    }

    /// The file's scales of fp8 weight `name` (one per tensor, row or block, row-major), or 1
    /// in a plain fp8 file.
    fn file_scales(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let scale = fp8::scale_name(name).unwrap_or_default();
        let key = self.key(&scale);
        if self.file.info(&key).is_none() {
            if self.scaled {
                return Err(self.error(format!("missing `{scale}`, the scale of fp8 weight `{name}` (the file has other scales, so it is a scaled fp8 file)")));
            }
            return Ok((vec![], vec![1.0]));
        }
        let (shape, values) = self.file.read_f32(&key)?;
        if let Some(v) = values.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
            return Err(self.error(format!("`{scale}` holds {v}; fp8 scales must be finite and positive")));
        }
        Ok((shape, values))
    }

    /// The scale input `spec` of the export's fp8 weight `weight`, in the export's layout.
    fn scales_for(&self, spec: &NamedShape, weight: &NamedShape) -> Result<Vec<f32>> {
        let (file_shape, values) = self.file_scales(&weight.name)?;
        let out = weight.shape.first().copied().unwrap_or(1);
        fp8::scales_in_layout(&spec.shape, out, &file_shape, &values).map_err(|reason| {
            let hint = if spec.shape == [1] { ": re-export with --fp8-scale block to use block-wise scales" } else { "" };
            self.error(format!("`{}` {reason}{hint}", spec.name))
        })
    }

    /// An fp8 weight of the file as float32, for an export that takes float32 or bfloat16.
    fn dequantized(&self, spec: &NamedShape) -> Result<Vec<f32>> {
        let (shape, bits) = self.file.read_fp8(&self.key(&spec.name))?;
        let (_, scales) = self.file_scales(&spec.name)?;
        fp8::dequantize(bits, shape.first().copied().unwrap_or(1), &scales).map_err(|reason| self.error(format!("fp8 weight `{}` {reason}", spec.name)))
    }
}

/// The converter a bf16/f32 checkpoint goes through for an fp8 export.
const QUANTIZE_MODULE: &str = "flowstep_export.model.fp8";
