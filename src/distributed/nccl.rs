//! NCCL for CUDA ranks, opened at run time (`libnccl.so.2`, e.g. from the PyPI
//! `nvidia-nccl-cu13` wheel on LD_LIBRARY_PATH) with the CUDA runtime that ONNX Runtime's
//! CUDA provider already loaded: building needs no CUDA toolkit and no GPU. The gradient is
//! summed in place in the device buffer ONNX Runtime owns, after the training graph's run
//! has returned (ONNX Runtime synchronizes its stream at the end of a run), on CUDA's
//! default stream, which is synchronized before the next run reads the buffer.

use std::ffi::{CStr, c_char, c_int, c_void};

use libloading::Library;
use ort::value::Tensor;

use super::symbol;
use crate::error::{Error, Result};
use crate::runtime::Device;

pub const UNIQUE_ID_BYTES: usize = 128;
const NCCL_LIBRARY: &str = "libnccl.so.2";
/// The CUDA 13 runtime of the onnxruntime-gpu build flowstep pins (scripts/setup_ort.sh --gpu).
const CUDART_LIBRARY: &str = "libcudart.so.13";

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [u8; UNIQUE_ID_BYTES],
}

type Comm = *mut c_void;
type Stream = *mut c_void;
const SUCCESS: c_int = 0;
const FLOAT32: c_int = 7;
const FLOAT64: c_int = 8;
const SUM: c_int = 0;
const HOST_TO_DEVICE: c_int = 1;
const DEVICE_TO_HOST: c_int = 2;
/// The legacy default stream.
const DEFAULT_STREAM: Stream = std::ptr::null_mut();

struct Api {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int,
    comm_abort: unsafe extern "C" fn(Comm) -> c_int,
    comm_destroy: unsafe extern "C" fn(Comm) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    set_device: unsafe extern "C" fn(c_int) -> c_int,
    malloc: unsafe extern "C" fn(*mut *mut c_void, usize) -> c_int,
    free: unsafe extern "C" fn(*mut c_void) -> c_int,
    memcpy: unsafe extern "C" fn(*mut c_void, *const c_void, usize, c_int) -> c_int,
    stream_synchronize: unsafe extern "C" fn(Stream) -> c_int,
    _nccl: Library,
    _cudart: Library,
}

impl Api {
    fn open() -> Result<Self> {
        let open = |name: &str, hint: &str| {
            // SAFETY: NCCL's and CUDA's initializers touch only their own state.
            unsafe { Library::new(name) }.map_err(|e| Error::Distributed(format!("{name} cannot be opened ({e}); {hint}")))
        };
        let nccl = open(NCCL_LIBRARY, "put the nvidia-nccl-cu13 wheel's nvidia/nccl/lib on LD_LIBRARY_PATH")?;
        let cudart = open(CUDART_LIBRARY, "install the CUDA runtime with scripts/setup_ort.sh --gpu")?;
        // SAFETY: each symbol has the C signature of nccl.h / cuda_runtime_api.h declared in
        // the field it is read into.
        unsafe {
            Ok(Self {
                get_unique_id: symbol(&nccl, "ncclGetUniqueId")?,
                comm_init_rank: symbol(&nccl, "ncclCommInitRank")?,
                all_reduce: symbol(&nccl, "ncclAllReduce")?,
                comm_abort: symbol(&nccl, "ncclCommAbort")?,
                comm_destroy: symbol(&nccl, "ncclCommDestroy")?,
                error_string: symbol(&nccl, "ncclGetErrorString")?,
                set_device: symbol(&cudart, "cudaSetDevice")?,
                malloc: symbol(&cudart, "cudaMalloc")?,
                free: symbol(&cudart, "cudaFree")?,
                memcpy: symbol(&cudart, "cudaMemcpy")?,
                stream_synchronize: symbol(&cudart, "cudaStreamSynchronize")?,
                _nccl: nccl,
                _cudart: cudart,
            })
        }
    }

    fn nccl(&self, call: &str, code: c_int) -> Result<()> {
        if code == SUCCESS {
            return Ok(());
        }
        // SAFETY: NCCL returns a static string for every result code.
        let text = unsafe { CStr::from_ptr((self.error_string)(code)) }.to_string_lossy();
        Err(Error::Distributed(format!("{call} failed: {text} (NCCL error {code})")))
    }
}

