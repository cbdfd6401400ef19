//! The `com.flowstep` tanh-GELU operators of fused float32 exports (issue 25):
//! `GeluTanh(x) -> y` and `GeluTanhGrad(x, dy) -> dx`, any shape, float32
//! (export/flowstep_export/model/gelu_operator.py defines them). One pass over memory each,
//! where the standard-op form is 6 nodes forward and ~13 backward over [tokens, ffn_dim];
//! the per-element math is [`super::simd`]'s, split into blocks over ONNX Runtime's intra-op
//! thread pool.

use ort::operator::{BoxedKernel, ComputeContext, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::TensorElementType;

use super::fused_attention::{DOMAIN, input, output, tensor, tensor_mut};
use super::simd::{self, Isa};

pub const FORWARD: &str = "GeluTanh";
pub const BACKWARD: &str = "GeluTanhGrad";

/// Elements per task: 256 KiB of float32, large enough that a task outweighs its dispatch.
const BLOCK: usize = 1 << 16;

/// The forward operator.
pub(super) struct GeluTanh;
/// The backward operator.
pub(super) struct GeluTanhGrad;

impl Operator for GeluTanh {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        FORWARD
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [OperatorInput::required(TensorElementType::Float32)]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let node = kctx.node_name().unwrap_or_default();
        Ok(Box::new(move |ctx: &ComputeContext| {
            run(ctx, false).map_err(|e| ort::Error::new(format!("{DOMAIN}::{FORWARD} node `{node}` on cpu: {e}")))
        }))
    }
}

impl Operator for GeluTanhGrad {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        BACKWARD
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [OperatorInput::required(TensorElementType::Float32), OperatorInput::required(TensorElementType::Float32)]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let node = kctx.node_name().unwrap_or_default();
        Ok(Box::new(move |ctx: &ComputeContext| {
            run(ctx, true).map_err(|e| ort::Error::new(format!("{DOMAIN}::{BACKWARD} node `{node}` on cpu: {e}")))
        }))
    }
}

/// An output buffer that tasks write in disjoint blocks.
struct SharedOut(*mut f32, usize);
// SAFETY: every task writes only its own block (`block_mut`), and `par_for` returns after all
// tasks have finished, while the buffer is still borrowed.
unsafe impl Sync for SharedOut {}
unsafe impl Send for SharedOut {}

impl SharedOut {
    /// Block `i` of BLOCK elements (the last one shorter).
    ///
    /// # Safety
    /// No two live borrows may have the same `i`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn block_mut(&self, i: usize) -> &mut [f32] {
        let start = i * BLOCK;
        let len = BLOCK.min(self.1 - start);
        // SAFETY: start + len <= self.1, the buffer's length; disjoint per the caller.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

fn run(ctx: &ComputeContext, backward: bool) -> std::result::Result<(), String> {
    let x_value = input(ctx, 0, "x")?;
    let (shape, x) = tensor::<f32>(&x_value, "x")?;
    let dy_value = if backward { Some(input(ctx, 1, "dy")?) } else { None };
    let dy = match &dy_value {
        Some(value) => {
            let (dy_shape, dy) = tensor::<f32>(value, "dy")?;
            if dy_shape != shape {
                return Err(format!("input `dy` has shape {dy_shape:?}, expected x's {shape:?}"));
            }
            Some(dy)
        }
        None => None,
    };
    let mut out_value = output(ctx, 0, shape)?;
    let out = tensor_mut::<f32>(&mut out_value, 0)?;
    let (n, isa) = (x.len(), Isa::detect());
    let shared = SharedOut(out.as_mut_ptr(), n);
    let task = |i: usize| {
        // SAFETY: ONNX Runtime calls each block index once.
        let out = unsafe { shared.block_mut(i) };
        let range = i * BLOCK..i * BLOCK + out.len();
        match dy {
            Some(dy) => simd::gelu_tanh_grad(isa, &x[range.clone()], &dy[range], out),
            None => simd::gelu_tanh(isa, &x[range], out),
        }
    };
    let blocks = n.div_ceil(BLOCK);
    if blocks <= 1 {
        (0..blocks).for_each(task);
        return Ok(());
    }
    ctx.par_for(blocks, blocks, task).map_err(|e| format!("intra-op thread pool: {e}"))
}
