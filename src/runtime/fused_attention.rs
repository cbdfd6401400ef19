//! The `com.flowstep` attention operators of fused exports (`--attention fused`, issue 13):
//! `FlashAttention(q, k, v) -> (o, lse)` and `FlashAttentionGrad(q, k, v, o, lse, do) ->
//! (dq, dk, dv)`, attribute `scale`; q, o, dq [B, Sq, H, D], k, v [B, Sk, H, D], lse
//! [B, H, Sq] float32 (export/flowstep_export/model/attention.py defines them).
//!
//! On the CPU they are registered through ort's custom-operator API for float32 and bfloat16
//! inputs and run the blocked FlashAttention kernels of [`kernels`] (issue 25): nothing of
//! size [H, Sq, Sk] exists; softmax statistics and every accumulation are float32. The CUDA
//! kernels (cuDNN's SDPA, bf16/fp16) are `super::cuda_attention`, built only with
//! `--features cuda-attention`; [`check_device`] refuses, before any session is built, every
//! device and precision that this build has no kernels for.

use std::marker::PhantomData;

use half::bf16;
use ort::operator::{BoxedKernel, ComputeContext, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput};
use ort::value::{PrimitiveTensorElementType, TensorElementType, ValueRef, ValueRefMut};

use super::Device;
use crate::error::{Error, Result};

mod kernels;

pub const DOMAIN: &str = "com.flowstep";
pub const FORWARD: &str = "FlashAttention";
pub const BACKWARD: &str = "FlashAttentionGrad";

/// How the artifacts compute attention (manifest `training.attention.impl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionImpl {
    /// Standard ONNX ops (a Scan over query chunks): any ONNX Runtime build and provider.
    Chunked,
    /// The `com.flowstep` operators, which flowstep registers itself.
    Fused,
}

impl AttentionImpl {
    /// From the manifest's `training.attention` (absent in exports before it existed:
    /// chunked). A fused entry must name this domain and only operators implemented here.
    pub fn from_manifest(attention: &serde_json::Value) -> std::result::Result<Self, String> {
        match attention.get("impl").and_then(|v| v.as_str()) {
            None | Some("chunked") => Ok(AttentionImpl::Chunked),
            Some("fused") => {
                let domain = attention.get("domain").and_then(|v| v.as_str()).unwrap_or_default();
                if domain != DOMAIN {
                    return Err(format!("training.attention: fused operators of domain `{domain}`, flowstep implements `{DOMAIN}`"));
                }
                let names = attention.get("operators").and_then(|v| v.as_array()).cloned().unwrap_or_default();
                for name in &names {
                    let name = name.as_str().unwrap_or_default();
                    if name != FORWARD && name != BACKWARD {
                        return Err(format!("training.attention: operator `{DOMAIN}::{name}` is not implemented by this flowstep"));
                    }
                }
                Ok(AttentionImpl::Fused)
            }
            Some(other) => Err(format!("training.attention.impl `{other}` is unknown (expected chunked or fused)")),
        }
    }
}

/// One line refusing a device (and, on CUDA, a precision) this build has no fused attention
/// kernels for; `precision` is the manifest's `training.precision`.
pub fn check_device(device: Device, precision: &str) -> Result<()> {
    let ops = format!("these artifacts use the fused attention operator {DOMAIN}::{FORWARD} (and {BACKWARD})");
    let instead = format!("use --device cpu, or re-export with --attention chunked to run on {device}");
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(_) if !cfg!(feature = "cuda-attention") => Err(Error::Device(format!(
            "{ops}, which this build of flowstep implements for cpu only, not {device} (its CUDA kernels need a build with \
             --features cuda-attention, docs/fused-attention.md): {instead}"
        ))),
        Device::Cuda(_) if !matches!(precision, "bfloat16" | "float16") => Err(Error::Device(format!(
            "{ops} in {precision}, and the CUDA kernels (cuDNN's SDPA) run bfloat16 and float16 only, not {device} in {precision}: \
             re-export with --precision bfloat16, or {instead}"
        ))),
        Device::Cuda(_) => Ok(()),
        Device::TensorRt(_) => Err(Error::Device(format!(
            "{ops}, which flowstep implements for cpu and cuda, not {device} (TensorRT would not run them on the CUDA stream): {instead}"
        ))),
    }
}

