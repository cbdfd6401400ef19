//! The CPU kernels of the fused attention pair: blocked FlashAttention (FlashAttention-2's
//! algorithm). The forward keeps a running max and sum per query row over blocks of keys
//! (online softmax); the backward recomputes each block's probabilities from the saved
//! log-sum-exp. Nothing of size [H, Sq, Sk] exists: the largest temporaries are one
//! [query block, key block] tile per task. f32 inputs are read in place, bf16 ones widened to
//! f32 one block at a time;
//! every product runs on the `gemm` crate (runtime-dispatched AVX-512 / AVX2+FMA kernels),
//! the per-element row work (max, exp, dot) on [`simd`], vectorised for the same instruction sets.
//!
//! Parallelism ([`Parallel`]: ONNX Runtime's intra-op thread pool in the operators): the
//! forward over (batch, head, query block); the backward over (batch, head, group of key
//! blocks), each task accumulating its own dk/dv rows and a dq partial over all queries
//! (summed afterwards when a head has several groups).

use std::sync::{Mutex, OnceLock, PoisonError};

use super::{Dims, Element};

use crate::runtime::simd::{self, Isa};

/// Query rows per tile (256 rather than 64: gemm packs each key block once per query tile,
/// so larger query tiles pack less; measured 15% faster forward at 4,096 tokens).
const QUERY_BLOCK: usize = 256;
/// Key rows per tile.
const KEY_BLOCK: usize = 256;

/// A strided f32 matrix view: element (i, j) at `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// The first `rows * cols` values of `data`, row-major.
    fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix view out of bounds");
        Mat { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// `rows` rows of `cols` values, `row_stride` apart, from the start of `data`.
    fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(rows == 0 || data.len() >= (rows - 1) * row_stride + cols, "matrix view out of bounds");
        Mat { data, rows, cols, row_stride, col_stride: 1 }
    }

    /// Row i of a view with unit column stride.
    fn row(&self, i: usize) -> &'a [f32] {
        debug_assert!(self.col_stride == 1 && i < self.rows);
        &self.data[i * self.row_stride..i * self.row_stride + self.cols]
    }

    fn t(self) -> Self {
        Mat { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }
}

/// `dst` ([a.rows, b.cols], row-major) = beta·a·b, or += beta·a·b when `accumulate`.
fn matmul(dst: &mut [f32], a: Mat, b: Mat, beta: f32, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k && dst.len() == m * n, "matmul shapes");
    // SAFETY: `Mat::new` checked that each operand's strided extent lies in its slice, dst is
    // exactly m x n row-major, and a `&mut` dst cannot alias the shared a and b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Rows `first..first + rows` of head `h` in batch `b` of a [B, seq, H, D] tensor as an f32
/// [rows, D] matrix: a strided view of `x` itself when it is f32 (gemm packs its operands
/// anyway, so a copy would only add a pass over memory), else widened into `scratch` (grown
/// on first use).
#[allow(clippy::too_many_arguments)] // the tensor, its geometry, the block and the scratch
fn head_rows<'a, T: Element>(x: &'a [T], dims: Dims, seq: usize, b: usize, h: usize, first: usize, rows: usize, scratch: &'a mut Vec<f32>) -> Mat<'a> {
    let (d, row_stride) = (dims.d, dims.h * dims.d);
    let start = ((b * seq + first) * dims.h + h) * d;
    if let Some(x) = T::as_f32(x) {
        return Mat::strided(&x[start..], rows, d, row_stride);
    }
    if scratch.len() < rows * d {
        scratch.resize(rows * d, 0.0);
    }
    let scratch = &mut scratch[..rows * d];
    for (i, out) in scratch.chunks_exact_mut(d).enumerate() {
        for (o, v) in out.iter_mut().zip(&x[start + i * row_stride..start + i * row_stride + d]) {
            *o = v.widen();
        }
    }
    Mat::new(scratch, rows, d)
}

