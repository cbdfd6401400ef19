//! Per-element work of flowstep's CPU operators on the vector unit: the attention kernels' row
//! max, softmax exponentials (forward and backward) and dot products, and tanh-GELU forward
//! and backward. AVX-512 or AVX2 + FMA is chosen at run time ([`Isa::detect`]); every other
//! CPU runs the scalar path.
//!
//! exp(x) = 2^n · e^r with n = round(x·log2 e) and r = x - n·ln 2 (ln 2 in two parts), e^r by
//! Cephes' degree-6 polynomial; x is clamped to [-87, 88] (below, ~1e-38, which no softmax sum
//! notices). The same arithmetic in every path (the vector paths fuse its multiply-adds).
//! Measured against f64 exp over [-87, 88]: at most 1.2e-7 relative (1 ulp) in the vector
//! paths, 8.2e-8 in the scalar one.

/// The instruction set the row operations run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Scalar,
}

impl Isa {
    /// The widest this CPU has (std caches the CPUID answer, so this is cheap per tile).
    pub(crate) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Every path this CPU can run, widest first (the tests run each).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        let mut all = vec![Isa::detect()];
        #[cfg(target_arch = "x86_64")]
        if all[0] == Isa::Avx512 && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            all.push(Isa::Avx2);
        }
        if all[0] != Isa::Scalar {
            all.push(Isa::Scalar);
        }
        all
    }
}

// SAFETY (every `unsafe` call below): `Isa::detect` returned the path's instruction set only
// after the CPU reported its features.

/// The largest value of `x` (-inf when empty).
pub(crate) fn max(isa: Isa, x: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::max(x) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::max(x) },
        Isa::Scalar => x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)),
    }
}

/// x ← exp(x - shift), returning the sum of the new values (the forward's softmax numerators).
pub(crate) fn exp_shifted(isa: Isa, x: &mut [f32], shift: f32) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::exp_shifted(x, shift) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::exp_shifted(x, shift) },
        Isa::Scalar => x.iter_mut().fold(0.0, |sum, v| {
            *v = exp(*v - shift);
            sum + *v
        }),
    }
}

/// p ← exp(p - lse), ds ← p∘(ds - delta): one row of the backward's probabilities and score
/// gradients, from the scores in `p` and do·vᵀ in `ds`.
pub(crate) fn softmax_grad(isa: Isa, p: &mut [f32], ds: &mut [f32], lse: f32, delta: f32) {
    assert_eq!(p.len(), ds.len(), "softmax_grad rows");
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::softmax_grad(p, ds, lse, delta) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::softmax_grad(p, ds, lse, delta) },
        Isa::Scalar => {
            for (p, ds) in p.iter_mut().zip(ds) {
                *p = exp(*p - lse);
                *ds = *p * (*ds - delta);
            }
        }
    }
}

/// Σ a∘b.
pub(crate) fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot lengths");
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::dot(a, b) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::dot(a, b) },
        Isa::Scalar => a.iter().zip(b).map(|(x, y)| x * y).sum(),
    }
}

/// y ← gelu_tanh(x) = x·σ(x·(c₀ + c₁x²)) (0.5·(1 + tanh(u)) = σ(2u); src/runtime/fused_pointwise.rs).
pub(crate) fn gelu_tanh(isa: Isa, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "gelu_tanh: x and y lengths");
    let done = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::gelu_tanh(x, y) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::gelu_tanh(x, y) },
        Isa::Scalar => 0,
    };
    for (x, y) in x[done..].iter().zip(&mut y[done..]) {
        *y = x * gelu_sigmoid(*x).0;
    }
}

/// dx ← dy·(σ + x·σ·(1 − σ)·(c₀ + 3c₁x²)), σ = σ(x·(c₀ + c₁x²)): gelu_tanh's input gradient.
pub(crate) fn gelu_tanh_grad(isa: Isa, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    assert!(x.len() == dy.len() && x.len() == dx.len(), "gelu_tanh_grad: x, dy and dx lengths");
    let done = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::gelu_tanh_grad(x, dy, dx) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::gelu_tanh_grad(x, dy, dx) },
        Isa::Scalar => 0,
    };
    for ((x, dy), dx) in x[done..].iter().zip(&dy[done..]).zip(&mut dx[done..]) {
        let (s, e, x2) = gelu_sigmoid(*x);
        *dx = dy * (s + x * s * (s * e) * (GELU_C0 + 3.0 * GELU_C1 * x2));
    }
}