/// The operator domain to register on a session for `device` (which [`check_device`] accepted)
/// whose intra-op pool has `threads` threads (None: ONNX Runtime's default, one per core): on
/// CUDA this opens the cuDNN shim first, so a missing library is one line at session build.
pub fn domain_for(device: Device, threads: Option<usize>) -> Result<OperatorDomain> {
    let registering = || format!("registering {DOMAIN} for {device}");
    match device {
        Device::Cpu => {
            let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            cpu_domain(threads).map_err(Error::ort(registering()))
        }
        #[cfg(feature = "cuda-attention")]
        Device::Cuda(_) => {
            super::cuda_attention::shim().map_err(Error::Device)?;
            super::cuda_attention::cuda_domain().map_err(Error::ort(registering()))
        }
        _ => check_device(device, "").and_then(|()| Err(Error::Device(format!("{}: no kernels", registering())))),
    }
}

/// The operator domain for a CPU session: both attention operators, float32 and bfloat16, and
/// the float32 pointwise operators of [`super::fused_pointwise`].
fn cpu_domain(threads: usize) -> ort::Result<OperatorDomain> {
    let mut domain = OperatorDomain::new(DOMAIN)?
        .add(Forward::<f32>(threads, PhantomData))?
        .add(Forward::<bf16>(threads, PhantomData))?
        .add(Backward::<f32>(threads, PhantomData))?
        .add(Backward::<bf16>(threads, PhantomData))?;
    for op in super::fused_pointwise::Pointwise::ALL {
        domain = domain.add(op)?;
    }
    Ok(domain)
}

/// The session's intra-op thread pool, which runs the kernels' tasks (`threads` threads).
struct IntraOpPool<'a> {
    ctx: &'a ComputeContext,
    threads: usize,
}

impl kernels::Parallel for IntraOpPool<'_> {
    fn threads(&self) -> usize {
        self.threads
    }

    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync + Send)) -> std::result::Result<(), String> {
        // One batch per task: ONNX Runtime hands them out as threads come free.
        self.ctx.par_for(n, n, f).map_err(|e| format!("intra-op thread pool: {e}"))
    }
}

/// An input/output element type: widened to f32 for the math, narrowed back on output.
pub(super) trait Element: PrimitiveTensorElementType + Copy + Send + Sync + 'static {
    const TYPE: TensorElementType;
    fn widen(self) -> f32;
    fn narrow(x: f32) -> Self;
    /// The values themselves when they are f32 already (the kernels then read them in place).
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl Element for f32 {
    const TYPE: TensorElementType = TensorElementType::Float32;
    fn widen(self) -> f32 {
        self
    }
    fn narrow(x: f32) -> Self {
        x
    }
    fn as_f32(x: &[Self]) -> Option<&[f32]> {
        Some(x)
    }
}

impl Element for bf16 {
    const TYPE: TensorElementType = TensorElementType::Bfloat16;
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

// `fn() -> T`: the operator holds no T, so it is Send + Sync for any element type. The usize
// is the session's intra-op thread count.
struct Forward<T>(usize, PhantomData<fn() -> T>);
struct Backward<T>(usize, PhantomData<fn() -> T>);

/// The `scale` attribute and the node name (for errors), read once per kernel.
pub(crate) fn kernel_setup(op: &str, kctx: &KernelContext<'_>) -> ort::Result<(f32, String)> {
    let node = kctx.node_name().unwrap_or_default();
    let scale = kctx
        .get::<f32>("scale")
        .ok_or_else(|| ort::Error::new(format!("{DOMAIN}::{op} node `{node}` has no float attribute `scale`")))?;
    Ok((scale, node))
}

impl<T: Element> Operator for Forward<T> {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        FORWARD
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        std::array::from_fn::<_, 3, _>(|_| OperatorInput::required(T::TYPE))
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(T::TYPE), OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let ((scale, node), threads) = (kernel_setup(FORWARD, kctx)?, self.0);
        Ok(Box::new(move |ctx: &ComputeContext| {
            run_forward::<T>(ctx, scale, threads).map_err(|e| ort::Error::new(format!("{DOMAIN}::{FORWARD} node `{node}` on cpu: {e}")))
        }))
    }
}

