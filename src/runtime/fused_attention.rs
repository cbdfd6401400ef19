//! The `com.flowstep` attention operators of fused exports (`--attention fused`, issue 13):
//! `FlashAttention(q, k, v) -> (o, lse)` and `FlashAttentionGrad(q, k, v, o, lse, do) ->
//! (dq, dk, dv)`, attribute `scale`; q, o, dq [B, Sq, H, D], k, v [B, Sk, H, D], lse
//! [B, H, Sq] float32 (export/flowstep_export/model/attention.py defines them).
//!
//! This is the CPU reference implementation, registered through ort's custom-operator API
//! for float32 and bfloat16 inputs: plain math, one query row at a time, so nothing of size
//! [H, Sq, Sk] exists; softmax statistics and every accumulation are float32. The CUDA
//! kernels (cuDNN's SDPA, bf16/fp16) are `super::cuda_attention`, built only with
//! `--features cuda-attention`; [`check_device`] refuses, before any session is built, every
//! device and precision that this build has no kernels for.

use std::marker::PhantomData;

use half::bf16;
use ort::operator::{BoxedKernel, ComputeContext, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput};
use ort::value::{PrimitiveTensorElementType, TensorElementType};
use rayon::prelude::*;

use super::Device;
use crate::error::{Error, Result};

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

/// The operator domain to register on a session for `device` (which [`check_device`] accepted):
/// on CUDA this opens the cuDNN shim first, so a missing library is one line at session build.
pub fn domain_for(device: Device) -> Result<OperatorDomain> {
    let registering = || format!("registering {DOMAIN} for {device}");
    match device {
        Device::Cpu => cpu_domain().map_err(Error::ort(registering())),
        #[cfg(feature = "cuda-attention")]
        Device::Cuda(_) => {
            super::cuda_attention::shim().map_err(Error::Device)?;
            super::cuda_attention::cuda_domain().map_err(Error::ort(registering()))
        }
        _ => check_device(device, "").and_then(|()| Err(Error::Device(format!("{}: no kernels", registering())))),
    }
}

/// The operator domain for a CPU session: both operators, float32 and bfloat16.
fn cpu_domain() -> ort::Result<OperatorDomain> {
    OperatorDomain::new(DOMAIN)?
        .add(Forward::<f32>(PhantomData))?
        .add(Forward::<bf16>(PhantomData))?
        .add(Backward::<f32>(PhantomData))?
        .add(Backward::<bf16>(PhantomData))
}

/// An input/output element type: widened to f32 for the math, narrowed back on output.
trait Element: PrimitiveTensorElementType + Copy + Send + Sync + 'static {
    const TYPE: TensorElementType;
    fn widen(self) -> f32;
    fn narrow(x: f32) -> Self;
}

