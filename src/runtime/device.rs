//! `--device cpu|cuda[:N]|tensorrt[:N]` and the execution provider it registers.

use std::fmt;
use std::str::FromStr;

use ort::ep::{self, ExecutionProviderDispatch};
use ort::memory::AllocationDevice;

/// Where the graphs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(i32),
    TensorRt(i32),
}

impl Device {
    /// The provider to register, `None` for the default CPU provider. Registered with
    /// `error_on_failure` so a missing CUDA library is an error, not a CPU run.
    pub fn execution_provider(&self, cuda: &CudaOptions) -> Option<ExecutionProviderDispatch> {
        match *self {
            Device::Cpu => None,
            Device::Cuda(id) => Some(cuda.provider(id).build().error_on_failure()),
            Device::TensorRt(id) => {
                Some(ep::TensorRT::default().with_device_id(id).build().error_on_failure())
            }
        }
    }

    /// The memory the trainable state lives in.
    pub fn allocation(&self) -> (AllocationDevice<'static>, i32) {
        match *self {
            Device::Cpu => (AllocationDevice::CPU, 0),
            // TensorRT falls back to CUDA kernels for unsupported nodes and shares CUDA memory.
            Device::Cuda(id) | Device::TensorRt(id) => (AllocationDevice::CUDA, id),
        }
    }

    pub fn is_gpu(&self) -> bool {
        !matches!(self, Device::Cpu)
    }
}

/// CUDA provider settings that change memory or numerics (docs/DESIGN.md §6a).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CudaOptions {
    /// Grow the memory arena by exactly what is requested (the arena then tracks live memory)
    /// rather than in powers of two (faster to warm up, but it reports and keeps up to 2×).
    pub arena_exact: bool,
    /// Upper bound on the provider's arena, in bytes.
    pub memory_limit: Option<usize>,
    /// TensorFloat-32 matmuls for float32 graphs. Off by default, like PyTorch's matmuls.
    pub tf32: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self { arena_exact: true, memory_limit: None, tf32: false }
    }
}

impl CudaOptions {
    fn provider(&self, device_id: i32) -> ep::CUDA {
        let strategy = if self.arena_exact { ep::ArenaExtendStrategy::SameAsRequested } else { ep::ArenaExtendStrategy::NextPowerOfTwo };
        let mut provider = ep::CUDA::default().with_device_id(device_id).with_arena_extend_strategy(strategy).with_tf32(self.tf32);
        if let Some(limit) = self.memory_limit {
            provider = provider.with_memory_limit(limit);
        }
        provider
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(id) => write!(f, "cuda:{id}"),
            Device::TensorRt(id) => write!(f, "tensorrt:{id}"),
        }
    }
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, id) = match s.split_once(':') {
            Some((kind, id)) => {
                let id = id.parse::<i32>().map_err(|_| format!("bad device index in `{s}`"))?;
                if id < 0 {
                    return Err(format!("bad device index in `{s}`"));
                }
                (kind, id)
            }
            None => (s, 0),
        };
        match kind.to_ascii_lowercase().as_str() {
            "cpu" if !s.contains(':') => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(id)),
            "tensorrt" | "trt" => Ok(Device::TensorRt(id)),
            _ => Err(format!("unknown device `{s}`: expected cpu, cuda[:N] or tensorrt[:N]")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:1".parse::<Device>(), Ok(Device::Cuda(1)));
        assert_eq!("tensorrt:2".parse::<Device>(), Ok(Device::TensorRt(2)));
        assert!("gpu".parse::<Device>().is_err());
        assert!("cuda:x".parse::<Device>().is_err());
        assert!("cpu:1".parse::<Device>().is_err());
    }
}