impl<T: Element> Operator for Backward<T> {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        BACKWARD
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        let t = || OperatorInput::required(T::TYPE);
        [t(), t(), t(), t(), OperatorInput::required(TensorElementType::Float32), t()]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        std::array::from_fn::<_, 3, _>(|_| OperatorOutput::required(T::TYPE))
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let ((scale, node), threads) = (kernel_setup(BACKWARD, kctx)?, self.0);
        Ok(Box::new(move |ctx: &ComputeContext| {
            run_backward::<T>(ctx, scale, threads).map_err(|e| ort::Error::new(format!("{DOMAIN}::{BACKWARD} node `{node}` on cpu: {e}")))
        }))
    }
}

/// Input `idx`, present and of element type T.
pub(super) fn input<'a>(ctx: &'a ComputeContext, idx: usize, name: &str) -> std::result::Result<ValueRef<'a>, String> {
    ctx.input(idx).map_err(|e| e.to_string())?.ok_or_else(|| format!("input `{name}` is missing"))
}

pub(super) fn tensor<'a, T: Element>(value: &'a ValueRef<'_>, name: &str) -> std::result::Result<(Vec<i64>, &'a [T]), String> {
    let (shape, data) = value.try_extract_tensor::<T>().map_err(|e| format!("input `{name}`: {e}"))?;
    Ok((shape.to_vec(), data))
}

pub(super) fn output<'a>(ctx: &'a ComputeContext, idx: usize, shape: Vec<i64>) -> std::result::Result<ValueRefMut<'a>, String> {
    ctx.output(idx, shape).map_err(|e| e.to_string())?.ok_or_else(|| format!("output {idx} is not wanted"))
}

pub(super) fn tensor_mut<'a, T: Element>(value: &'a mut ValueRefMut<'_>, idx: usize) -> std::result::Result<&'a mut [T], String> {
    value.try_extract_tensor_mut::<T>().map(|(_, data)| data).map_err(|e| format!("output {idx}: {e}"))
}

/// Batch, query and key lengths, heads and head dim; q [B, Sq, H, D], k and v [B, Sk, H, D].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Dims {
    pub b: usize,
    pub sq: usize,
    pub sk: usize,
    pub h: usize,
    pub d: usize,
}

impl Dims {
    fn of(q: &[i64], k: &[i64], v: &[i64]) -> std::result::Result<Self, String> {
        let dims = |s: &[i64]| -> Option<[usize; 4]> { s.iter().map(|&x| usize::try_from(x).ok()).collect::<Option<Vec<_>>>()?.try_into().ok() };
        match (dims(q), dims(k), dims(v)) {
            (Some([b, sq, h, d]), Some(kd @ [kb, sk, kh, dk]), Some(vd)) if kd == vd && (kb, kh, dk) == (b, h, d) => {
                Ok(Dims { b, sq, sk, h, d })
            }
            _ => Err(format!("q {q:?}, k {k:?}, v {v:?}: expected q [B, Sq, H, D] and k, v [B, Sk, H, D]")),
        }
    }

    fn lse_shape(&self) -> Vec<i64> {
        [self.b, self.h, self.sq].iter().map(|&x| x as i64).collect()
    }
}

pub(super) fn expect_shape(name: &str, got: &[i64], want: &[i64]) -> std::result::Result<(), String> {
    if got == want { Ok(()) } else { Err(format!("input `{name}` has shape {got:?}, expected {want:?}")) }
}

fn run_forward<T: Element>(ctx: &ComputeContext, scale: f32, threads: usize) -> std::result::Result<(), String> {
    let (q, k, v) = (input(ctx, 0, "q")?, input(ctx, 1, "k")?, input(ctx, 2, "v")?);
    let ((q_shape, q), (k_shape, k), (v_shape, v)) = (tensor::<T>(&q, "q")?, tensor::<T>(&k, "k")?, tensor::<T>(&v, "v")?);
    let dims = Dims::of(&q_shape, &k_shape, &v_shape)?;
    let (mut o, mut lse) = (output(ctx, 0, q_shape)?, output(ctx, 1, dims.lse_shape())?);
    let pool = IntraOpPool { ctx, threads };
    kernels::forward(q, k, v, dims, scale, tensor_mut::<T>(&mut o, 0)?, tensor_mut::<f32>(&mut lse, 1)?, &pool)
}