/// `(first, len)` of each block of `size` over `0..total`.
fn blocks(total: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..total).step_by(size).map(move |first| (first, size.min(total - first)))
}

/// Runs the kernels' independent tasks on threads. The operators use ONNX Runtime's intra-op
/// pool: a second pool (rayon) beside it competed for the same cores with its spinning
/// threads, and a tiny-model attention call that computes in 0.3 ms waited up to 37 ms.
pub(super) trait Parallel {
    /// How many threads run the tasks (the backward splits keys to give each work).
    fn threads(&self) -> usize;
    /// f(i) once for every i in 0..n, returning when all have run.
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync + Send)) -> Result<(), String>;
}

/// f(i) for every i in 0..n on `pool`, in order of i.
fn run_tasks<R: Send + Sync>(pool: &dyn Parallel, n: usize, f: impl Fn(usize) -> R + Sync + Send) -> Result<Vec<R>, String> {
    let slots: Vec<OnceLock<R>> = (0..n).map(|_| OnceLock::new()).collect();
    pool.run(n, &|i| {
        let _ = slots[i].set(f(i));
    })?;
    let results = slots.into_iter().map(OnceLock::into_inner);
    results.enumerate().map(|(i, r)| r.ok_or_else(|| format!("parallel task {i} of {n} did not run"))).collect()
}

/// Rows handed to one task by [`for_each_row`].
const ROWS_PER_TASK: usize = 64;

/// f(row index, row) for every `row_len`-element row of `out`, on `pool`.
fn for_each_row<T: Send>(pool: &dyn Parallel, out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) -> Result<(), String> {
    // Each piece is locked once, by the one task that writes it.
    let pieces: Vec<Mutex<&mut [T]>> = out.chunks_mut(row_len.max(1) * ROWS_PER_TASK).map(Mutex::new).collect();
    pool.run(pieces.len(), &|i| {
        let mut piece = pieces[i].lock().unwrap_or_else(PoisonError::into_inner);
        for (j, row) in piece.chunks_exact_mut(row_len.max(1)).enumerate() {
            f(i * ROWS_PER_TASK + j, row);
        }
    })
}

/// o = softmax(scale·q·kᵀ)·v into `o` ([B, Sq, H, D]) and lse = log Σ exp(scale·q·kᵀ) into
/// `lse` ([B, H, Sq]).
#[allow(clippy::too_many_arguments)] // the operator's inputs, geometry, attribute, outputs and threads
pub(super) fn forward<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    dims: Dims,
    scale: f32,
    o: &mut [T],
    lse: &mut [f32],
    pool: &dyn Parallel,
) -> Result<(), String> {
    let query_blocks = dims.sq.div_ceil(QUERY_BLOCK);
    let tiles = run_tasks(pool, dims.b * dims.h * query_blocks, |task| {
        let (head, block) = (task / query_blocks, task % query_blocks);
        let first = block * QUERY_BLOCK;
        forward_tile(q, k, v, dims, scale, head / dims.h, head % dims.h, first, QUERY_BLOCK.min(dims.sq - first))
    })?;
    // Tile (b, h, block) holds rows block·QUERY_BLOCK.. of head h of batch b.
    let tile_of = |b: usize, h: usize, s: usize| &tiles[(b * dims.h + h) * query_blocks + s / QUERY_BLOCK];
    for_each_row(pool, o, dims.h * dims.d, |row, out| {
        let (b, s) = (row / dims.sq, row % dims.sq);
        for (h, out) in out.chunks_exact_mut(dims.d).enumerate() {
            let tile = &tile_of(b, h, s).0[(s % QUERY_BLOCK) * dims.d..];
            for (o, x) in out.iter_mut().zip(tile) {
                *o = T::narrow(*x);
            }
        }
    })?;
    for_each_row(pool, lse, dims.sq, |head, out| {
        let rows = tiles[head * query_blocks..(head + 1) * query_blocks].iter().flat_map(|t| &t.1);
        for (o, x) in out.iter_mut().zip(rows) {
            *o = *x;
        }
    })
}

