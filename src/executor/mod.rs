//! Driving the exported graphs on ONNX Runtime: base weights bound once, trainable state
//! resident on the device in ping-pong buffers, only batch inputs in and scalars out.

mod base;
mod batch;
mod grad_clip;
mod graphs;
mod loader;
mod state;

pub use base::{BaseTensor, BaseWeights, load_base_weights};
pub use batch::Batch;
pub use graphs::{LossGraph, VelocityGraph};
pub use loader::{LoraGraph, WithLora};
pub use state::{AdamW, OptimizerOutcome, TrainingGraphs};

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use std::fmt;

use ort::value::PrimitiveTensorElementType;
use ort::session::Session;
use ort::value::{DynTensor, Tensor, TensorElementType};

use crate::error::{Error, Result};
use crate::runtime::Device;

/// Where device-resident tensors are allocated, and how host data gets there.
pub struct DeviceMemory {
    pub device: Device,
    allocator: Allocator,
    /// The copy models' sessions on the device, built on first use.
    copy_bf16: std::sync::OnceLock<std::sync::Mutex<Session>>,
    copy_fp8: std::sync::OnceLock<std::sync::Mutex<Session>>,
}

/// One Identity node over bf16 tensors of any shape, at opset 21 (written by onnx.helper).
const COPY_BF16: &[u8] = include_bytes!("../../assets/copy_bfloat16.onnx");
/// The same over float8_e4m3fn tensors (written the same way).
const COPY_FP8: &[u8] = include_bytes!("../../assets/copy_float8e4m3fn.onnx");

impl DeviceMemory {
    /// Host memory for the CPU provider; on a GPU, tensors are copied there by ONNX Runtime
    /// (`Tensor::to`), which allocates them on that device.
    pub fn new(device: Device) -> Self {
        Self { device, allocator: Allocator::default(), copy_bf16: std::sync::OnceLock::new(), copy_fp8: std::sync::OnceLock::new() }
    }

    /// A device tensor holding `values` (bindable as input and output).
    pub fn tensor<T: PrimitiveTensorElementType + Copy + fmt::Debug + 'static>(&self, shape: &[usize], values: &[T]) -> Result<Tensor<T>> {
        if self.device.is_gpu() {
            let (dev, id) = self.device.allocation();
            let host = Tensor::from_array((shape.to_vec(), values.to_vec())).map_err(Error::ort("creating a host tensor"))?;
            return host.to(dev, id).map_err(Error::ort(format!("copying {} values to {}", values.len(), self.device)));
        }
        let mut t = Tensor::<T>::new(&self.allocator, shape.to_vec()).map_err(Error::ort("allocating a tensor"))?;
        t.extract_tensor_mut().1.copy_from_slice(values);
        Ok(t)
    }

    /// A bfloat16 device tensor holding `values`. ONNX Runtime's own copy (`Tensor::to`)
    /// runs an Identity model whose opset predates bf16, so flowstep copies with its own
    /// (assets/copy_bfloat16.onnx, opset 21), whose output stays on the device.
    pub fn tensor_bf16(&self, shape: &[usize], values: &[half::bf16]) -> Result<Tensor<half::bf16>> {
        let host = Tensor::from_array((shape.to_vec(), values.to_vec())).map_err(Error::ort("creating a host tensor"))?;
        if !self.device.is_gpu() {
            return Ok(host);
        }
        let during = format!("copying {} bf16 values to {}", values.len(), self.device);
        let value = self.copy_with_model(&self.copy_bf16, COPY_BF16, &host, &during)?;
        value.downcast::<ort::value::TensorValueType<half::bf16>>().map_err(Error::ort(during))
    }

    /// A float8_e4m3fn device tensor holding `bits` (copied like bf16, with
    /// assets/copy_float8e4m3fn.onnx; the GPU copy is untested: no GPU in CI).
    pub fn tensor_fp8(&self, shape: &[usize], bits: &[u8]) -> Result<DynTensor> {
        let mut host = DynTensor::new(&self.allocator, TensorElementType::Float8E4M3FN, shape.to_vec()).map_err(Error::ort("allocating an fp8 host tensor"))?;
        let len = host.shape().iter().product::<i64>();
        if len != bits.len() as i64 {
            return Err(Error::Device(format!("an fp8 tensor of shape {shape:?} was given {} bytes", bits.len())));
        }
        if len > 0 {
            // SAFETY: a CPU tensor of `len` one-byte elements, allocated above and not shared.
            unsafe { std::ptr::copy_nonoverlapping(bits.as_ptr(), host.data_ptr_mut().cast::<u8>(), bits.len()) };
        }
        if !self.device.is_gpu() {
            return Ok(host);
        }
        let during = format!("copying {} fp8 values to {}", bits.len(), self.device);
        let value = self.copy_with_model(&self.copy_fp8, COPY_FP8, &host, &during)?;
        value.downcast::<ort::value::DynTensorValueType>().map_err(Error::ort(during))
    }

    /// `host` copied into this device's memory by a one-node Identity `model`, whose session
    /// is built once into `cache`.
    fn copy_with_model<T: ort::value::ValueTypeMarker + ?Sized>(
        &self,
        cache: &std::sync::OnceLock<std::sync::Mutex<Session>>,
        model: &[u8],
        host: &ort::value::Value<T>,
        during: &str,
    ) -> Result<ort::value::DynValue> {
        let session = match cache.get() {
            Some(s) => s,
            None => {
                let mut builder = Session::builder(crate::runtime::environment()?).map_err(Error::ort(during.to_string()))?;
                if let Some(provider) = self.device.execution_provider(&crate::runtime::CudaOptions::default()) {
                    builder = builder.with_execution_providers([provider]).map_err(|e| Error::Ort { during: during.to_string(), source: ort::Error::<()>::from(e) })?;
                }
                let session = builder.commit_from_memory(model).map_err(Error::ort(during.to_string()))?;
                cache.get_or_init(|| std::sync::Mutex::new(session))
            }
        };
        let mut session = session.lock().map_err(|_| Error::Device(format!("{during}: the copy session was poisoned")))?;
        let mut binding = session.create_binding().map_err(Error::ort(during.to_string()))?;
        binding.bind_input("x", host).map_err(Error::ort(during.to_string()))?;
        let (dev, id) = self.device.allocation();
        let info = MemoryInfo::new(dev, id, AllocatorType::Device, MemoryType::Default).map_err(Error::ort(during.to_string()))?;
        binding.bind_output_to_device("y", &info).map_err(Error::ort(during.to_string()))?;
        let mut outputs = session.run_binding(&binding).map_err(Error::ort(during.to_string()))?;
        outputs.remove("y").ok_or_else(|| Error::Device(format!("{during}: the copy produced no output")))
    }

    /// A device tensor's values on the host.
    pub fn read(&self, tensor: &Tensor<f32>) -> Result<Vec<f32>> {
        if self.device.is_gpu() {
            let host = tensor.to(AllocationDevice::CPU, 0).map_err(Error::ort(format!("copying from {}", self.device)))?;
            return Ok(host.extract_tensor().1.to_vec());
        }
        Ok(tensor.extract_tensor().1.to_vec())
    }
}

