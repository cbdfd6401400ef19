//! The `com.flowstep` attention operators on ONNX Runtime's CUDA provider (`--features
//! cuda-attention`): cuDNN 9's SDPA forward and backward, bf16 and fp16, head dim 128, through
//! the C++ shim `libflowstep_sdpa.so` (csrc/), opened at run time so that the flowstep binary
//! links nothing from CUDA.
//!
//! Registered with `execution_provider_type() == CUDAExecutionProvider`, so ONNX Runtime hands
//! the kernels device pointers. Each call runs on the provider's compute stream with the
//! provider's cuDNN handle; outputs come from the kernel context (the provider's arena) and the
//! cuDNN workspace from the provider's allocator, freed after the launch is enqueued (the arena
//! reuses it only for later work on the same stream). Nothing is copied to the host and nothing
//! synchronises. cuDNN graphs are built once per [`GraphKey`] and kept for the process.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ffi::{CStr, c_char, c_void};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, OnceLock};

use ort::ep::cuda::resource::{CuDNNHandle, DeviceId};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::operator::{BoxedKernel, ComputeContext, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput};
use ort::value::{DynTensorValueType, TensorElementType};

use super::fused_attention::{BACKWARD, DOMAIN, FORWARD, kernel_setup};

pub const PROVIDER: &str = "CUDAExecutionProvider";
/// The shim's file name; found next to the flowstep binary, or at `$FLOWSTEP_SDPA_LIB`.
pub const LIBRARY: &str = "libflowstep_sdpa.so";
/// The head dimension of Wan 1.3B and 14B, the one these kernels are built and measured for.
pub const HEAD_DIM: i64 = 128;
/// FLOWSTEP_SDPA_ABI in csrc/flowstep_sdpa.h.
const ABI: i32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Direction {
    Forward = 0,
    Backward = 1,
}

/// The operators' element types on CUDA; cuDNN's SDPA has no float32 path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Dtype {
    Bf16 = 0,
    Fp16 = 1,
}

impl Dtype {
    fn element(self) -> TensorElementType {
        match self {
            Dtype::Bf16 => TensorElementType::Bfloat16,
            Dtype::Fp16 => TensorElementType::Float16,
        }
    }
}

/// `flowstep_sdpa_desc` of csrc/flowstep_sdpa.h: dims in cuDNN's [B, H, S, D] order, strides
/// in elements.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Desc {
    direction: i32,
    dtype: i32,
    b: i64,
    h: i64,
    sq: i64,
    sk: i64,
    d: i64,
    scale: f32,
    q_strides: [i64; 4],
    kv_strides: [i64; 4],
    lse_strides: [i64; 4],
}

/// Strides, in cuDNN's [B, H, S, D] dim order, of a contiguous [B, S, H, D] tensor (Wan's q,
/// k, v and their gradients): cuDNN reads them in place, no transpose.
pub(crate) fn bshd_strides(s: i64, h: i64, d: i64) -> [i64; 4] {
    [s * h * d, d, h * d, 1]
}

/// Strides of the [B, H, Sq] float32 lse seen as cuDNN's [B, H, Sq, 1] softmax statistics.
pub(crate) fn lse_strides(h: i64, sq: i64) -> [i64; 4] {
    [h * sq, sq, 1, 1]
}

/// Everything a cuDNN graph and its plan depend on: one per distinct attention call in a step
/// (Wan: self- and cross-attention, forward and backward, per latent size), shared by all blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct GraphKey {
    direction: Direction,
    dtype: Dtype,
    device: u32,
    b: i64,
    h: i64,
    sq: i64,
    sk: i64,
    d: i64,
    scale_bits: u32,
}

impl GraphKey {
    /// From the operator's q [B, Sq, H, D] and k, v [B, Sk, H, D]; refuses shapes these
    /// kernels are not built for, in one line.
    pub(crate) fn new(direction: Direction, dtype: Dtype, device: u32, q: &[i64], k: &[i64], v: &[i64], scale: f32) -> Result<Self, String> {
        let (&[b, sq, h, d], &[kb, sk, kh, kd]) = (q, k) else {
            return Err(format!("q {q:?}, k {k:?}: expected q [B, Sq, H, D] and k, v [B, Sk, H, D]"));
        };
        if k != v || (kb, kh, kd) != (b, h, d) || [b, sq, h, d, sk].iter().any(|&x| x < 1) {
            return Err(format!("q {q:?}, k {k:?}, v {v:?}: expected q [B, Sq, H, D] and k, v [B, Sk, H, D]"));
        }
        if d != HEAD_DIM {
            return Err(format!("q {q:?}: head dim {d}, the CUDA kernels run head dim {HEAD_DIM} only (Wan 1.3B and 14B)"));
        }
        Ok(GraphKey { direction, dtype, device, b, h, sq, sk, d, scale_bits: scale.to_bits() })
    }

