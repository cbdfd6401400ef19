//! Driving the exported graphs on ONNX Runtime: base weights bound once, trainable state
//! resident on the device in ping-pong buffers, only batch inputs in and scalars out.

mod base;
mod batch;
mod graphs;
mod loader;
mod state;

pub use base::{BaseWeights, load_base_weights};
pub use batch::Batch;
pub use graphs::{LossGraph, VelocityGraph};
pub use loader::{LoraGraph, WithLora};
pub use state::{AdamW, OptimizerOutcome, TrainingGraphs};

use ort::memory::{AllocationDevice, Allocator};
use ort::value::Tensor;

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
    pub fn tensor(&self, shape: &[usize], values: &[f32]) -> Result<Tensor<f32>> {
        if self.device.is_gpu() {
            let (dev, id) = self.device.allocation();
            let host = Tensor::from_array((shape.to_vec(), values.to_vec())).map_err(Error::ort("creating a host tensor"))?;
            return host.to(dev, id).map_err(Error::ort(format!("copying {} values to {}", values.len(), self.device)));
        }
        let mut t = Tensor::<f32>::new(&self.allocator, shape.to_vec()).map_err(Error::ort("allocating a tensor"))?;
        t.extract_tensor_mut().1.copy_from_slice(values);
        Ok(t)
    }

    /// True when every value is finite (read in place on the CPU, copied from a GPU).
    pub fn all_finite(&self, tensor: &Tensor<f32>) -> Result<bool> {
        if self.device.is_gpu() {
            return Ok(self.read(tensor)?.iter().all(|v| v.is_finite()));
        }
        Ok(tensor.extract_tensor().1.iter().all(|v| v.is_finite()))
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

/// A host tensor for outputs and per-step inputs.
pub(crate) fn host_tensor(shape: &[usize]) -> Result<Tensor<f32>> {
    let mut t = Tensor::<f32>::new(&Allocator::default(), shape.to_vec()).map_err(Error::ort("allocating a host tensor"))?;
    t.extract_tensor_mut().1.fill(0.0);
    Ok(t)
}
