"""How far DiffSynth's timestep table may move between two CPUs: PyTorch picks its CPU kernels by
instruction set (`ATEN_CPU_CAPABILITY`), and the kernels for linspace's multiply-add, exp and sum
round differently. Tolerances derived from the float32 computation, for every test that compares
flowstep's fixed table (or committed numbers) with the table DiffSynth computes at run time."""

import numpy as np

# float32 unit roundoff, and one ulp of a float32 in [0.5, 1), where y = exp(-2 z^2) lies.
U = 2.0**-24
ULP_Y = 2.0**-24
# linspace's `start + step*i` is one fma with AVX2/AVX-512 and a multiply then an add without:
# 1 ulp of sigma_raw, which the shift formula passes on (d ln sigma / d ln sigma_raw <= 1) and
# rounds once more: 2 ulps of sigma; timestep = 1000*sigma rounds once more: 3 ulps.
SIGMA_ULPS, TIMESTEP_ULPS = 2, 3


def weight_tolerance(steps: int, weights: np.ndarray) -> np.ndarray:
    """How far two correct float32 evaluations of DiffSynth's `set_training_weight` may differ,
    per entry, on two CPUs. y = exp(-2((1000 sigma - 500)/1000)^2) in [0.61, 1]:
    - exp: each kernel within 1 ulp of the true value, so two kernels within 2 ulps;
    - sigma within SIGMA_ULPS ulps (<= 2^-24 each for sigma <= 1) moves y by |dy/dsigma| =
      4|z|y <= 2 per unit sigma, i.e. at most 2*SIGMA_ULPS*2^-24;
    so y differs by dy <= (2 + 2*SIGMA_ULPS) ulps, and y' = y - min(y) (exact subtraction)
    by 2 dy. The sum S of n = 1000 entries of y' then differs by n*2dy from the inputs, plus
    each side's reduction error (torch's cascade sum: about log2(n) roundings, U*S each).
    w = y' * (1000/S): absolute (1000/S)*2dy, relative dS/S plus two roundings per side.
    For steps != 1000 DiffSynth scales by steps/1000 and adds w[1]: w[1]'s error adds once.
    """
    n = len(weights)
    dy = (2 + 2 * SIGMA_ULPS) * ULP_Y
    # Weights have mean 1 before the steps != 1000 correction: S = 1000 * mean(y') recovered
    # from the table itself would need y'; its smallest possible value over the Wan tables
    # (shift >= 1) is above 150, so 1000/S <= 1000/150.
    scale = 1000.0 / 150.0
    relative = n * 2 * dy / 150.0 + 2 * (np.ceil(np.log2(n)) + 1) * U + 4 * U
    tol = scale * 2 * dy + np.abs(weights) * relative
    if steps != 1000:
        tol = steps / 1000 * (tol + tol[1]) + 2 * U * np.abs(weights)
    return tol