    pub(crate) fn desc(&self) -> Desc {
        Desc {
            direction: self.direction as i32,
            dtype: self.dtype as i32,
            b: self.b,
            h: self.h,
            sq: self.sq,
            sk: self.sk,
            d: self.d,
            scale: f32::from_bits(self.scale_bits),
            q_strides: bshd_strides(self.sq, self.h, self.d),
            kv_strides: bshd_strides(self.sk, self.h, self.d),
            lse_strides: lse_strides(self.h, self.sq),
        }
    }

    fn lse_shape(&self) -> [i64; 3] {
        [self.b, self.h, self.sq]
    }
}

type AbiFn = unsafe extern "C" fn() -> i32;
type BuildFn = unsafe extern "C" fn(*const Desc, *mut c_void, *mut *mut c_void, *mut i64, *mut c_char, usize) -> i32;
type RunFn = unsafe extern "C" fn(*mut c_void, *mut c_void, *mut c_void, *const *mut c_void, *mut c_void, *mut c_char, usize) -> i32;

/// The opened shim. The library stays loaded for the process (the static below), so the
/// function pointers stay valid.
pub(crate) struct Shim {
    _library: libloading::Library,
    build: BuildFn,
    run: RunFn,
}

/// Where the shim is looked for: `$FLOWSTEP_SDPA_LIB` alone if set; else next to the running
/// binary, then where `cargo build` left it.
fn candidates() -> Vec<PathBuf> {
    if let Some(path) = std::env::var_os("FLOWSTEP_SDPA_LIB") {
        return vec![PathBuf::from(path)];
    }
    let beside = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|dir| dir.join(LIBRARY)));
    beside.into_iter().chain([PathBuf::from(env!("FLOWSTEP_SDPA_BUILT"))]).collect()
}

/// Opens the shim at `path`; an error names the path and the loader's reason.
pub(crate) fn open(path: &Path) -> Result<Shim, String> {
    let fail = |e: libloading::Error| {
        let reason = std::error::Error::source(&e).map_or_else(|| e.to_string(), |source| format!("{e}: {source}"));
        format!("{}: {reason}", path.display())
    };
    // SAFETY: the shim's initialisers only set up the C++ runtime; its symbols have the
    // signatures above (csrc/flowstep_sdpa.h), and the ABI number is checked before any call.
    unsafe {
        let library = libloading::Library::new(path).map_err(fail)?;
        let abi = library.get::<AbiFn>(b"flowstep_sdpa_abi\0").map_err(fail)?();
        if abi != ABI {
            return Err(format!("{} has ABI {abi}, this flowstep needs {ABI} (rebuild both together)", path.display()));
        }
        let build = *library.get::<BuildFn>(b"flowstep_sdpa_build\0").map_err(fail)?;
        let run = *library.get::<RunFn>(b"flowstep_sdpa_run\0").map_err(fail)?;
        Ok(Shim { _library: library, build, run })
    }
}

/// The shim, opened once; the error names every place it was looked for.
pub(crate) fn shim() -> Result<&'static Shim, String> {
    static SHIM: OnceLock<Result<Shim, String>> = OnceLock::new();
    SHIM.get_or_init(|| {
        let paths = candidates();
        let mut reasons = Vec::new();
        for path in paths.iter().filter(|p| p.exists() || std::env::var_os("FLOWSTEP_SDPA_LIB").is_some()) {
            match open(path) {
                Ok(shim) => return Ok(shim),
                Err(e) => reasons.push(e),
            }
        }
        let why = if reasons.is_empty() {
            format!("not found in {}", paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))
        } else {
            reasons.join("; ")
        };
        Err(format!(
            "cannot load {LIBRARY}, the cuDNN attention library of this cuda-attention build ({why}): put it next to the flowstep binary or set FLOWSTEP_SDPA_LIB"
        ))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// A built cuDNN plan and its workspace size; kept for the process.
struct Plan {
    ptr: *mut c_void,
    workspace: usize,
}

// SAFETY: a plan is only used under the PLANS lock.
unsafe impl Send for Plan {}

static PLANS: LazyLock<Mutex<HashMap<GraphKey, Plan>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// The shim's one-line message from its error buffer.
fn message(buffer: &[c_char]) -> String {
    // SAFETY: the shim writes a NUL-terminated string within the buffer (snprintf).
    unsafe { CStr::from_ptr(buffer.as_ptr()) }.to_string_lossy().into_owned()
}

fn build(shim: &Shim, key: &GraphKey, handle: *mut c_void) -> Result<Plan, String> {
    let (desc, mut ptr, mut workspace, mut err) = (key.desc(), std::ptr::null_mut(), 0i64, [0 as c_char; 1024]);
    // SAFETY: every pointer is valid for the call; the shim copies desc.
    let status = unsafe { (shim.build)(&desc, handle, &mut ptr, &mut workspace, err.as_mut_ptr(), err.len()) };
    if status != 0 {
        return Err(message(&err));
    }
    Ok(Plan { ptr, workspace: usize::try_from(workspace).map_err(|_| format!("cuDNN asked for {workspace} bytes of workspace"))? })
}

struct CudaForward(Dtype);
struct CudaBackward(Dtype);

impl Operator for CudaForward {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        FORWARD
    }

    fn execution_provider_type(&self) -> Option<&str> {
        Some(PROVIDER)
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        std::array::from_fn::<_, 3, _>(|_| OperatorInput::required(self.0.element()))
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(self.0.element()), OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        kernel(FORWARD, Direction::Forward, self.0, kctx)
    }
}