fn cuda(call: &str, code: c_int) -> Result<()> {
    if code == SUCCESS { Ok(()) } else { Err(Error::Distributed(format!("{call} failed with CUDA error {code}"))) }
}

/// A communicator of all ranks, one GPU each.
pub struct Nccl {
    api: Api,
    comm: Comm,
    /// A small device buffer for summing host scalars.
    scratch: *mut c_void,
    /// Kept initialized when the ranks were launched by MPI: its launcher tracks them.
    _mpi: Option<super::mpi::Mpi>,
}

impl Nccl {
    /// Rank 0 makes the id that every rank then joins with.
    pub fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES]> {
        let api = Api::open()?;
        let mut id = UniqueId { internal: [0; UNIQUE_ID_BYTES] };
        // SAFETY: writes 128 bytes into `id`.
        api.nccl("ncclGetUniqueId", unsafe { (api.get_unique_id)(&mut id) })?;
        Ok(id.internal)
    }

    pub fn init(id: &[u8; UNIQUE_ID_BYTES], rank: usize, world_size: usize, device: Device) -> Result<Self> {
        let api = Api::open()?;
        let (_, index) = device.allocation();
        let mut comm: Comm = std::ptr::null_mut();
        let mut scratch: *mut c_void = std::ptr::null_mut();
        // SAFETY: plain CUDA/NCCL calls with valid out-pointers; the id is passed by value.
        unsafe {
            cuda("cudaSetDevice", (api.set_device)(index))?;
            api.nccl("ncclCommInitRank", (api.comm_init_rank)(&mut comm, world_size as c_int, UniqueId { internal: *id }, rank as c_int))?;
            cuda("cudaMalloc", (api.malloc)(&mut scratch, SCRATCH_VALUES * size_of::<f64>()))?;
        }
        Ok(Self { api, comm, scratch, _mpi: None })
    }

    pub fn keeping_mpi(mut self, mpi: super::mpi::Mpi) -> Self {
        self._mpi = Some(mpi);
        self
    }

    /// Sums the device buffer `gradient` over the ranks, in place.
    pub fn sum_device(&mut self, gradient: &mut Tensor<f32>) -> Result<()> {
        let count = gradient.shape().iter().product::<i64>() as usize;
        let data = gradient.data_ptr_mut();
        // SAFETY: `data` is ONNX Runtime's device allocation of `count` floats, complete (the
        // run that wrote it has returned) and not read again before the synchronize below.
        unsafe {
            self.api.nccl("ncclAllReduce", (self.api.all_reduce)(data, data, count, FLOAT32, SUM, self.comm, DEFAULT_STREAM))?;
            cuda("cudaStreamSynchronize", (self.api.stream_synchronize)(DEFAULT_STREAM))
        }
    }

    /// Sums host scalars through the device scratch buffer.
    pub fn sum_host(&mut self, values: &mut [f64]) -> Result<()> {
        if values.len() > SCRATCH_VALUES {
            return Err(Error::Distributed(format!("{} host values to sum, more than {SCRATCH_VALUES}", values.len())));
        }
        let bytes = std::mem::size_of_val(values);
        // SAFETY: the scratch buffer holds SCRATCH_VALUES doubles; copies are synchronous.
        unsafe {
            cuda("cudaMemcpy", (self.api.memcpy)(self.scratch, values.as_ptr().cast(), bytes, HOST_TO_DEVICE))?;
            self.api.nccl("ncclAllReduce", (self.api.all_reduce)(self.scratch, self.scratch, values.len(), FLOAT64, SUM, self.comm, DEFAULT_STREAM))?;
            cuda("cudaMemcpy", (self.api.memcpy)(values.as_mut_ptr().cast(), self.scratch, bytes, DEVICE_TO_HOST))
        }
    }

    /// Ends this rank's part in the communicator at once, so that no collective waits on it.
    pub fn abort(&self) {
        // SAFETY: the communicator is valid until drop.
        unsafe { (self.api.comm_abort)(self.comm) };
    }
}

/// Host values summed at once (counts, loss sum, flags).
const SCRATCH_VALUES: usize = 16;

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: after the last collective of this rank.
        unsafe {
            (self.api.comm_destroy)(self.comm);
            (self.api.free)(self.scratch);
        }
    }
}