/// y ← (x·r)·w over one row, r = 1/√(mean(x²) + ε); returns r (RMSNorm, fused_pointwise.rs).
pub(crate) fn rms_norm_row(isa: Isa, x: &[f32], w: &[f32], epsilon: f32, y: &mut [f32]) -> f32 {
    assert!(x.len() == w.len() && x.len() == y.len(), "rms_norm_row: x, w and y lengths");
    let r = 1.0 / (dot(isa, x, x) / x.len() as f32 + epsilon).sqrt();
    for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
        *y = (x * r) * w;
    }
    r
}

/// dx ← g·r − x·r³·mean(g·x), g = dy·w, over one row: RMSNorm's input gradient.
pub(crate) fn rms_norm_grad_row(isa: Isa, x: &[f32], w: &[f32], r: f32, dy: &[f32], dx: &mut [f32]) {
    assert!(x.len() == w.len() && x.len() == dy.len() && x.len() == dx.len(), "rms_norm_grad_row: lengths");
    for ((g, dy), w) in dx.iter_mut().zip(dy).zip(w) {
        *g = dy * w;
    }
    let c = r * r * r * (dot(isa, dx, x) / x.len() as f32);
    for (dx, x) in dx.iter_mut().zip(x) {
        *dx = *dx * r - x * c;
    }
}

/// dx ← (g − mean(g))·r − (x − μ)·r³·mean(g·(x − μ)), g = dy·w, over one row: LayerNorm's
/// input gradient from the forward's mean μ and 1/σ r.
pub(crate) fn layer_norm_grad_row(isa: Isa, x: &[f32], w: &[f32], mu: f32, r: f32, dy: &[f32], dx: &mut [f32]) {
    assert!(x.len() == w.len() && x.len() == dy.len() && x.len() == dx.len(), "layer_norm_grad_row: lengths");
    for ((g, dy), w) in dx.iter_mut().zip(dy).zip(w) {
        *g = dy * w;
    }
    let (sum_g, sum_gc) = sum_and_centred_dot(isa, dx, x, mu);
    let (mean_g, c) = (sum_g / x.len() as f32, r * r * r * (sum_gc / x.len() as f32));
    for (dx, x) in dx.iter_mut().zip(x) {
        *dx = (*dx - mean_g) * r - (x - mu) * c;
    }
}

/// (Σ a, Σ a·(x − μ)): the centring inside the sum, so a large mean does not cancel.
fn sum_and_centred_dot(isa: Isa, a: &[f32], x: &[f32], mu: f32) -> (f32, f32) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::sum_and_centred_dot(a, x, mu) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::sum_and_centred_dot(a, x, mu) },
        Isa::Scalar => a.iter().zip(x).fold((0.0, 0.0), |(s, c), (a, x)| (s + a, c + a * (x - mu))),
    }
}

/// 2·√(2/π) and 0.044715·2·√(2/π): tanh-GELU's constants in the sigmoid form.
const GELU_C0: f32 = 1.595_769_2;
const GELU_C1: f32 = 0.071_354_814;

/// σ = σ(v), e = exp(-v) and x², v = x·(c₀ + c₁x²). The gradient's σ·(1 − σ) is σ·σ·e:
/// 1 − σ in float32 loses the digits of e where σ is near 1 (2e-6 of the gradient at x ≈ 4).
fn gelu_sigmoid(x: f32) -> (f32, f32, f32) {
    let x2 = x * x;
    let e = exp(-x * (GELU_C0 + GELU_C1 * x2));
    (1.0 / (1.0 + e), e, x2)
}

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 = LN2_HI - LN2_LO, LN2_HI with few mantissa bits so that n·LN2_HI is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = 2.121_944_4e-4;
/// Cephes' e^r coefficients, highest degree first (e^r ≈ 1 + r + r²·P(r)).
const POLY: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];
const EXP_MIN: f32 = -87.0;
const EXP_MAX: f32 = 88.0;