impl Operator for CudaBackward {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        BACKWARD
    }

    fn execution_provider_type(&self) -> Option<&str> {
        Some(PROVIDER)
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        let t = || OperatorInput::required(self.0.element());
        [t(), t(), t(), t(), OperatorInput::required(TensorElementType::Float32), t()]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        std::array::from_fn::<_, 3, _>(|_| OperatorOutput::required(self.0.element()))
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        kernel(BACKWARD, Direction::Backward, self.0, kctx)
    }
}

fn kernel<'attr>(op: &'static str, direction: Direction, dtype: Dtype, kctx: &KernelContext<'attr>) -> ort::Result<BoxedKernel<'attr>> {
    let (scale, node) = kernel_setup(op, kctx)?;
    Ok(Box::new(move |ctx: &ComputeContext| {
        run(ctx, direction, dtype, scale).map_err(|e| ort::Error::new(format!("{DOMAIN}::{op} node `{node}` on cuda: {e}")))
    }))
}

/// The domain for a CUDA session: both operators, bf16 and fp16, on the CUDA provider.
pub fn cuda_domain() -> ort::Result<OperatorDomain> {
    OperatorDomain::new(DOMAIN)?
        .add(CudaForward(Dtype::Bf16))?
        .add(CudaForward(Dtype::Fp16))?
        .add(CudaBackward(Dtype::Bf16))?
        .add(CudaBackward(Dtype::Fp16))
}

fn expect_shape(name: &str, got: &[i64], want: &[i64]) -> Result<(), String> {
    if got == want { Ok(()) } else { Err(format!("input `{name}` has shape {got:?}, expected {want:?}")) }
}