/// One query block's output rows ([m, D]) and log-sum-exps ([m]).
#[allow(clippy::too_many_arguments)] // the inputs, their geometry and the tile's place
fn forward_tile<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    dims: Dims,
    scale: f32,
    b: usize,
    h: usize,
    first: usize,
    m: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (d, isa) = (dims.d, Isa::detect());
    let (mut q_scratch, mut k_scratch, mut v_scratch) = (Vec::new(), Vec::new(), Vec::new());
    let qb = head_rows(q, dims, dims.sq, b, h, first, m, &mut q_scratch);
    let mut scores = vec![0.0f32; m * KEY_BLOCK];
    let mut o = vec![0.0f32; m * d];
    let (mut max, mut sum) = (vec![f32::NEG_INFINITY; m], vec![0.0f32; m]);
    for (k0, n) in blocks(dims.sk, KEY_BLOCK) {
        let scores = &mut scores[..m * n];
        let kb = head_rows(k, dims, dims.sk, b, h, k0, n, &mut k_scratch);
        let vb = head_rows(v, dims, dims.sk, b, h, k0, n, &mut v_scratch);
        matmul(scores, qb, kb.t(), scale, false);
        for (i, (row, out)) in scores.chunks_exact_mut(n).zip(o.chunks_exact_mut(d)).enumerate() {
            let new_max = max[i].max(simd::max(isa, row));
            // Earlier blocks' terms were scaled by exp(-max); rescale them to the new max.
            let correction = (max[i] - new_max).exp();
            sum[i] = sum[i] * correction + simd::exp_shifted(isa, row, new_max);
            if correction != 1.0 {
                out.iter_mut().for_each(|x| *x *= correction);
            }
            max[i] = new_max;
        }
        matmul(&mut o, Mat::new(scores, m, n), vb, 1.0, true);
    }
    for (i, out) in o.chunks_exact_mut(d).enumerate() {
        out.iter_mut().for_each(|x| *x /= sum[i]);
        max[i] += sum[i].ln();
    }
    (o, max)
}

/// The gradients of Σ o∘do: dq into `dq` ([B, Sq, H, D]), dk and dv into `dk`, `dv`
/// ([B, Sk, H, D]), from the forward's o and lse.
#[allow(clippy::too_many_arguments)] // the operator's six inputs, its geometry, attribute, three outputs and threads
pub(super) fn backward<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[f32],
    d_o: &[T],
    dims: Dims,
    scale: f32,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    pool: &dyn Parallel,
) -> Result<(), String> {
    let key_blocks = dims.sk.div_ceil(KEY_BLOCK);
    // Enough groups per head to give every thread work; each costs a dq partial [Sq, D].
    let groups = pool.threads().div_ceil(dims.b * dims.h).clamp(1, key_blocks.max(1));
    let group_keys = |g: usize| (g * key_blocks / groups * KEY_BLOCK)..((g + 1) * key_blocks / groups * KEY_BLOCK).min(dims.sk);
    let group_of_block: Vec<usize> = (0..groups).flat_map(|g| std::iter::repeat_n(g, group_keys(g).len().div_ceil(KEY_BLOCK))).collect();
    let inputs = BackwardInputs { q, k, v, o, lse, d_o, dims, scale };
    let tiles = run_tasks(pool, dims.b * dims.h * groups, |task| {
        let (head, g) = (task / groups, task % groups);
        inputs.key_group(head / dims.h, head % dims.h, group_keys(g))
    })?;
    for_each_row(pool, dq, dims.h * dims.d, |row, out| {
        let (b, s) = (row / dims.sq, row % dims.sq);
        for (h, out) in out.chunks_exact_mut(dims.d).enumerate() {
            let head_tiles = &tiles[(b * dims.h + h) * groups..(b * dims.h + h + 1) * groups];
            for (j, o) in out.iter_mut().enumerate() {
                *o = T::narrow(head_tiles.iter().map(|t| t.dq[s * dims.d + j]).sum());
            }
        }
    })?;
    for (out, pick) in [(dk, 0), (dv, 1)] {
        for_each_row(pool, out, dims.h * dims.d, |row, out| {
            let (b, s) = (row / dims.sk, row % dims.sk);
            let g = group_of_block[s / KEY_BLOCK];
            for (h, out) in out.chunks_exact_mut(dims.d).enumerate() {
                let tile = &tiles[(b * dims.h + h) * groups + g];
                let rows = if pick == 0 { &tile.dk } else { &tile.dv };
                let start = (s - group_keys(g).start) * dims.d;
                for (o, x) in out.iter_mut().zip(&rows[start..start + dims.d]) {
                    *o = T::narrow(*x);
                }
            }
        })?;
    }
    Ok(())
}

