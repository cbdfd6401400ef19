//! The `com.flowstep` pointwise operators of fused float32 exports (issue 25), defined in
//! export/flowstep_export/model/pointwise_operators.py:
//!
//! - `GeluTanh(x) -> y`, `GeluTanhGrad(x, dy) -> dx`: tanh-GELU, any shape;
//! - `RmsNorm(x, weight) -> (y, rstd)` (attribute `epsilon`), `RmsNormGrad(x, weight, rstd,
//!   dy) -> dx`: RMSNorm over the last axis, rstd `[..., 1]`;
//! - `LayerNormGrad(x, mean, rstd, dy, weight) -> dx`: LayerNorm's input gradient over the last
//!   axis from the forward's (ONNX LayerNormalization's) mean and rstd `[..., 1]`;
//! - `Rope(x, cos, sin) -> y`: Wan's RoPE on interleaved pairs, x [B, S, C], cos and sin
//!   [S, 1, P] shared by the C / 2P heads (its gradient is itself with −sin).
//!
//! One pass over memory each, where the standard-op forms are chains of 6 to 13 nodes, each a
//! full pass. The per-element math is [`super::simd`]'s, in blocks over ONNX Runtime's intra-op
//! thread pool. float32 only: the exporter keeps these nodes only in float32 exports.

use ort::operator::{BoxedKernel, ComputeContext, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::{TensorElementType, ValueRef};

use super::fused_attention::{DOMAIN, expect_shape, input, output, tensor, tensor_mut};
use super::simd::{self, Isa};

pub const GELU: &str = "GeluTanh";
pub const GELU_GRAD: &str = "GeluTanhGrad";
pub const RMS_NORM: &str = "RmsNorm";
pub const RMS_NORM_GRAD: &str = "RmsNormGrad";
pub const LAYER_NORM_GRAD: &str = "LayerNormGrad";
pub const ROPE: &str = "Rope";
/// Every operator of this module (the manifest's `training.operators` may name them).
pub const OPERATORS: [&str; 6] = [GELU, GELU_GRAD, RMS_NORM, RMS_NORM_GRAD, LAYER_NORM_GRAD, ROPE];

/// Elements per task: 256 KiB of float32, large enough that a task outweighs its dispatch.
const BLOCK: usize = 1 << 16;

/// Which operator a kernel computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pointwise {
    Gelu,
    GeluGrad,
    RmsNorm,
    RmsNormGrad,
    LayerNormGrad,
    Rope,
}

impl Pointwise {
    pub(super) const ALL: [Pointwise; 6] =
        [Pointwise::Gelu, Pointwise::GeluGrad, Pointwise::RmsNorm, Pointwise::RmsNormGrad, Pointwise::LayerNormGrad, Pointwise::Rope];

    fn arity(self) -> (usize, usize) {
        match self {
            Pointwise::Gelu => (1, 1),
            Pointwise::GeluGrad => (2, 1),
            Pointwise::RmsNorm => (2, 2),
            Pointwise::RmsNormGrad => (4, 1),
            Pointwise::LayerNormGrad => (5, 1),
            Pointwise::Rope => (3, 1),
        }
    }
}