fn run(ctx: &ComputeContext, direction: Direction, dtype: Dtype, scale: f32) -> Result<(), String> {
    const NAMES: [&str; 6] = ["q", "k", "v", "o", "lse", "do"];
    let count = if direction == Direction::Forward { 3 } else { 6 };
    let mut inputs = Vec::with_capacity(count);
    for name in &NAMES[..count] {
        let value = ctx.input(inputs.len()).map_err(|e| e.to_string())?.ok_or_else(|| format!("input `{name}` is missing"))?;
        inputs.push(value.downcast::<DynTensorValueType>().map_err(|e| format!("input `{name}`: {e}"))?);
    }
    let shape = |i: usize| inputs[i].shape().to_vec();
    let device = ctx.resource(DeviceId).map_err(|e| format!("the CUDA provider's device id: {e}"))?;
    let key = GraphKey::new(direction, dtype, device, &shape(0), &shape(1), &shape(2), scale)?;
    let output_shapes = if direction == Direction::Forward {
        vec![shape(0), key.lse_shape().to_vec()]
    } else {
        expect_shape("o", &shape(3), &shape(0))?;
        expect_shape("lse", &shape(4), &key.lse_shape())?;
        expect_shape("do", &shape(5), &shape(0))?;
        vec![shape(0), shape(1), shape(1)]
    };
    let mut tensors: Vec<*mut c_void> = inputs.iter().map(|t| t.data_ptr().cast_mut()).collect();
    for (idx, dims) in output_shapes.into_iter().enumerate() {
        let value = ctx.output(idx, dims).map_err(|e| e.to_string())?.ok_or_else(|| format!("output {idx} is not wanted"))?;
        let value = value.downcast::<DynTensorValueType>().map_err(|e| format!("output {idx}: {e}"))?;
        tensors.push(value.data_ptr().cast_mut());
    }
    let stream = ctx.stream().map_err(|e| e.to_string())?.ok_or("ONNX Runtime gave no CUDA compute stream")?;
    let handle = ctx.resource(CuDNNHandle).map_err(|e| format!("the CUDA provider's cuDNN handle: {e}"))?.cast_mut().cast::<c_void>();
    if handle.is_null() {
        return Err("the CUDA provider has no cuDNN handle".into());
    }
    let shim = shim()?;
    let mut plans = PLANS.lock().map_err(|_| "a previous attention call panicked".to_string())?;
    let plan = match plans.entry(key) {
        Entry::Occupied(entry) => entry.into_mut(),
        Entry::Vacant(entry) => entry.insert(build(shim, &key, handle)?),
    };
    let memory = MemoryInfo::new(AllocationDevice::CUDA, device as i32, AllocatorType::Device, MemoryType::Default).map_err(|e| e.to_string())?;
    let allocator = ctx.allocator(&memory).map_err(|e| format!("the CUDA provider's allocator: {e}"))?;
    let mut workspace =
        if plan.workspace > 0 { Some(allocator.alloc::<u8>(plan.workspace).map_err(|e| format!("{} bytes of cuDNN workspace: {e}", plan.workspace))?) } else { None };
    let workspace_ptr = workspace.as_mut().map_or(std::ptr::null_mut(), |block| block.as_mut_ptr());
    let mut err = [0 as c_char; 1024];
    // SAFETY: the tensors are this call's inputs and outputs on the provider's device, in the
    // order the shim's uids expect; the workspace outlives the enqueue (and is stream-ordered).
    let status = unsafe { (shim.run)(plan.ptr, handle, stream.as_ptr(), tensors.as_ptr(), workspace_ptr, err.as_mut_ptr(), err.len()) };
    if status != 0 { Err(message(&err)) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAN_HEADS: i64 = 12;

    fn bshd(b: i64, s: i64) -> [i64; 4] {
        [b, s, WAN_HEADS, HEAD_DIM]
    }

    fn key(direction: Direction, dtype: Dtype, sq: i64, sk: i64, scale: f32) -> GraphKey {
        GraphKey::new(direction, dtype, 0, &bshd(1, sq), &bshd(1, sk), &bshd(1, sk), scale).unwrap()
    }

    /// cuDNN addresses element [b, h, s, d] at Σ index·stride; that must be where the
    /// CPU kernels (fused_attention::kernels::load_rows) and Wan keep it in [B, S, H, D] memory.
    #[test]
    fn strides_address_wan_bshd_memory() {
        let (b_n, s_n, h_n, d_n) = (2i64, 1560i64, WAN_HEADS, HEAD_DIM);
        let strides = bshd_strides(s_n, h_n, d_n);
        for (b, s, h, d) in [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (1, 1559, 11, 127), (1, 777, 5, 64)] {
            let at = [b, h, s, d].iter().zip(strides).map(|(i, st)| i * st).sum::<i64>();
            assert_eq!(at, ((b * s_n + s) * h_n + h) * d_n + d, "[b={b}, s={s}, h={h}, d={d}]");
        }
        let last = [b_n - 1, h_n - 1, s_n - 1, d_n - 1].iter().zip(strides).map(|(i, st)| i * st).sum::<i64>();
        assert_eq!(last + 1, b_n * s_n * h_n * d_n, "dense: the last element ends the tensor");
        // lse [B, H, Sq] as [B, H, Sq, 1]: the CPU kernels' (b·H + h)·Sq + i.
        let lse = lse_strides(h_n, s_n);
        for (b, h, i) in [(0, 0, 1), (1, 3, 100), (1, 11, 1559)] {
            assert_eq!(b * lse[0] + h * lse[1] + i * lse[2], (b * h_n + h) * s_n + i);
        }
    }

    #[test]
    fn desc_matches_the_c_header() {
        // csrc/flowstep_sdpa.cpp static_asserts the same size and offsets.
        assert_eq!(std::mem::size_of::<Desc>(), 152);
        assert_eq!(std::mem::offset_of!(Desc, scale), 48);
        assert_eq!(std::mem::offset_of!(Desc, q_strides), 56);
        assert_eq!(std::mem::offset_of!(Desc, lse_strides), 120);
        let desc = key(Direction::Backward, Dtype::Fp16, 14_040, 512, 0.125).desc();
        assert_eq!((desc.direction, desc.dtype, desc.sq, desc.sk, desc.scale), (1, 1, 14_040, 512, 0.125));
        assert_eq!(desc.q_strides, [14_040 * 1536, 128, 1536, 1]);
        assert_eq!(desc.kv_strides, [512 * 1536, 128, 1536, 1]);
        assert_eq!(desc.lse_strides, [12 * 14_040, 14_040, 1, 1]);
    }

    /// One Wan 1.3B step at one latent size: 30 blocks × (self, cross) × (forward, backward)
    /// calls share 4 graphs; every field of the key separates graphs.
    #[test]
    fn graph_cache_keys() {
        let scale = 1.0 / (HEAD_DIM as f32).sqrt();
        let mut cache = HashMap::new();
        for _block in 0..30 {
            for sk in [14_040, 512] {
                for direction in [Direction::Forward, Direction::Backward] {
                    *cache.entry(key(direction, Dtype::Bf16, 14_040, sk, scale)).or_insert(0) += 1;
                }
            }
        }
        assert_eq!(cache.len(), 4);
        assert!(cache.values().all(|&n| n == 30));
        let base = key(Direction::Forward, Dtype::Bf16, 14_040, 14_040, scale);
        let other_device = GraphKey::new(Direction::Forward, Dtype::Bf16, 1, &bshd(1, 14_040), &bshd(1, 14_040), &bshd(1, 14_040), scale).unwrap();
        let other_batch = GraphKey::new(Direction::Forward, Dtype::Bf16, 0, &bshd(2, 14_040), &bshd(2, 14_040), &bshd(2, 14_040), scale).unwrap();
        for different in [
            key(Direction::Backward, Dtype::Bf16, 14_040, 14_040, scale),
            key(Direction::Forward, Dtype::Fp16, 14_040, 14_040, scale),
            key(Direction::Forward, Dtype::Bf16, 32_760, 32_760, scale),
            key(Direction::Forward, Dtype::Bf16, 14_040, 32_760, scale),
            key(Direction::Forward, Dtype::Bf16, 14_040, 14_040, scale * 0.5),
            other_device,
            other_batch,
        ] {
            assert_ne!(base, different);
        }
        assert_eq!(base, key(Direction::Forward, Dtype::Bf16, 14_040, 14_040, scale));
    }

    #[test]
    fn unsupported_shapes_are_refused_in_one_line() {
        let refuse = |q: &[i64], k: &[i64], v: &[i64]| GraphKey::new(Direction::Forward, Dtype::Bf16, 0, q, k, v, 0.1).unwrap_err();
        let head64 = refuse(&[1, 32, 24, 64], &[1, 32, 24, 64], &[1, 32, 24, 64]);
        assert!(head64.contains("head dim 64") && head64.contains("[1, 32, 24, 64]") && !head64.contains('\n'), "{head64}");
        for (q, k, v) in [
            (vec![1, 32, 12, 128], vec![1, 16, 12, 128], vec![1, 17, 12, 128]),
            (vec![1, 32, 12, 128], vec![2, 16, 12, 128], vec![2, 16, 12, 128]),
            (vec![1, 32, 12, 128], vec![1, 16, 6, 128], vec![1, 16, 6, 128]),
            (vec![32, 12, 128], vec![16, 12, 128], vec![16, 12, 128]),
            (vec![1, 0, 12, 128], vec![1, 16, 12, 128], vec![1, 16, 12, 128]),
        ] {
            let e = refuse(&q, &k, &v);
            assert!(e.contains("expected q [B, Sq, H, D]") && !e.contains('\n'), "{e}");
        }
    }

    /// The shim builds without CUDA and links nothing from it: it opens here, its ABI matches,
    /// and asking it for a plan without cuDNN installed fails in one line naming libcudnn.so.9.
    #[test]
    fn shim_opens_and_names_a_missing_cudnn() {
        let shim = open(Path::new(env!("FLOWSTEP_SDPA_BUILT"))).unwrap();
        // SAFETY: probing whether cuDNN can be opened at all; nothing is called.
        if unsafe { libloading::Library::new("libcudnn.so.9") }.is_ok() {
            return; // cuDNN reachable: the plan build would go on to need a GPU.
        }
        let e = build(&shim, &key(Direction::Forward, Dtype::Bf16, 1560, 1560, 0.088), std::ptr::null_mut()).err().unwrap_or_default();
        assert!(e.contains("libcudnn.so.9") && e.contains("LD_LIBRARY_PATH") && !e.contains('\n'), "{e}");
        let missing = open(Path::new("/nonexistent/libflowstep_sdpa.so")).err().unwrap_or_default();
        assert!(missing.contains("/nonexistent/libflowstep_sdpa.so") && missing.contains("No such file"), "{missing}");
    }
}