struct BackwardInputs<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    o: &'a [T],
    lse: &'a [f32],
    d_o: &'a [T],
    dims: Dims,
    scale: f32,
}

/// One task's results: dk and dv rows of its keys ([keys, D]), its part of dq ([Sq, D]).
struct BackwardTile {
    dk: Vec<f32>,
    dv: Vec<f32>,
    dq: Vec<f32>,
}

impl<T: Element> BackwardInputs<'_, T> {
    /// dv += pᵀ·do, ds = p∘(do·vᵀ - rowsum(do∘o)), dq += scale·ds·k, dk += scale·dsᵀ·q, with
    /// p = exp(scale·q·kᵀ - lse) recomputed per tile, for the keys `keys` of head h in batch b.
    fn key_group(&self, b: usize, h: usize, keys: std::ops::Range<usize>) -> BackwardTile {
        let (dims, d, isa) = (self.dims, self.dims.d, Isa::detect());
        let lse = &self.lse[(b * dims.h + h) * dims.sq..(b * dims.h + h + 1) * dims.sq];
        // rowsum(do∘o), per query row.
        let (mut q_scratch, mut k_scratch, mut v_scratch, mut o_scratch, mut do_scratch) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut delta = vec![0.0f32; dims.sq];
        for (q0, m) in blocks(dims.sq, QUERY_BLOCK) {
            let ob = head_rows(self.o, dims, dims.sq, b, h, q0, m, &mut o_scratch);
            let dob = head_rows(self.d_o, dims, dims.sq, b, h, q0, m, &mut do_scratch);
            for (i, delta) in delta[q0..q0 + m].iter_mut().enumerate() {
                *delta = simd::dot(isa, ob.row(i), dob.row(i));
            }
        }
        let mut tile = BackwardTile { dk: vec![0.0; keys.len() * d], dv: vec![0.0; keys.len() * d], dq: vec![0.0; dims.sq * d] };
        let (mut p, mut ds) = (vec![0.0f32; QUERY_BLOCK * KEY_BLOCK], vec![0.0f32; QUERY_BLOCK * KEY_BLOCK]);
        for (k0, n) in blocks(keys.len(), KEY_BLOCK) {
            let kb = head_rows(self.k, dims, dims.sk, b, h, keys.start + k0, n, &mut k_scratch);
            let vb = head_rows(self.v, dims, dims.sk, b, h, keys.start + k0, n, &mut v_scratch);
            let dk = &mut tile.dk[k0 * d..(k0 + n) * d];
            let dv = &mut tile.dv[k0 * d..(k0 + n) * d];
            for (q0, m) in blocks(dims.sq, QUERY_BLOCK) {
                let (p, ds) = (&mut p[..m * n], &mut ds[..m * n]);
                let qb = head_rows(self.q, dims, dims.sq, b, h, q0, m, &mut q_scratch);
                let dob = head_rows(self.d_o, dims, dims.sq, b, h, q0, m, &mut do_scratch);
                matmul(p, qb, kb.t(), self.scale, false);
                matmul(ds, dob, vb.t(), 1.0, false);
                for (i, (p, ds)) in p.chunks_exact_mut(n).zip(ds.chunks_exact_mut(n)).enumerate() {
                    simd::softmax_grad(isa, p, ds, lse[q0 + i], delta[q0 + i]);
                }
                matmul(dv, Mat::new(p, m, n).t(), dob, 1.0, true);
                matmul(&mut tile.dq[q0 * d..(q0 + m) * d], Mat::new(ds, m, n), kb, self.scale, true);
                matmul(dk, Mat::new(ds, m, n).t(), qb, self.scale, true);
            }
        }
        tile
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;
    use rayon::prelude::*;

    use super::*;
    use crate::runtime::simd::tests::values;

    /// The current rayon pool (the one a test `install`s).
    struct Rayon;

    impl Parallel for Rayon {
        fn threads(&self) -> usize {
            rayon::current_num_threads()
        }

        fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync + Send)) -> Result<(), String> {
            (0..n).into_par_iter().for_each(f);
            Ok(())
        }
    }

    /// Plain softmax attention in f64 (every score of a row at once) and the gradient of
    /// Σ o∘w by the textbook formulas: the independent check of the blocked kernels.
    struct Reference {
        o: Vec<f64>,
        lse: Vec<f64>,
        dq: Vec<f64>,
        dk: Vec<f64>,
        dv: Vec<f64>,
    }

    fn reference(q: &[f32], k: &[f32], v: &[f32], w: &[f32], dims: Dims, scale: f64) -> Reference {
        let Dims { b: nb, sq, sk, h: nh, d } = dims;
        let at = |seq: usize, b: usize, s: usize, h: usize| ((b * seq + s) * nh + h) * d;
        let dot = |x: &[f32], i: usize, y: &[f32], j: usize| (0..d).map(|c| x[i + c] as f64 * y[j + c] as f64).sum::<f64>();
        let mut r = Reference {
            o: vec![0.0; q.len()],
            lse: vec![0.0; nb * nh * sq],
            dq: vec![0.0; q.len()],
            dk: vec![0.0; k.len()],
            dv: vec![0.0; v.len()],
        };
        for b in 0..nb {
            for h in 0..nh {
                for i in 0..sq {
                    let qi = at(sq, b, i, h);
                    let s: Vec<f64> = (0..sk).map(|j| scale * dot(q, qi, k, at(sk, b, j, h))).collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - max).exp()).sum();
                    r.lse[(b * nh + h) * sq + i] = max + z.ln();
                    let p: Vec<f64> = s.iter().map(|x| (x - max).exp() / z).collect();
                    let dp: Vec<f64> = (0..sk).map(|j| dot(w, qi, v, at(sk, b, j, h))).collect();
                    let delta: f64 = p.iter().zip(&dp).map(|(a, c)| a * c).sum();
                    for j in 0..sk {
                        let (kj, ds) = (at(sk, b, j, h), scale * p[j] * (dp[j] - delta));
                        for c in 0..d {
                            r.o[qi + c] += p[j] * v[kj + c] as f64;
                            r.dv[kj + c] += p[j] * w[qi + c] as f64;
                            r.dq[qi + c] += ds * k[kj + c] as f64;
                            r.dk[kj + c] += ds * q[qi + c] as f64;
                        }
                    }
                }
            }
        }
        r
    }

    /// max |got - want| / max |want|.
    fn rel_err(got: &[f32], want: &[f64]) -> f64 {
        let err = got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
        err / want.iter().map(|w| w.abs()).fold(0.0, f64::max)
    }

    /// The f64 reference's gradient against central differences of its own loss.
    #[test]
    fn reference_gradient_matches_central_differences() {
        let dims = Dims { b: 2, sq: 5, sk: 7, h: 3, d: 4 };
        let (nq, nk) = (dims.b * dims.sq * dims.h * dims.d, dims.b * dims.sk * dims.h * dims.d);
        let (q, k, v, w) = (values(nq, 1, 1.0), values(nk, 2, 1.0), values(nk, 3, 1.0), values(nq, 4, 1.0));
        let loss = |q: &[f32], k: &[f32], v: &[f32]| reference(q, k, v, &w, dims, 0.7).o.iter().zip(&w).map(|(o, w)| o * *w as f64).sum::<f64>();
        let r = reference(&q, &k, &v, &w, dims, 0.7);
        let eps = 1e-2f32;
        for (which, grad) in [(0, &r.dq), (1, &r.dk), (2, &r.dv)] {
            for idx in (0..grad.len()).step_by(5) {
                let mut inputs = [q.clone(), k.clone(), v.clone()];
                inputs[which][idx] += eps;
                let plus = loss(&inputs[0], &inputs[1], &inputs[2]);
                inputs[which][idx] -= 2.0 * eps;
                let minus = loss(&inputs[0], &inputs[1], &inputs[2]);
                let numeric = (plus - minus) / (2.0 * eps as f64);
                assert!((grad[idx] - numeric).abs() < 2e-4, "input {which}[{idx}]: {} vs {numeric}", grad[idx]);
            }
        }
    }

    /// (label, dims, scale, input amplitude, rayon threads).
    const CASES: [(&str, Dims, f32, f32, usize); 5] = [
        ("tiny", Dims { b: 2, sq: 5, sk: 7, h: 3, d: 4 }, 0.7, 1.0, 2),
        // Partial query and key tiles (600 = 2·256 + 88 of each), large scores: the
        // running max moves between key tiles, so a missing rescale shows.
        ("partial tiles", Dims { b: 1, sq: 600, sk: 600, h: 2, d: 16 }, 1.0, 3.0, 2),
        // 8 threads over 2 heads: three key groups per head, summed dq partials.
        ("key groups", Dims { b: 1, sq: 600, sk: 600, h: 2, d: 16 }, 1.0, 3.0, 8),
        // Wan's head dim and scale, self-attention over whole tiles, two batches.
        ("head dim 128", Dims { b: 2, sq: 128, sk: 128, h: 1, d: 128 }, 0.088_388_35, 2.0, 2),
        // Cross-attention: 512 text keys.
        ("cross", Dims { b: 1, sq: 70, sk: 512, h: 2, d: 128 }, 0.088_388_35, 2.0, 2),
    ];

    fn run<T: Element>(q: &[f32], k: &[f32], v: &[f32], w: &[f32], dims: Dims, scale: f32) -> [Vec<f32>; 5] {
        let cast = |x: &[f32]| x.iter().map(|v| T::narrow(*v)).collect::<Vec<T>>();
        let widen = |x: &[T]| x.iter().map(|v| v.widen()).collect::<Vec<f32>>();
        let (q, k, v, w) = (cast(q), cast(k), cast(v), cast(w));
        let (mut o, mut lse) = (vec![T::narrow(0.0); q.len()], vec![0.0f32; dims.b * dims.h * dims.sq]);
        forward(&q, &k, &v, dims, scale, &mut o, &mut lse, &Rayon).unwrap_or_else(|e| panic!("{e}"));
        let (mut dq, mut dk, mut dv) = (o.clone(), k.clone(), v.clone());
        backward(&q, &k, &v, &o, &lse, &w, dims, scale, &mut dq, &mut dk, &mut dv, &Rayon).unwrap_or_else(|e| panic!("{e}"));
        [widen(&o), lse, widen(&dq), widen(&dk), widen(&dv)]
    }

    /// The float32 kernels against the f64 reference. Measured: at most 2.6e-6 of each output's
    /// largest value (the partial-tiles cases, whose scores reach ~±50: their float32 rounding
    /// alone moves p by ~3e-6), 1e-6 at Wan's scale, lse 1.2e-7. The bound is 10x that; a
    /// wrong tile (missing rescale, off-by-one tail, unsummed dq partial) is off by >1e-2.
    #[test]
    fn blocked_kernels_match_the_f64_reference() {
        for (label, dims, scale, amplitude, threads) in CASES {
            let (nq, nk) = (dims.b * dims.sq * dims.h * dims.d, dims.b * dims.sk * dims.h * dims.d);
            let (q, k, v, w) = (values(nq, 1, amplitude), values(nk, 2, amplitude), values(nk, 3, 1.0), values(nq, 4, 1.0));
            let want = reference(&q, &k, &v, &w, dims, scale as f64);
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap_or_else(|e| panic!("{e}"));
            let got = pool.install(|| run::<f32>(&q, &k, &v, &w, dims, scale));
            for (name, got, want) in [("o", &got[0], &want.o), ("lse", &got[1], &want.lse), ("dq", &got[2], &want.dq), ("dk", &got[3], &want.dk), ("dv", &got[4], &want.dv)] {
                let err = rel_err(got, want);
                println!("{label}: {name} rel {err:.1e}");
                assert!(err < 2e-5, "{label}: {name} differs from the f64 reference by {err:.2e} of its largest value");
            }
        }
    }

    /// bf16 inputs are widened exactly and run the float32 math: outputs are the float32
    /// kernels' on the same values, rounded once to bf16.
    #[test]
    fn bf16_kernels_are_the_f32_kernels_rounded() {
        let (_, dims, scale, amplitude, _) = CASES[1];
        let (nq, nk) = (dims.b * dims.sq * dims.h * dims.d, dims.b * dims.sk * dims.h * dims.d);
        let round = |x: Vec<f32>| x.into_iter().map(|v| bf16::from_f32(v).to_f32()).collect::<Vec<_>>();
        let (q, k, v) = (round(values(nq, 1, amplitude)), round(values(nk, 2, amplitude)), round(values(nk, 3, 1.0)));
        let w = round(values(nq, 4, 1.0));
        let wide = run::<f32>(&q, &k, &v, &w, dims, scale);
        let narrow = run::<bf16>(&q, &k, &v, &w, dims, scale);
        assert_eq!(narrow[0], round(wide[0].clone()), "o");
        assert_eq!(narrow[1], wide[1], "lse");
        // The backward reads the rounded o; the f32 run above read it unrounded.
        let (mut dq, mut dk, mut dv) = (vec![0.0f32; nq], vec![0.0f32; nk], vec![0.0f32; nk]);
        backward(&q, &k, &v, &narrow[0], &narrow[1], &w, dims, scale, &mut dq, &mut dk, &mut dv, &Rayon).unwrap_or_else(|e| panic!("{e}"));
        for (name, got, want) in [("dq", &narrow[2], dq), ("dk", &narrow[3], dk), ("dv", &narrow[4], dv)] {
            assert_eq!(*got, round(want), "{name}");
        }
    }

    /// Kernel timing, not a test: `cargo test --release --lib kernel_timing -- --ignored
    /// --nocapture` prints, at `small`'s attention shapes, wall ms per call on 2 rayon threads
    /// and on 1 (best and median of 7 after one warm-up), GFLOP/s per core of the products from
    /// the best single-thread time, and the same for one tile's products alone (the ceiling).
    /// Wall time: run it on a quiet machine (per-thread CPU clocks tick in 4 ms on some VMs).
    #[test]
    #[ignore]
    fn kernel_timing() {
        let pools = [1, 2].map(|n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap_or_else(|e| panic!("{e}")));
        // (best, median) of 7 runs of `f` on `pool`, by `clock` (read on the pool's thread).
        let time = |pool: &rayon::ThreadPool, clock: fn() -> f64, f: &mut (dyn FnMut() + Send)| {
            pool.install(|| {
                f();
                let mut ms: Vec<f64> = (0..7)
                    .map(|_| {
                        let start = clock();
                        f();
                        clock() - start
                    })
                    .collect();
                ms.sort_by(f64::total_cmp);
                (ms[0], ms[3])
            })
        };
        fn wall_ms() -> f64 {
            static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
            EPOCH.get_or_init(std::time::Instant::now).elapsed().as_secs_f64() * 1e3
        }
        println!("| shape (2 heads, head dim 128) | pass | 2 threads: best / median wall ms | 1 thread: best / median wall ms | GFLOP/s per core |");
        println!("|---|---|---|---|---|");
        for (label, sq, sk) in [("self 1,280", 1280, 1280), ("cross 1,280 x 512", 1280, 512), ("self 4,096", 4096, 4096)] {
            let dims = Dims { b: 1, sq, sk, h: 2, d: 128 };
            let (nq, nk) = (sq * 2 * 128, sk * 2 * 128);
            let (q, k, v, w) = (values(nq, 1, 2.0), values(nk, 2, 2.0), values(nk, 3, 1.0), values(nq, 4, 1.0));
            let (mut o, mut lse) = (vec![0.0f32; nq], vec![0.0f32; 2 * sq]);
            let (mut dq, mut dk, mut dv) = (vec![0.0f32; nq], vec![0.0f32; nk], vec![0.0f32; nk]);
            let flops = (4 * sq * sk * 128 * 2) as f64; // two [Sq, Sk, D] products per head
            let mut fwd = || forward(&q, &k, &v, dims, 0.088_388_35, &mut o, &mut lse, &Rayon).unwrap_or_else(|e| panic!("{e}"));
            let (wall, cpu) = (time(&pools[1], wall_ms, &mut fwd), time(&pools[0], wall_ms, &mut fwd));
            println!("| {label} | forward | {:.1} / {:.1} | {:.1} / {:.1} | {:.0} |", wall.0, wall.1, cpu.0, cpu.1, flops / cpu.0 / 1e6);
            let (o, lse) = (o.clone(), lse.clone());
            let mut bwd = || backward(&q, &k, &v, &o, &lse, &w, dims, 0.088_388_35, &mut dq, &mut dk, &mut dv, &Rayon).unwrap_or_else(|e| panic!("{e}"));
            let (wall, cpu) = (time(&pools[1], wall_ms, &mut bwd), time(&pools[0], wall_ms, &mut bwd));
            println!("| {label} | backward | {:.1} / {:.1} | {:.1} / {:.1} | {:.0} |", wall.0, wall.1, cpu.0, cpu.1, 2.5 * flops / cpu.0 / 1e6);
        }
        // The products alone, at the tiles' shapes: the ceiling the kernels' GFLOP/s compare with.
        println!("\n| product (one tile, 100 times) | 1 thread: best / median wall ms | GFLOP/s |\n|---|---|---|");
        let (a, b) = (values(QUERY_BLOCK * KEY_BLOCK, 5, 1.0), values(KEY_BLOCK * 128, 6, 1.0));
        let mut c = vec![0.0f32; QUERY_BLOCK * KEY_BLOCK];
        for (label, m, n, k, transposed) in [("q·kᵀ [256,128]x[128,256]", QUERY_BLOCK, KEY_BLOCK, 128, true), ("p·v [256,256]x[256,128]", QUERY_BLOCK, 128, KEY_BLOCK, false)] {
            let mut product = || {
                for _ in 0..100 {
                    let rhs = if transposed { Mat::new(&b, n, k).t() } else { Mat::new(&b, k, n) };
                    matmul(&mut c[..m * n], Mat::new(&a, m, k), rhs, 1.0, true);
                }
            };
            let wall = time(&pools[0], wall_ms, &mut product);
            println!("| {label} | {:.1} / {:.1} | {:.0} |", wall.0, wall.1, (200 * m * n * k) as f64 / wall.0 / 1e6);
        }
    }
}