/// The graphs' `lora_scale` input (alpha/rank), bound once with the base weights.
pub(crate) fn bind_lora_scale(binding: &mut ort::session::IoBinding, scale: f32) -> Result<()> {
    let mut t = host_tensor(&[])?;
    t.extract_tensor_mut().1[0] = scale;
    // The binding holds the tensor it is given.
    binding.bind_input(crate::artifacts::LORA_SCALE, &t).map_err(Error::ort("binding lora_scale"))
}

/// A host tensor for outputs and per-step inputs.
pub(crate) fn host_tensor(shape: &[usize]) -> Result<Tensor<f32>> {
    let mut t = Tensor::<f32>::new(&Allocator::default(), shape.to_vec()).map_err(Error::ort("allocating a host tensor"))?;
    t.extract_tensor_mut().1.fill(0.0);
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_tensor_keeps_its_bits() {
        crate::runtime::init(None, false, None).expect("ONNX Runtime (scripts/setup_ort.sh)");
        let memory = DeviceMemory::new(Device::Cpu);
        let values: Vec<half::bf16> = [1.0f32, -2.5, 3.140625, 0.0, 65280.0, -1e-3].iter().map(|&v| half::bf16::from_f32(v)).collect();
        let tensor = memory.tensor_bf16(&[2, 3], &values).expect("bf16 tensor");
        // The copy model, which a GPU uses, run here on the CPU provider.
        let copied = memory.copy_with_model(&memory.copy_bf16, COPY_BF16, &tensor, "test").expect("copy");
        let copied = copied.downcast::<ort::value::TensorValueType<half::bf16>>().expect("bf16");
        for t in [&tensor, &copied] {
            let (shape, data) = t.extract_tensor();
            assert_eq!(shape.to_vec(), vec![2, 3]);
            assert_eq!(data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), values.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn fp8_tensor_keeps_its_bits() {
        crate::runtime::init(None, false, None).expect("ONNX Runtime (scripts/setup_ort.sh)");
        let memory = DeviceMemory::new(Device::Cpu);
        let bits = [0x00u8, 0x38, 0xB8, 0x7E, 0x01, 0xFE];
        let tensor = memory.tensor_fp8(&[2, 3], &bits).expect("fp8 tensor");
        // The copy model, which a GPU uses, run here on the CPU provider.
        let copied = memory.copy_with_model(&memory.copy_fp8, COPY_FP8, &tensor, "test").expect("copy");
        let copied = copied.downcast::<ort::value::DynTensorValueType>().expect("a tensor");
        for t in [&tensor, &copied] {
            assert_eq!(t.shape().to_vec(), vec![2, 3]);
            assert_eq!(*t.data_type(), TensorElementType::Float8E4M3FN);
            // SAFETY: a CPU tensor of 6 one-byte elements.
            let data = unsafe { std::slice::from_raw_parts(t.data_ptr().cast::<u8>(), 6) };
            assert_eq!(data, bits);
        }
        assert!(memory.tensor_fp8(&[2, 2], &bits).is_err());
    }
}
