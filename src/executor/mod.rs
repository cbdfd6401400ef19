//! Driving the exported graphs on ONNX Runtime: base weights bound once, trainable state
//! resident on the device in ping-pong buffers, only batch inputs in and scalars out.

mod base;
mod batch;
mod graphs;
mod state;

pub use base::{BaseTensor, BaseWeights, load_base_weights};
pub use batch::Batch;
pub use graphs::{LossGraph, VelocityGraph};
pub use state::{AdamW, OptimizerOutcome, TrainingGraphs};

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use std::fmt;

use ort::value::PrimitiveTensorElementType;
use ort::value::{Tensor, TensorRefMut};

use crate::error::{Error, Result};
use crate::runtime::Device;

/// Where device-resident tensors are allocated, and how host data gets there.
pub struct DeviceMemory {
    pub device: Device,
    allocator: Allocator,
}

impl DeviceMemory {
    /// Host memory for the CPU provider; on a GPU, tensors are copied there by ONNX Runtime
    /// (`Tensor::to`), which allocates them on that device.
    pub fn new(device: Device) -> Self {
        Self { device, allocator: Allocator::default() }
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

    /// A bfloat16 device tensor holding `values`. ONNX Runtime copies to a device through a
    /// one-node Identity model whose opset predates bf16, so the bits travel as uint16 and
    /// the device buffer is then viewed as bf16.
    pub fn tensor_bf16(&self, shape: &[usize], values: &[half::bf16]) -> Result<Bf16Tensor> {
        let bits: Vec<u16> = values.iter().map(|v| v.to_bits()).collect();
        let host = Tensor::from_array((shape.to_vec(), bits)).map_err(Error::ort("creating a host tensor"))?;
        let (dev, id) = self.device.allocation();
        let mut storage = host.to(dev, id).map_err(Error::ort(format!("copying {} values to {}", values.len(), self.device)))?;
        let data = storage.data_ptr_mut();
        let info = MemoryInfo::new(self.device.allocation().0, id, AllocatorType::Device, MemoryType::Default).map_err(Error::ort("describing device memory"))?;
        // SAFETY: `data` is `storage`'s buffer, on the device `info` describes, with exactly
        // shape.product() 2-byte elements; Bf16Tensor keeps `storage` alive as long as the view.
        let view = unsafe { TensorRefMut::<'static, half::bf16>::from_raw(info, data, shape.to_vec().into()) }
            .map_err(Error::ort("viewing a uint16 buffer as bfloat16"))?;
        Ok(Bf16Tensor { view, _storage: storage })
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

/// A bfloat16 tensor on the device: a view over uint16 storage (see DeviceMemory::tensor_bf16).
/// Fields drop in order: the view before the buffer it points into.
pub struct Bf16Tensor {
    view: TensorRefMut<'static, half::bf16>,
    _storage: Tensor<u16>,
}

impl Bf16Tensor {
    pub fn value(&self) -> &Tensor<half::bf16> {
        &self.view
    }
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
    fn bf16_tensor_views_its_uint16_storage_bit_for_bit() {
        crate::runtime::init(None, false).expect("ONNX Runtime (scripts/setup_ort.sh)");
        let memory = DeviceMemory::new(Device::Cpu);
        let values: Vec<half::bf16> = [1.0f32, -2.5, 3.140625, 0.0, 65280.0, -1e-3].iter().map(|&v| half::bf16::from_f32(v)).collect();
        let tensor = memory.tensor_bf16(&[2, 3], &values).expect("bf16 tensor");
        let (shape, data) = tensor.value().extract_tensor();
        assert_eq!(shape.to_vec(), vec![2, 3]);
        assert_eq!(data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), values.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }
}