impl Operator for Pointwise {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        match self {
            Pointwise::Gelu => GELU,
            Pointwise::GeluGrad => GELU_GRAD,
            Pointwise::RmsNorm => RMS_NORM,
            Pointwise::RmsNormGrad => RMS_NORM_GRAD,
            Pointwise::LayerNormGrad => LAYER_NORM_GRAD,
            Pointwise::Rope => ROPE,
        }
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        (0..self.arity().0).map(|_| OperatorInput::required(TensorElementType::Float32))
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        (0..self.arity().1).map(|_| OperatorOutput::required(TensorElementType::Float32))
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let (op, name, node) = (*self, self.name().to_string(), kctx.node_name().unwrap_or_default());
        let epsilon = match op {
            Pointwise::RmsNorm => kctx
                .get::<f32>("epsilon")
                .ok_or_else(|| ort::Error::new(format!("{DOMAIN}::{name} node `{node}` has no float attribute `epsilon`")))?,
            _ => 0.0,
        };
        Ok(Box::new(move |ctx: &ComputeContext| {
            let result = match op {
                Pointwise::Gelu | Pointwise::GeluGrad => run_gelu(ctx, op == Pointwise::GeluGrad),
                Pointwise::RmsNorm => run_rms_norm(ctx, epsilon),
                Pointwise::RmsNormGrad => run_rms_norm_grad(ctx),
                Pointwise::LayerNormGrad => run_layer_norm_grad(ctx),
                Pointwise::Rope => run_rope(ctx),
            };
            result.map_err(|e| ort::Error::new(format!("{DOMAIN}::{name} node `{node}` on cpu: {e}")))
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
    fn new(out: &mut [f32]) -> Self {
        SharedOut(out.as_mut_ptr(), out.len())
    }

    /// Elements `range` of the buffer.
    ///
    /// # Safety
    /// No two live borrows may overlap.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, range: std::ops::Range<usize>) -> &mut [f32] {
        assert!(range.start <= range.end && range.end <= self.1, "block out of bounds");
        // SAFETY: in bounds (checked); disjoint per the caller.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(range.start), range.len()) }
    }
}

/// Runs `task(first..last)` over `units` units in blocks of `per_task`, on the pool when there
/// is more than one block.
fn par_blocks(ctx: &ComputeContext, units: usize, per_task: usize, task: impl Fn(std::ops::Range<usize>) + Sync + Send) -> std::result::Result<(), String> {
    let blocks = units.div_ceil(per_task);
    let run = |i: usize| task(i * per_task..((i + 1) * per_task).min(units));
    if blocks <= 1 {
        (0..blocks).for_each(run);
        return Ok(());
    }
    ctx.par_for(blocks, blocks, run).map_err(|e| format!("intra-op thread pool: {e}"))
}

fn run_gelu(ctx: &ComputeContext, backward: bool) -> std::result::Result<(), String> {
    let x_value = input(ctx, 0, "x")?;
    let (shape, x) = tensor::<f32>(&x_value, "x")?;
    let dy_value = if backward { Some(input(ctx, 1, "dy")?) } else { None };
    let dy = match &dy_value {
        Some(value) => {
            let (dy_shape, dy) = tensor::<f32>(value, "dy")?;
            expect_shape("dy", &dy_shape, &shape)?;
            Some(dy)
        }
        None => None,
    };
    let mut out_value = output(ctx, 0, shape)?;
    let out = SharedOut::new(tensor_mut::<f32>(&mut out_value, 0)?);
    let isa = Isa::detect();
    par_blocks(ctx, x.len(), BLOCK, |range| {
        // SAFETY: blocks are disjoint.
        let out = unsafe { out.slice_mut(range.clone()) };
        match dy {
            Some(dy) => simd::gelu_tanh_grad(isa, &x[range.clone()], &dy[range], out),
            None => simd::gelu_tanh(isa, &x[range], out),
        }
    })
}

/// x's rows (last axis) and the weight, checked: x [..., D], weight [D].
fn rows_of<'a>(x: &ValueRef<'_>, weight: &'a ValueRef<'_>) -> std::result::Result<(Vec<i64>, usize, &'a [f32]), String> {
    let (shape, _) = tensor::<f32>(x, "x")?;
    let (w_shape, w) = tensor::<f32>(weight, "weight")?;
    let d = shape.last().copied().unwrap_or(0);
    if shape.is_empty() || d <= 0 || w_shape != [d] {
        return Err(format!("x {shape:?}, weight {w_shape:?}: expected x [..., D] and weight [D] with D > 0"));
    }
    Ok((shape, d as usize, w))
}

/// The shape of a per-row statistic of x: x's with the last axis 1.
fn row_stat_shape(shape: &[i64]) -> Vec<i64> {
    let mut s = shape.to_vec();
    if let Some(last) = s.last_mut() {
        *last = 1;
    }
    s
}

fn run_rms_norm(ctx: &ComputeContext, epsilon: f32) -> std::result::Result<(), String> {
    let (x_value, w_value) = (input(ctx, 0, "x")?, input(ctx, 1, "weight")?);
    let (shape, d, w) = rows_of(&x_value, &w_value)?;
    let (_, x) = tensor::<f32>(&x_value, "x")?;
    let (mut y_value, mut rstd_value) = (output(ctx, 0, shape.clone())?, output(ctx, 1, row_stat_shape(&shape))?);
    let (y, rstd) = (SharedOut::new(tensor_mut::<f32>(&mut y_value, 0)?), SharedOut::new(tensor_mut::<f32>(&mut rstd_value, 1)?));
    let isa = Isa::detect();
    par_blocks(ctx, x.len() / d, (BLOCK / d).max(1), |rows| {
        // SAFETY: row blocks are disjoint.
        let (y, rstd) = unsafe { (y.slice_mut(rows.start * d..rows.end * d), rstd.slice_mut(rows.clone())) };
        let x = &x[rows.start * d..rows.end * d];
        for ((x, y), rstd) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(rstd) {
            *rstd = simd::rms_norm_row(isa, x, w, epsilon, y);
        }
    })
}

fn run_rms_norm_grad(ctx: &ComputeContext) -> std::result::Result<(), String> {
    let (x, w, dy) = (input(ctx, 0, "x")?, input(ctx, 1, "weight")?, input(ctx, 3, "dy")?);
    let rstd = input(ctx, 2, "rstd")?;
    run_norm_grad(ctx, &x, &w, &dy, [("rstd", &rstd)], |isa, x, w, [r], dy, dx| simd::rms_norm_grad_row(isa, x, w, r, dy, dx))
}

fn run_layer_norm_grad(ctx: &ComputeContext) -> std::result::Result<(), String> {
    let (x, w, dy) = (input(ctx, 0, "x")?, input(ctx, 4, "weight")?, input(ctx, 3, "dy")?);
    let (mean, rstd) = (input(ctx, 1, "mean")?, input(ctx, 2, "rstd")?);
    run_norm_grad(ctx, &x, &w, &dy, [("mean", &mean), ("rstd", &rstd)], |isa, x, w, [mu, r], dy, dx| {
        simd::layer_norm_grad_row(isa, x, w, mu, r, dy, dx)
    })
}

/// A norm's input gradient row by row: x [..., D], dy like x, weight [D], and N statistics of
/// the forward, each [..., 1]; `row(isa, x, w, stats, dy, dx)` computes one row.
fn run_norm_grad<const N: usize>(
    ctx: &ComputeContext,
    x_value: &ValueRef<'_>,
    w_value: &ValueRef<'_>,
    dy_value: &ValueRef<'_>,
    stats: [(&str, &ValueRef<'_>); N],
    row: impl Fn(Isa, &[f32], &[f32], [f32; N], &[f32], &mut [f32]) + Sync + Send,
) -> std::result::Result<(), String> {
    let (shape, d, w) = rows_of(x_value, w_value)?;
    let ((_, x), (dy_shape, dy)) = (tensor::<f32>(x_value, "x")?, tensor::<f32>(dy_value, "dy")?);
    expect_shape("dy", &dy_shape, &shape)?;
    let mut stat_data = [&[][..]; N];
    for ((name, value), data) in stats.iter().zip(&mut stat_data) {
        let (stat_shape, values) = tensor::<f32>(value, name)?;
        expect_shape(name, &stat_shape, &row_stat_shape(&shape))?;
        *data = values;
    }
    let mut dx_value = output(ctx, 0, shape)?;
    let dx = SharedOut::new(tensor_mut::<f32>(&mut dx_value, 0)?);
    let isa = Isa::detect();
    par_blocks(ctx, x.len() / d, (BLOCK / d).max(1), |rows| {
        // SAFETY: row blocks are disjoint.
        let dx = unsafe { dx.slice_mut(rows.start * d..rows.end * d) };
        let (x, dy) = (&x[rows.start * d..rows.end * d], &dy[rows.start * d..rows.end * d]);
        for (i, ((x, dy), dx)) in rows.zip(x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d))) {
            row(isa, x, w, stat_data.map(|s| s[i]), dy, dx);
        }
    })
}

fn run_rope(ctx: &ComputeContext) -> std::result::Result<(), String> {
    let (x_value, cos_value, sin_value) = (input(ctx, 0, "x")?, input(ctx, 1, "cos")?, input(ctx, 2, "sin")?);
    let ((shape, x), (cos_shape, cos), (sin_shape, sin)) =
        (tensor::<f32>(&x_value, "x")?, tensor::<f32>(&cos_value, "cos")?, tensor::<f32>(&sin_value, "sin")?);
    let (tokens, pairs) = match (shape.as_slice(), cos_shape.as_slice()) {
        (&[_, s, c], &[cs, 1, p]) if cs == s && p > 0 && c % (2 * p) == 0 && sin_shape == cos_shape => (s as usize, p as usize),
        _ => return Err(format!("x {shape:?}, cos {cos_shape:?}, sin {sin_shape:?}: expected x [B, S, C], cos and sin [S, 1, P], C a multiple of 2P")),
    };
    let row = shape[2] as usize;
    let mut y_value = output(ctx, 0, shape)?;
    let y = SharedOut::new(tensor_mut::<f32>(&mut y_value, 0)?);
    par_blocks(ctx, x.len() / row.max(1), (BLOCK / row.max(1)).max(1), |rows| {
        // SAFETY: row blocks are disjoint.
        let y = unsafe { y.slice_mut(rows.start * row..rows.end * row) };
        for (i, (x, y)) in rows.clone().zip(x[rows.start * row..rows.end * row].chunks_exact(row).zip(y.chunks_exact_mut(row))) {
            let token = i % tokens;
            let (cos, sin) = (&cos[token * pairs..(token + 1) * pairs], &sin[token * pairs..(token + 1) * pairs]);
            for (x, y) in x.chunks_exact(2 * pairs).zip(y.chunks_exact_mut(2 * pairs)) {
                for (((x, y), c), s) in x.chunks_exact(2).zip(y.chunks_exact_mut(2)).zip(cos).zip(sin) {
                    y[0] = x[0] * c - x[1] * s;
                    y[1] = x[0] * s + x[1] * c;
                }
            }
        }
    })
}