fn run_backward<T: Element>(ctx: &ComputeContext, scale: f32, threads: usize) -> std::result::Result<(), String> {
    let (q, k, v) = (input(ctx, 0, "q")?, input(ctx, 1, "k")?, input(ctx, 2, "v")?);
    let (o, lse, d_o) = (input(ctx, 3, "o")?, input(ctx, 4, "lse")?, input(ctx, 5, "do")?);
    let ((q_shape, q), (k_shape, k), (v_shape, v)) = (tensor::<T>(&q, "q")?, tensor::<T>(&k, "k")?, tensor::<T>(&v, "v")?);
    let dims = Dims::of(&q_shape, &k_shape, &v_shape)?;
    let ((o_shape, o), (lse_shape, lse), (do_shape, d_o)) = (tensor::<T>(&o, "o")?, tensor::<f32>(&lse, "lse")?, tensor::<T>(&d_o, "do")?);
    expect_shape("o", &o_shape, &q_shape)?;
    expect_shape("do", &do_shape, &q_shape)?;
    expect_shape("lse", &lse_shape, &dims.lse_shape())?;
    let (mut dq, mut dk, mut dv) = (output(ctx, 0, q_shape)?, output(ctx, 1, k_shape.clone())?, output(ctx, 2, k_shape)?);
    let (dq, dk, dv) = (tensor_mut::<T>(&mut dq, 0)?, tensor_mut::<T>(&mut dk, 1)?, tensor_mut::<T>(&mut dv, 2)?);
    kernels::backward(q, k, v, o, lse, d_o, dims, scale, dq, dk, dv, &IntraOpPool { ctx, threads })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_attention_entries() {
        let fused = serde_json::json!({"impl": "fused", "domain": DOMAIN, "operators": [FORWARD, BACKWARD]});
        assert_eq!(AttentionImpl::from_manifest(&fused), Ok(AttentionImpl::Fused));
        assert_eq!(AttentionImpl::from_manifest(&serde_json::json!({"impl": "chunked", "chunk": 16})), Ok(AttentionImpl::Chunked));
        assert_eq!(AttentionImpl::from_manifest(&serde_json::Value::Null), Ok(AttentionImpl::Chunked));
        let other = serde_json::json!({"impl": "fused", "domain": DOMAIN, "operators": ["RingAttention"]});
        assert!(AttentionImpl::from_manifest(&other).is_err_and(|e| e.contains("RingAttention")));
        assert!(AttentionImpl::from_manifest(&serde_json::json!({"impl": "sparse"})).is_err());
    }

    #[test]
    fn devices_without_kernels_are_refused_in_one_line() {
        assert!(check_device(Device::Cpu, "float32").is_ok());
        let refusal = |device, precision| check_device(device, precision).map_err(|e| e.to_string()).err().unwrap_or_default();
        let one_line = |m: &str, named: &str| m.contains("com.flowstep::FlashAttention") && m.contains(named) && !m.contains('\n');
        let trt = refusal(Device::TensorRt(1), "bfloat16");
        assert!(one_line(&trt, "tensorrt:1") && trt.contains("--attention chunked"), "{trt}");
        if cfg!(feature = "cuda-attention") {
            assert!(check_device(Device::Cuda(0), "bfloat16").is_ok() && check_device(Device::Cuda(0), "float16").is_ok());
            let fp32 = refusal(Device::Cuda(0), "float32");
            assert!(one_line(&fp32, "cuda:0") && fp32.contains("float32") && fp32.contains("--precision bfloat16"), "{fp32}");
        } else {
            let cuda = refusal(Device::Cuda(0), "bfloat16");
            assert!(one_line(&cuda, "cuda:0") && cuda.contains("--features cuda-attention"), "{cuda}");
        }
    }
}