impl Element for f32 {
    const TYPE: TensorElementType = TensorElementType::Float32;
    fn widen(self) -> f32 {
        self
    }
    fn narrow(x: f32) -> Self {
        x
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

// `fn() -> T`: the operator holds no T, so it is Send + Sync for any element type.
struct Forward<T>(PhantomData<fn() -> T>);
struct Backward<T>(PhantomData<fn() -> T>);

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
        let (scale, node) = kernel_setup(FORWARD, kctx)?;
        Ok(Box::new(move |ctx: &ComputeContext| {
            run_forward::<T>(ctx, scale).map_err(|e| ort::Error::new(format!("{DOMAIN}::{FORWARD} node `{node}` on cpu: {e}")))
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
        let (scale, node) = kernel_setup(BACKWARD, kctx)?;
        Ok(Box::new(move |ctx: &ComputeContext| {
            run_backward::<T>(ctx, scale).map_err(|e| ort::Error::new(format!("{DOMAIN}::{BACKWARD} node `{node}` on cpu: {e}")))
        }))
    }
}

/// Input `idx` widened to f32, with its shape.
fn input<T: Element>(ctx: &ComputeContext, idx: usize, name: &str) -> std::result::Result<(Vec<i64>, Vec<f32>), String> {
    let value = ctx.input(idx).map_err(|e| e.to_string())?.ok_or_else(|| format!("input `{name}` is missing"))?;
    let (shape, data) = value.try_extract_tensor::<T>().map_err(|e| format!("input `{name}`: {e}"))?;
    Ok((shape.to_vec(), data.iter().map(|x| x.widen()).collect()))
}

fn output<T: Element>(ctx: &ComputeContext, idx: usize, shape: Vec<i64>, values: &[f32]) -> std::result::Result<(), String> {
    let mut value = ctx.output(idx, shape).map_err(|e| e.to_string())?.ok_or_else(|| format!("output {idx} is not wanted"))?;
    let (_, data) = value.try_extract_tensor_mut::<T>().map_err(|e| format!("output {idx}: {e}"))?;
    for (out, x) in data.iter_mut().zip(values) {
        *out = T::narrow(*x);
    }
    Ok(())
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

fn expect_shape(name: &str, got: &[i64], want: &[i64]) -> std::result::Result<(), String> {
    if got == want { Ok(()) } else { Err(format!("input `{name}` has shape {got:?}, expected {want:?}")) }
}

fn run_forward<T: Element>(ctx: &ComputeContext, scale: f32) -> std::result::Result<(), String> {
    let (q_shape, q) = input::<T>(ctx, 0, "q")?;
    let (k_shape, k) = input::<T>(ctx, 1, "k")?;
    let (v_shape, v) = input::<T>(ctx, 2, "v")?;
    let dims = Dims::of(&q_shape, &k_shape, &v_shape)?;
    let (o, lse) = forward(&q, &k, &v, dims, scale);
    output::<T>(ctx, 0, q_shape, &o)?;
    output::<f32>(ctx, 1, dims.lse_shape(), &lse)
}

fn run_backward<T: Element>(ctx: &ComputeContext, scale: f32) -> std::result::Result<(), String> {
    let (q_shape, q) = input::<T>(ctx, 0, "q")?;
    let (k_shape, k) = input::<T>(ctx, 1, "k")?;
    let (v_shape, v) = input::<T>(ctx, 2, "v")?;
    let dims = Dims::of(&q_shape, &k_shape, &v_shape)?;
    let (o_shape, o) = input::<T>(ctx, 3, "o")?;
    let (lse_shape, lse) = input::<f32>(ctx, 4, "lse")?;
    let (do_shape, d_o) = input::<T>(ctx, 5, "do")?;
    expect_shape("o", &o_shape, &q_shape)?;
    expect_shape("do", &do_shape, &q_shape)?;
    expect_shape("lse", &lse_shape, &dims.lse_shape())?;
    let (dq, dk, dv) = backward(&q, &k, &v, &o, &lse, &d_o, dims, scale);
    output::<T>(ctx, 0, q_shape, &dq)?;
    output::<T>(ctx, 1, k_shape.clone(), &dk)?;
    output::<T>(ctx, 2, k_shape, &dv)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// Row `s` of head `h` in batch `b` of a [B, S, H, D] tensor.
fn row(x: &[f32], dims: Dims, seq: usize, b: usize, s: usize, h: usize) -> &[f32] {
    let start = ((b * seq + s) * dims.h + h) * dims.d;
    &x[start..start + dims.d]
}

/// Per (batch, head), in parallel; results in b-major, h-minor order.
fn per_head<R: Send>(dims: Dims, f: impl Fn(usize, usize) -> R + Sync) -> Vec<R> {
    (0..dims.b * dims.h).into_par_iter().map(|i| f(i / dims.h, i % dims.h)).collect()
}

/// Copies per-head [S, D] blocks into a [B, S, H, D] tensor.
fn scatter(blocks: &[&[f32]], dims: Dims, seq: usize) -> Vec<f32> {
    let mut out = vec![0.0; dims.b * seq * dims.h * dims.d];
    for (i, block) in blocks.iter().enumerate() {
        let (b, h) = (i / dims.h, i % dims.h);
        for s in 0..seq {
            let start = ((b * seq + s) * dims.h + h) * dims.d;
            out[start..start + dims.d].copy_from_slice(&block[s * dims.d..(s + 1) * dims.d]);
        }
    }
    out
}

/// o = softmax(scale·q·kᵀ)·v and lse = log Σ exp(scale·q·kᵀ), one query row at a time.
pub(crate) fn forward(q: &[f32], k: &[f32], v: &[f32], dims: Dims, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let heads = per_head(dims, |b, h| {
        let mut scores = vec![0.0f32; dims.sk];
        let mut o = vec![0.0f32; dims.sq * dims.d];
        let mut lse = vec![0.0f32; dims.sq];
        for i in 0..dims.sq {
            let qi = row(q, dims, dims.sq, b, i, h);
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                *s = scale * dot(qi, row(k, dims, dims.sk, b, j, h));
                max = max.max(*s);
            }
            let l = max + scores.iter().map(|s| (s - max).exp()).sum::<f32>().ln();
            lse[i] = l;
            let oi = &mut o[i * dims.d..(i + 1) * dims.d];
            for (j, s) in scores.iter().enumerate() {
                axpy((s - l).exp(), row(v, dims, dims.sk, b, j, h), oi);
            }
        }
        (o, lse)
    });
    let o = scatter(&heads.iter().map(|(o, _)| o.as_slice()).collect::<Vec<_>>(), dims, dims.sq);
    // [B, H, Sq]: the per-head blocks in order.
    let lse = heads.into_iter().flat_map(|(_, lse)| lse).collect();
    (o, lse)
}

/// FlashAttention's backward: recompute p = exp(scale·q·kᵀ - lse) per query row;
/// dv += pᵀ·do, ds = p∘(do·vᵀ - rowsum(do∘o)), dq = scale·ds·k, dk += scale·dsᵀ·q.
#[allow(clippy::too_many_arguments)] // the operator's six inputs, its geometry and its attribute
pub(crate) fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    dims: Dims,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let heads = per_head(dims, |b, h| {
        let mut dq = vec![0.0f32; dims.sq * dims.d];
        let mut dk = vec![0.0f32; dims.sk * dims.d];
        let mut dv = vec![0.0f32; dims.sk * dims.d];
        for i in 0..dims.sq {
            let (qi, doi) = (row(q, dims, dims.sq, b, i, h), row(d_o, dims, dims.sq, b, i, h));
            let delta = dot(doi, row(o, dims, dims.sq, b, i, h));
            let l = lse[(b * dims.h + h) * dims.sq + i];
            let dqi = &mut dq[i * dims.d..(i + 1) * dims.d];
            for j in 0..dims.sk {
                let (kj, vj) = (row(k, dims, dims.sk, b, j, h), row(v, dims, dims.sk, b, j, h));
                let p = (scale * dot(qi, kj) - l).exp();
                axpy(p, doi, &mut dv[j * dims.d..(j + 1) * dims.d]);
                let ds = scale * p * (dot(doi, vj) - delta);
                axpy(ds, kj, dqi);
                axpy(ds, qi, &mut dk[j * dims.d..(j + 1) * dims.d]);
            }
        }
        (dq, dk, dv)
    });
    let dq: Vec<&[f32]> = heads.iter().map(|x| x.0.as_slice()).collect();
    let dk: Vec<&[f32]> = heads.iter().map(|x| x.1.as_slice()).collect();
    let dv: Vec<&[f32]> = heads.iter().map(|x| x.2.as_slice()).collect();
    (scatter(&dq, dims, dims.sq), scatter(&dk, dims, dims.sk), scatter(&dv, dims, dims.sk))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Σ o∘w in f64 through an explicit softmax: the loss whose gradient the backward computes.
    fn loss64(q: &[f32], k: &[f32], v: &[f32], w: &[f32], dims: Dims, scale: f64) -> f64 {
        let mut total = 0.0;
        for b in 0..dims.b {
            for h in 0..dims.h {
                for i in 0..dims.sq {
                    let qi = row(q, dims, dims.sq, b, i, h);
                    let s: Vec<f64> = (0..dims.sk)
                        .map(|j| scale * qi.iter().zip(row(k, dims, dims.sk, b, j, h)).map(|(a, c)| *a as f64 * *c as f64).sum::<f64>())
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - max).exp()).sum();
                    for (j, sj) in s.iter().enumerate() {
                        let p = (sj - max).exp() / z;
                        let vj = row(v, dims, dims.sk, b, j, h);
                        total += p * vj.iter().zip(row(w, dims, dims.sq, b, i, h)).map(|(a, c)| *a as f64 * *c as f64).sum::<f64>();
                    }
                }
            }
        }
        total
    }

    /// Forward and backward against an f64 softmax and its central differences, with
    /// Sq != Sk (cross-attention), two batches and three heads.
    #[test]
    fn matches_softmax_attention_and_its_gradient() {
        let dims = Dims { b: 2, sq: 5, sk: 7, h: 3, d: 4 };
        let (nq, nk) = (dims.b * dims.sq * dims.h * dims.d, dims.b * dims.sk * dims.h * dims.d);
        let (q, k, v, w) = (values(nq, 1), values(nk, 2), values(nk, 3), values(nq, 4));
        let scale = 0.7f32;
        let (o, lse) = forward(&q, &k, &v, dims, scale);
        let loss = loss64(&q, &k, &v, &w, dims, scale as f64);
        let got: f64 = o.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!((got - loss).abs() < 1e-5 * loss.abs().max(1.0), "{got} vs {loss}");
        let (dq, dk, dv) = backward(&q, &k, &v, &o, &lse, &w, dims, scale);
        let eps = 1e-2f32;
        for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
            for idx in (0..grad.len()).step_by(7) {
                let mut inputs = [q.clone(), k.clone(), v.clone()];
                inputs[which][idx] += eps;
                let plus = loss64(&inputs[0], &inputs[1], &inputs[2], &w, dims, scale as f64);
                inputs[which][idx] -= 2.0 * eps;
                let minus = loss64(&inputs[0], &inputs[1], &inputs[2], &w, dims, scale as f64);
                let numeric = (plus - minus) / (2.0 * eps as f64);
                assert!((grad[idx] as f64 - numeric).abs() < 2e-4, "input {which}[{idx}]: {} vs {numeric}", grad[idx]);
            }
        }
    }

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