/// The scalar exp (the module comment's method).
fn exp(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let n = (x * LOG2_E).round_ties_even();
    let r = x - n * LN2_HI + n * LN2_LO;
    let p = POLY[1..].iter().fold(POLY[0], |p, c| p * r + c);
    let e_r = p * r * r + r + 1.0;
    e_r * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{EXP_MAX, EXP_MIN, GELU_C0, GELU_C1, LN2_HI, LN2_LO, LOG2_E, POLY};

    const W: usize = 16;

    /// The lanes of a `len`-element tail.
    fn tail_mask(len: usize) -> __mmask16 {
        ((1u32 << len) - 1) as __mmask16
    }

    #[target_feature(enable = "avx512f")]
    fn exp(x: __m512) -> __m512 {
        // max/min return their second operand when either is NaN: a NaN input stays NaN.
        let x = _mm512_min_ps(_mm512_set1_ps(EXP_MAX), _mm512_max_ps(_mm512_set1_ps(EXP_MIN), x));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, _mm512_set1_ps(LOG2_E)));
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(LN2_LO), _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x));
        let mut p = _mm512_set1_ps(POLY[0]);
        for c in &POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let e_r = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        let pow2n = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)));
        _mm512_mul_ps(e_r, _mm512_castsi512_ps(pow2n))
    }

    #[target_feature(enable = "avx512f")]
    pub(crate) fn max(x: &[f32]) -> f32 {
        let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
        let chunks = x.chunks_exact(W);
        let tail = chunks.remainder();
        for chunk in chunks {
            // SAFETY: the chunk holds W floats.
            acc = _mm512_max_ps(acc, unsafe { _mm512_loadu_ps(chunk.as_ptr()) });
        }
        // SAFETY: the mask covers only the tail's floats.
        let t = unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), tail_mask(tail.len()), tail.as_ptr()) };
        _mm512_reduce_max_ps(_mm512_max_ps(acc, t))
    }

    #[target_feature(enable = "avx512f")]
    pub(crate) fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
        let shift = _mm512_set1_ps(shift);
        let mut sum = _mm512_setzero_ps();
        let mut chunks = x.chunks_exact_mut(W);
        for chunk in &mut chunks {
            // SAFETY: the chunk holds W floats.
            unsafe {
                let e = exp(_mm512_sub_ps(_mm512_loadu_ps(chunk.as_ptr()), shift));
                _mm512_storeu_ps(chunk.as_mut_ptr(), e);
                sum = _mm512_add_ps(sum, e);
            }
        }
        let tail = chunks.into_remainder();
        let mask = tail_mask(tail.len());
        // SAFETY: the mask covers only the tail's floats.
        unsafe {
            let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, tail.as_ptr()), shift));
            _mm512_mask_storeu_ps(tail.as_mut_ptr(), mask, e);
            sum = _mm512_mask_add_ps(sum, mask, sum, e);
        }
        _mm512_reduce_add_ps(sum)
    }

    #[target_feature(enable = "avx512f")]
    pub(crate) fn softmax_grad(p: &mut [f32], ds: &mut [f32], lse: f32, delta: f32) {
        let (lse, delta) = (_mm512_set1_ps(lse), _mm512_set1_ps(delta));
        for start in (0..p.len()).step_by(W) {
            let mask = tail_mask((p.len() - start).min(W));
            // SAFETY: the mask covers floats start.. of both rows, which have equal lengths.
            unsafe {
                let (pp, dp) = (p.as_mut_ptr().add(start), ds.as_mut_ptr().add(start));
                let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, pp), lse));
                _mm512_mask_storeu_ps(pp, mask, e);
                _mm512_mask_storeu_ps(dp, mask, _mm512_mul_ps(e, _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, dp), delta)));
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = _mm512_setzero_ps();
        for start in (0..a.len()).step_by(W) {
            let mask = tail_mask((a.len() - start).min(W));
            // SAFETY: the mask covers floats start.. of both slices, which have equal lengths.
            unsafe {
                let (x, y) = (_mm512_maskz_loadu_ps(mask, a.as_ptr().add(start)), _mm512_maskz_loadu_ps(mask, b.as_ptr().add(start)));
                acc = _mm512_fmadd_ps(x, y, acc);
            }
        }
        _mm512_reduce_add_ps(acc)
    }

    /// σ(v), exp(-v) and x², v = x·(c₀ + c₁x²) (the scalar `gelu_sigmoid`), 16 lanes.
    #[target_feature(enable = "avx512f")]
    fn gelu_sigmoid(x: __m512) -> (__m512, __m512, __m512) {
        let x2 = _mm512_mul_ps(x, x);
        let v = _mm512_mul_ps(x, _mm512_fmadd_ps(x2, _mm512_set1_ps(GELU_C1), _mm512_set1_ps(GELU_C0)));
        let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), v));
        (_mm512_div_ps(_mm512_set1_ps(1.0), _mm512_add_ps(_mm512_set1_ps(1.0), e)), e, x2)
    }

    /// Whole vectors of `gelu_tanh`; returns how many elements it wrote.
    #[target_feature(enable = "avx512f")]
    pub(crate) fn gelu_tanh(x: &[f32], y: &mut [f32]) -> usize {
        for (xs, ys) in x.chunks_exact(W).zip(y.chunks_exact_mut(W)) {
            // SAFETY: both chunks hold W floats.
            unsafe {
                let v = _mm512_loadu_ps(xs.as_ptr());
                _mm512_storeu_ps(ys.as_mut_ptr(), _mm512_mul_ps(v, gelu_sigmoid(v).0));
            }
        }
        x.len() / W * W
    }

    /// Whole vectors of `gelu_tanh_grad`; returns how many elements it wrote.
    #[target_feature(enable = "avx512f")]
    pub(crate) fn gelu_tanh_grad(x: &[f32], dy: &[f32], dx: &mut [f32]) -> usize {
        for ((xs, dys), dxs) in x.chunks_exact(W).zip(dy.chunks_exact(W)).zip(dx.chunks_exact_mut(W)) {
            // SAFETY: the three chunks hold W floats each.
            unsafe {
                let v = _mm512_loadu_ps(xs.as_ptr());
                let (s, e, x2) = gelu_sigmoid(v);
                let slope = _mm512_fmadd_ps(x2, _mm512_set1_ps(3.0 * GELU_C1), _mm512_set1_ps(GELU_C0));
                let ds = _mm512_mul_ps(_mm512_mul_ps(v, s), _mm512_mul_ps(s, e));
                let d = _mm512_fmadd_ps(ds, slope, s);
                _mm512_storeu_ps(dxs.as_mut_ptr(), _mm512_mul_ps(_mm512_loadu_ps(dys.as_ptr()), d));
            }
        }
        x.len() / W * W
    }
    #[target_feature(enable = "avx512f")]
    pub(crate) fn sum_and_centred_dot(a: &[f32], x: &[f32], mu: f32) -> (f32, f32) {
        let (mut sum, mut dot, mu) = (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_set1_ps(mu));
        for start in (0..a.len()).step_by(W) {
            let mask = tail_mask((a.len() - start).min(W));
            // SAFETY: the mask covers floats start.. of both slices, which have equal lengths.
            unsafe {
                let (av, xv) = (_mm512_maskz_loadu_ps(mask, a.as_ptr().add(start)), _mm512_maskz_loadu_ps(mask, x.as_ptr().add(start)));
                sum = _mm512_add_ps(sum, av);
                dot = _mm512_fmadd_ps(av, _mm512_sub_ps(xv, mu), dot);
            }
        }
        (_mm512_reduce_add_ps(sum), _mm512_reduce_add_ps(dot))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{EXP_MAX, EXP_MIN, GELU_C0, GELU_C1, LN2_HI, LN2_LO, LOG2_E, POLY};

    const W: usize = 8;

    #[target_feature(enable = "avx2,fma")]
    fn exp(x: __m256) -> __m256 {
        // max/min return their second operand when either is NaN: a NaN input stays NaN.
        let x = _mm256_min_ps(_mm256_set1_ps(EXP_MAX), _mm256_max_ps(_mm256_set1_ps(EXP_MIN), x));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(x, _mm256_set1_ps(LOG2_E)));
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(LN2_LO), _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x));
        let mut p = _mm256_set1_ps(POLY[0]);
        for c in &POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let e_r = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let pow2n = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(e_r, _mm256_castsi256_ps(pow2n))
    }

    #[target_feature(enable = "avx2,fma")]
    fn sum(x: __m256) -> f32 {
        let x = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
        let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)))
    }

    /// A `len < W`-element tail, padded with `fill`.
    fn padded(tail: &[f32], fill: f32) -> [f32; W] {
        let mut lanes = [fill; W];
        lanes[..tail.len()].copy_from_slice(tail);
        lanes
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn max(x: &[f32]) -> f32 {
        let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
        let chunks = x.chunks_exact(W);
        let tail = padded(chunks.remainder(), f32::NEG_INFINITY);
        for chunk in chunks.chain([&tail[..]]) {
            // SAFETY: the chunk holds W floats.
            acc = _mm256_max_ps(acc, unsafe { _mm256_loadu_ps(chunk.as_ptr()) });
        }
        let mut lanes = [0.0f32; W];
        // SAFETY: `lanes` holds W floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        lanes.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
        let shift_v = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact_mut(W);
        for chunk in &mut chunks {
            // SAFETY: the chunk holds W floats.
            unsafe {
                let e = exp(_mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), shift_v));
                _mm256_storeu_ps(chunk.as_mut_ptr(), e);
                acc = _mm256_add_ps(acc, e);
            }
        }
        let tail = chunks.into_remainder();
        let mut lanes = padded(tail, 0.0);
        // SAFETY: `lanes` holds W floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), exp(_mm256_sub_ps(_mm256_loadu_ps(lanes.as_ptr()), shift_v))) };
        tail.copy_from_slice(&lanes[..tail.len()]);
        sum(acc) + tail.iter().sum::<f32>()
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn softmax_grad(p: &mut [f32], ds: &mut [f32], lse: f32, delta: f32) {
        let (lse_v, delta_v) = (_mm256_set1_ps(lse), _mm256_set1_ps(delta));
        let row = |p: &mut [f32], ds: &mut [f32]| {
            // SAFETY: both chunks hold W floats.
            unsafe {
                let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p.as_ptr()), lse_v));
                _mm256_storeu_ps(p.as_mut_ptr(), e);
                _mm256_storeu_ps(ds.as_mut_ptr(), _mm256_mul_ps(e, _mm256_sub_ps(_mm256_loadu_ps(ds.as_ptr()), delta_v)));
            }
        };
        let (mut pc, mut dc) = (p.chunks_exact_mut(W), ds.chunks_exact_mut(W));
        for (p, ds) in (&mut pc).zip(&mut dc) {
            row(p, ds);
        }
        let (pt, dt) = (pc.into_remainder(), dc.into_remainder());
        let (mut p_lanes, mut ds_lanes) = (padded(pt, 0.0), padded(dt, 0.0));
        row(&mut p_lanes, &mut ds_lanes);
        pt.copy_from_slice(&p_lanes[..pt.len()]);
        dt.copy_from_slice(&ds_lanes[..dt.len()]);
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let (ac, bc) = (a.chunks_exact(W), b.chunks_exact(W));
        let tail = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum::<f32>();
        for (x, y) in ac.zip(bc) {
            // SAFETY: both chunks hold W floats.
            acc = unsafe { _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr()), _mm256_loadu_ps(y.as_ptr()), acc) };
        }
        sum(acc) + tail
    }

    /// σ(v), exp(-v) and x², v = x·(c₀ + c₁x²) (the scalar `gelu_sigmoid`), 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    fn gelu_sigmoid(x: __m256) -> (__m256, __m256, __m256) {
        let x2 = _mm256_mul_ps(x, x);
        let v = _mm256_mul_ps(x, _mm256_fmadd_ps(x2, _mm256_set1_ps(GELU_C1), _mm256_set1_ps(GELU_C0)));
        let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), v));
        (_mm256_div_ps(_mm256_set1_ps(1.0), _mm256_add_ps(_mm256_set1_ps(1.0), e)), e, x2)
    }

    /// Whole vectors of `gelu_tanh`; returns how many elements it wrote.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn gelu_tanh(x: &[f32], y: &mut [f32]) -> usize {
        for (xs, ys) in x.chunks_exact(W).zip(y.chunks_exact_mut(W)) {
            // SAFETY: both chunks hold W floats.
            unsafe {
                let v = _mm256_loadu_ps(xs.as_ptr());
                _mm256_storeu_ps(ys.as_mut_ptr(), _mm256_mul_ps(v, gelu_sigmoid(v).0));
            }
        }
        x.len() / W * W
    }

    /// Whole vectors of `gelu_tanh_grad`; returns how many elements it wrote.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn gelu_tanh_grad(x: &[f32], dy: &[f32], dx: &mut [f32]) -> usize {
        for ((xs, dys), dxs) in x.chunks_exact(W).zip(dy.chunks_exact(W)).zip(dx.chunks_exact_mut(W)) {
            // SAFETY: the three chunks hold W floats each.
            unsafe {
                let v = _mm256_loadu_ps(xs.as_ptr());
                let (s, e, x2) = gelu_sigmoid(v);
                let slope = _mm256_fmadd_ps(x2, _mm256_set1_ps(3.0 * GELU_C1), _mm256_set1_ps(GELU_C0));
                let ds = _mm256_mul_ps(_mm256_mul_ps(v, s), _mm256_mul_ps(s, e));
                let d = _mm256_fmadd_ps(ds, slope, s);
                _mm256_storeu_ps(dxs.as_mut_ptr(), _mm256_mul_ps(_mm256_loadu_ps(dys.as_ptr()), d));
            }
        }
        x.len() / W * W
    }
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn sum_and_centred_dot(a: &[f32], x: &[f32], mu: f32) -> (f32, f32) {
        let (mut s, mut d, mu_v) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_set1_ps(mu));
        let (ac, xc) = (a.chunks_exact(W), x.chunks_exact(W));
        let tail = ac.remainder().iter().zip(xc.remainder()).fold((0.0, 0.0), |(s, c), (a, x)| (s + a, c + a * (x - mu)));
        for (av, xv) in ac.zip(xc) {
            // SAFETY: both chunks hold W floats.
            unsafe {
                let (av, xv) = (_mm256_loadu_ps(av.as_ptr()), _mm256_loadu_ps(xv.as_ptr()));
                s = _mm256_add_ps(s, av);
                d = _mm256_fmadd_ps(av, _mm256_sub_ps(xv, mu_v), d);
            }
        }
        (sum(s) + tail.0, sum(d) + tail.1)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-amplitude, amplitude] (an LCG; also the attention kernels' tests).
    pub(crate) fn values(n: usize, seed: u64, amplitude: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                amplitude * (((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
            })
            .collect()
    }


    /// Each path's exp against f64 exp over the range the clamp keeps, at 2^20 + 7 points (a
    /// row length that is no multiple of a vector, so the tails run too). Measured: 1.2e-7
    /// relative at most (1 ulp; scalar 8.2e-8) on this machine; the bound is 2 ulp.
    #[test]
    fn exp_is_within_two_ulp_in_every_path() {
        let n = (1 << 20) + 7;
        let xs: Vec<f32> = (0..n).map(|i| EXP_MIN + (EXP_MAX - EXP_MIN) * i as f32 / (n - 1) as f32).collect();
        for isa in Isa::available() {
            let mut got = xs.clone();
            exp_shifted(isa, &mut got, 0.0);
            let mut worst = 0.0f64;
            for (x, e) in xs.iter().zip(&got) {
                let want = (*x as f64).exp();
                worst = worst.max(((*e as f64 - want) / want).abs());
            }
            println!("{isa:?}: exp max rel err {worst:.2e}");
            assert!(worst < 2.4e-7, "{isa:?}: exp is off by {worst:.2e} relative");
            let mut low = [-1e4f32, f32::NEG_INFINITY, f32::NAN];
            exp_shifted(isa, &mut low, 0.0);
            assert!(low[0] < 1e-37 && low[0] >= 0.0 && low[1] < 1e-37 && low[1] >= 0.0, "{isa:?}: {low:?}");
            assert!(low[2].is_nan(), "{isa:?}: a NaN score must stay NaN, got {}", low[2]);
        }
    }

    /// The vector paths compute what the scalar path does, at every row length up to 40
    /// (whole vectors and every tail) and at the kernels' 256.
    #[test]
    fn vector_paths_match_the_scalar_path() {
        for isa in Isa::available() {
            for len in (0..=40).chain([256]) {
                let (x, y) = (values(len, len as u64, 30.0), values(len, 100 + len as u64, 1.0));
                let close = |a: f32, b: f32| (a - b).abs() <= 4e-7 * a.abs().max(b.abs()).max(1e-30);
                assert_eq!(max(isa, &x), max(Isa::Scalar, &x), "{isa:?} max, len {len}");
                let (mut e, mut e_ref) = (x.clone(), x.clone());
                let (s, s_ref) = (exp_shifted(isa, &mut e, 20.0), exp_shifted(Isa::Scalar, &mut e_ref, 20.0));
                assert!(e.iter().zip(&e_ref).all(|(a, b)| close(*a, *b)), "{isa:?} exp_shifted, len {len}");
                assert!((s - s_ref).abs() <= 1e-6 * s_ref.abs(), "{isa:?} exp_shifted sum, len {len}: {s} vs {s_ref}");
                let (mut p, mut ds, mut p_ref, mut ds_ref) = (x.clone(), y.clone(), x.clone(), y.clone());
                softmax_grad(isa, &mut p, &mut ds, 25.0, 0.3);
                softmax_grad(Isa::Scalar, &mut p_ref, &mut ds_ref, 25.0, 0.3);
                assert!(p.iter().zip(&p_ref).all(|(a, b)| close(*a, *b)), "{isa:?} softmax_grad p, len {len}");
                assert!(ds.iter().zip(&ds_ref).all(|(a, b)| (a - b).abs() <= 1e-6 * b.abs().max(1e-3)), "{isa:?} softmax_grad ds, len {len}");
                let (d, d_ref) = (dot(isa, &x, &y), dot(Isa::Scalar, &x, &y));
                let scale = x.iter().zip(&y).map(|(a, b)| (a * b).abs()).sum::<f32>();
                assert!((d - d_ref).abs() <= 1e-6 * scale.max(1.0), "{isa:?} dot, len {len}: {d} vs {d_ref}");
            }
        }
    }

    /// tanh-GELU and its gradient in every path against f64 over [-12, 12] (2^16 + 3 points:
    /// the tails run too), from the tanh definition, not the sigmoid form the kernels use.
    /// Error measured as |got − f64| / max(|f64|, 1); the bound, 1e-6, is a few float32 roundings
    /// and far below a wrong constant (a 1e-3 change in c₁ moves the gradient by ~1e-3) or
    /// the cancellation of 1 − σ (2e-6 at x ≈ 4, which `gelu_sigmoid` avoids).
    #[test]
    fn gelu_tanh_matches_f64_in_every_path() {
        let n = (1 << 16) + 3;
        let xs: Vec<f32> = (0..n).map(|i| -12.0 + 24.0 * i as f32 / (n - 1) as f32).collect();
        let dy = values(n, 7, 2.0);
        let k = (2.0f64 / std::f64::consts::PI).sqrt();
        for isa in Isa::available() {
            let (mut y, mut dx) = (vec![0.0; n], vec![0.0; n]);
            gelu_tanh(isa, &xs, &mut y);
            gelu_tanh_grad(isa, &xs, &dy, &mut dx);
            let (mut worst_y, mut worst_dx) = (0.0f64, 0.0f64);
            for i in 0..n {
                let x = xs[i] as f64;
                let t = (k * (x + 0.044715 * x * x * x)).tanh();
                let want_y = 0.5 * x * (1.0 + t);
                let want_dx = dy[i] as f64 * 0.5 * ((1.0 + t) + x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x));
                worst_y = worst_y.max((y[i] as f64 - want_y).abs() / want_y.abs().max(1.0));
                worst_dx = worst_dx.max((dx[i] as f64 - want_dx).abs() / want_dx.abs().max(1.0));
            }
            println!("{isa:?}: gelu_tanh max err {worst_y:.2e}, gradient {worst_dx:.2e}");
            assert!(worst_y < 1e-6 && worst_dx < 1e-6, "{isa:?}: gelu_tanh off by {worst_y:.2e}, gradient by {worst_dx:.2e}");
            let (mut y_nan, mut dx_nan) = ([0.0f32; 1], [0.0f32; 1]);
            gelu_tanh(isa, &[f32::NAN], &mut y_nan);
            gelu_tanh_grad(isa, &[f32::NAN], &[1.0], &mut dx_nan);
            assert!(y_nan[0].is_nan() && dx_nan[0].is_nan(), "{isa:?}: a NaN activation must stay NaN");
        }
    }

    /// RMSNorm's row forward and gradient in every path against f64 from the definition, at
    /// Wan's row lengths and odd ones (tails), rows of mixed scale. Measured: 1.4e-7 forward,
    /// 1.6e-7 gradient of the row's largest value (scalar path 4.3e-7: its sum is sequential);
    /// the bound 1e-6 is a few float32 roundings, and a missing rstd³ term or a sum instead of
    /// a mean is off by > 1e-2. (A 1-element row is left out: its gradient, g·r·ε/(x² + ε),
    /// is all cancellation.)
    #[test]
    fn rms_norm_rows_match_f64_in_every_path() {
        for isa in Isa::available() {
            let mut worst = (0.0f64, 0.0f64);
            for (len, amplitude) in [(256, 3.0), (128, 0.01), (5120, 40.0), (37, 1.0), (3, 2.0)] {
                let (x, w, dy) = (values(len, len as u64, amplitude), values(len, 1 + len as u64, 1.5), values(len, 2 + len as u64, 1.0));
                let (mut y, mut dx) = (vec![0.0; len], vec![0.0; len]);
                let eps = 1e-6f32;
                let r = rms_norm_row(isa, &x, &w, eps, &mut y);
                rms_norm_grad_row(isa, &x, &w, r, &dy, &mut dx);
                let n = len as f64;
                let r64 = 1.0 / (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n + eps as f64).sqrt();
                let g: Vec<f64> = dy.iter().zip(&w).map(|(&d, &w)| d as f64 * w as f64).collect();
                let mean_gx = g.iter().zip(&x).map(|(g, &x)| g * x as f64).sum::<f64>() / n;
                let want_y: Vec<f64> = x.iter().zip(&w).map(|(&x, &w)| x as f64 * r64 * w as f64).collect();
                let want_dx: Vec<f64> = g.iter().zip(&x).map(|(g, &x)| g * r64 - x as f64 * r64.powi(3) * mean_gx).collect();
                let err = |got: &[f32], want: &[f64]| {
                    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
                    got.iter().zip(want).map(|(&a, b)| (a as f64 - b).abs() / scale).fold(0.0, f64::max)
                };
                assert!(((r as f64 - r64) / r64).abs() < 1e-6, "{isa:?} len {len}: rstd {r} vs {r64}");
                worst = (worst.0.max(err(&y, &want_y)), worst.1.max(err(&dx, &want_dx)));
            }
            println!("{isa:?}: rms_norm max err {:.2e}, gradient {:.2e}", worst.0, worst.1);
            assert!(worst.0 < 1e-6 && worst.1 < 1e-6, "{isa:?}: rms_norm off by {:.2e}, gradient by {:.2e}", worst.0, worst.1);
        }
    }

    /// LayerNorm's row gradient in every path against f64 from the definition, with and
    /// without a weight (ones), rows whose mean is far from zero (a sum-then-subtract form would
    /// cancel there) and odd lengths, from the same float32 mean and rstd. Measured: 1.3e-7 of
    /// the row's largest gradient in every path; bound 1e-6.
    #[test]
    fn layer_norm_grad_rows_match_f64_in_every_path() {
        for isa in Isa::available() {
            let mut worst = 0.0f64;
            for (len, offset, weighted) in [(256, 0.0, true), (256, 300.0, false), (5120, -40.0, true), (37, 2.0, true), (3, 0.5, false)] {
                let x: Vec<f32> = values(len, len as u64, 3.0).iter().map(|v| v + offset).collect();
                let w = if weighted { values(len, 1 + len as u64, 1.5) } else { vec![1.0; len] };
                let dy = values(len, 2 + len as u64, 1.0);
                let n = len as f64;
                // The statistics as the forward hands them over: float32.
                let mu = (x.iter().map(|&v| v as f64).sum::<f64>() / n) as f32 as f64;
                let r = (1.0 / (x.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / n + 1e-6).sqrt()) as f32 as f64;
                let mut dx = vec![0.0; len];
                layer_norm_grad_row(isa, &x, &w, mu as f32, r as f32, &dy, &mut dx);
                let g: Vec<f64> = dy.iter().zip(&w).map(|(&d, &w)| d as f64 * w as f64).collect();
                let mean_g = g.iter().sum::<f64>() / n;
                let mean_gc = g.iter().zip(&x).map(|(g, &x)| g * (x as f64 - mu)).sum::<f64>() / n;
                let want: Vec<f64> = g.iter().zip(&x).map(|(g, &x)| (g - mean_g) * r - (x as f64 - mu) * r.powi(3) * mean_gc).collect();
                let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                worst = worst.max(dx.iter().zip(&want).map(|(&a, b)| (a as f64 - b).abs() / scale).fold(0.0, f64::max));
            }
            println!("{isa:?}: layer_norm_grad max err {worst:.2e}");
            assert!(worst < 1e-6, "{isa:?}: layer_norm_grad off by {worst:.2e}");
        }
    }
}
