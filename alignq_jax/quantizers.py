"""Pure-function quantizers: AlignQ's Gaussian-CDF alignment and the plain uniform baseline.

Array in, array out; no Flax, no state. Specification: docs/method.md §1-3 and §9.

Two level modes everywhere:

* ``levels="exact"`` (default): k bits give 2^k distinct values: a symmetric mid-rise grid, or, for an activation
  quantizer followed by a ReLU (``relu=True``), an unsigned grid on [0, A] so the ReLU does not waste half the codes.
* ``levels="paper"``: the official code's grid ``round(n*c)/n`` applied on [-1, 1] (weights: 2^(k+1)-1 levels,
  activations with act_range 2: 4n+1 levels, 2n+1 after a ReLU), i.e. about one bit more than k. Use it to
  reproduce the paper.

:func:`weight_levels` and :func:`activation_levels` list the exact values each configuration can output.

Rounding uses a straight-through estimator (``jax.custom_vjp``); the CDF is differentiated exactly.

Dtypes: every quantizer computes its statistics, CDF values, threshold compares and rounding in float32 (or float64
for float64 inputs) whatever the input dtype, and casts the result back to the input dtype. A bfloat16 input ``x``
gives exactly ``quantize(x.astype(float32)).astype(bfloat16)``, and its gradient is the float32 gradient cast to
bfloat16. Inputs must be floating point.
"""

from __future__ import annotations

import functools
import math
import statistics
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ALLOWED_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 32)
LEVEL_MODES = ("exact", "paper")
_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# --------------------------------------------------------------------------------------------------------------
# Validation


def check_bits(bits) -> int:
    """Returns ``bits`` as int or raises ValueError naming the allowed values (1..8, or 32 = full precision)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(f"bits must be an integer in 1..8, or 32 for full precision; got {bits!r}")
    return bits


def check_levels(levels) -> str:
    if levels not in LEVEL_MODES:
        raise ValueError(f"levels must be one of {LEVEL_MODES}; got {levels!r}")
    return levels


def check_act_range(act_range) -> float:
    try:
        value = float(act_range)
    except (TypeError, ValueError):
        raise ValueError(f"act_range must be a positive number; got {act_range!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"act_range must be a positive finite number; got {act_range!r}")
    return value


def _check_surrogate(surrogate):
    if surrogate is None:
        return None
    try:
        lam, lam2 = (float(v) for v in surrogate)
    except (TypeError, ValueError):
        raise ValueError(f"surrogate must be None or a pair (lam, lam2); got {surrogate!r}") from None
    if not (lam > 0 and lam2 > 0):
        raise ValueError(f"surrogate (lam, lam2) must both be positive; got {surrogate!r}")
    return (lam, lam2)


def _check_weight_args(w, bits, levels, surrogate):
    """Validated (bits, levels, surrogate) of a per-tensor weight quantizer call."""
    _check_per_tensor(w)
    return check_bits(bits), check_levels(levels), _check_surrogate(surrogate)


def _compute_dtype(*arrays):
    """The dtype the quantizer numerics run in: at least float32 (bfloat16/float16 inputs are upcast).

    Statistics, CDF values, threshold compares and rounding in bfloat16 would change which level a value lands
    on (a bf16 step is 2^-8 relative), i.e. change the method; only the result is cast back to the input dtype.
    """
    dtype = jnp.result_type(*arrays)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"quantizers need floating-point inputs; got dtype {dtype}")
    return jnp.promote_types(dtype, jnp.float32)


def _as_compute(x, dtype):
    return x if x.dtype == dtype else x.astype(dtype)


def _check_per_tensor(w):
    if jnp.size(w) < 2:
        raise ValueError(
            f"weight quantizers use a per-tensor unbiased std and need at least 2 elements; got shape {jnp.shape(w)}"
        )


# --------------------------------------------------------------------------------------------------------------
# Gaussian CDF (erf form: ~2.5x faster inside a training step than jax.scipy.stats.norm.cdf on CPU)


def normal_cdf(x):
    """Standard normal CDF Phi(x) = 0.5 * (1 + erf(x / sqrt 2))."""
    return 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))


def normal_pdf(x):
    """Standard normal density phi(x)."""
    return _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)


# --------------------------------------------------------------------------------------------------------------
# Straight-through rounding


def _soft_step_derivative(v, lam, lam2):
    """The paper's sawtooth gradient (docs/method.md §3.1): lam * sigmoid'(t), t = 2*lam2*frac(v + 0.5).

    frac(v + 0.5) is 0 just above a rounding threshold of round(v) and rises to 1 just below the next one.
    """
    t = 2.0 * lam2 * jnp.mod(v + 0.5, 1.0)
    s = jax.nn.sigmoid(t)
    return lam * s * (1.0 - s)


@jax.custom_vjp
def ste_round(v):
    """round(v) (half to even) forward, identity backward."""
    return jnp.round(v)


ste_round.defvjp(lambda v: (jnp.round(v), None), lambda _, g: (g,))


@jax.custom_vjp
def ste_sign(v):
    """sign(v) forward, identity backward (the 1-bit rounding of the paper grid)."""
    return jnp.sign(v)


ste_sign.defvjp(lambda v: (jnp.sign(v), None), lambda _, g: (g,))


def _make_soft_step_round(rounding: Callable):
    @jax.custom_vjp
    def rounded(v, lam, lam2):
        return rounding(v)

    def fwd(v, lam, lam2):
        return rounding(v), (v, lam, lam2)

    def bwd(res, g):
        v, lam, lam2 = res
        return (g * _soft_step_derivative(v, lam, lam2), jnp.zeros_like(lam), jnp.zeros_like(lam2))

    rounded.defvjp(fwd, bwd)
    return rounded


_soft_step_round = _make_soft_step_round(jnp.round)
_soft_step_sign = _make_soft_step_round(jnp.sign)


def _round(v, *, sign: bool = False, surrogate=None):
    """Rounds v (or takes its sign) with the STE, or with the opt-in soft-step surrogate gradient."""
    if surrogate is None:
        return ste_sign(v) if sign else ste_round(v)
    lam, lam2 = surrogate
    fn = _soft_step_sign if sign else _soft_step_round
    return fn(v, jnp.asarray(lam, v.dtype), jnp.asarray(lam2, v.dtype))


def _grid_from_unit_interval(u, bits, levels, surrogate=None):
    """Quantizes u in [0, 1] (the CDF value) to a symmetric grid on [-1, 1].

    exact: 2*round(n*u)/n - 1, 2^bits levels. paper: round(n*(2u-1))/n, 2^(bits+1)-1 levels (sign at 1 bit).
    """
    n = 2.0**bits - 1.0
    if levels == "exact":
        return 2.0 * _round(n * u, surrogate=surrogate) / n - 1.0
    c = 2.0 * u - 1.0
    if bits == 1:
        return _round(c, sign=True, surrogate=surrogate)
    return _round(n * c, surrogate=surrogate) / n


# --------------------------------------------------------------------------------------------------------------
# AlignQ


def _standardise_per_tensor(w, stop_stats_grad):
    """z = (w - mean) / std (unbiased), per tensor; z = 0 everywhere for a tensor with no spread.

    A constant tensor (e.g. a zero-initialised kernel) has std 0 and z = 0/0. It is defined to standardise to
    z = 0 (all elements sit at the mean), with zero gradient: the output does not move with w there. Both the
    value and the backward use a safe std, so no NaN appears on either side (sqrt'(0) is infinite). "No spread"
    means max(w) == min(w), or a variance that underflows to 0 in float32; a mean off by rounding cannot turn
    a constant tensor into +-1 standard deviations. Any other tensor gets exactly (w - mean) / std.
    """
    mean = jnp.mean(w)
    var = jnp.var(w, ddof=1)
    flat = (jnp.max(w) == jnp.min(w)) | (var == 0)  # NaN in w: not flat, so NaN propagates as before
    std = jnp.sqrt(jnp.where(flat, 1.0, var))
    if stop_stats_grad:
        mean, std = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(std)
    return jnp.where(flat, 0.0, (w - mean) / std)


def cdf_align_weight(w, *, stop_stats_grad=False):
    """Unrounded aligned weights 2*Phi((w - mean)/std) - 1 in (-1, 1), per tensor (docs/method.md §1).

    Args:
      w: any shape, at least 2 elements. Mean and unbiased std over all elements.
    Returns: same shape and dtype as w; 0 everywhere (zero gradient) for a constant tensor, as in alignq_weight.
    """
    _check_per_tensor(w)
    w = jnp.asarray(w)
    wc = _as_compute(w, _compute_dtype(w))
    return (2.0 * normal_cdf(_standardise_per_tensor(wc, stop_stats_grad)) - 1.0).astype(w.dtype)


def cdf_align_activation(x, act_range=2.0):
    """Unrounded aligned activations act_range * (2*Phi(x) - 1) in (-act_range, act_range) (docs/method.md §2)."""
    a = check_act_range(act_range)
    x = jnp.asarray(x)
    xc = _as_compute(x, _compute_dtype(x))
    return (a * (2.0 * normal_cdf(xc) - 1.0)).astype(x.dtype)


def alignq_weight(w, bits, *, levels="exact", stop_stats_grad=False, surrogate=None):
    """AlignQ weight quantizer (docs/method.md §1): per-tensor Gaussian-CDF alignment, then uniform rounding.

    Args:
      w: weight tensor of any shape (at least 2 elements), e.g. an HWIO conv kernel. Statistics are per tensor.
      bits: 1..8, or 32 (returns w unchanged).
      levels: "exact" -> 2*round(n*Phi(z))/n - 1 (2^bits levels); "paper" -> round(n*(2*Phi(z)-1))/n
        (2^(bits+1)-1 levels, the official code). n = 2^bits - 1, z = (w - mean)/std.
      stop_stats_grad: treat mean and std as constants in the gradient (the official code does not).
      surrogate: None (straight-through rounding, default and what the official code trains with), or
        (lam, lam2) to use the paper's sigmoid soft-step as the derivative of the rounding (docs/method.md §3.1).
        Opt-in: the official optimizer computes it but discards it (docs/method.md §3.2), and its intended form
        multiplies by the CDF density a second time; here the density enters once, through the exact CDF chain.
    Returns: quantized weights in [-1, 1], same shape and dtype as w (values stay in CDF space; BN rescales).

    A constant tensor (all elements equal, e.g. ``kernel_init=zeros``) standardises to z = 0, Phi(0) = 1/2, i.e. the
    grid value nearest the middle: exact mode 1/n (the tie n/2 rounds half to even, up to the level just above
    0; the exact grid has no 0), and -1 at 1 bit (round(1/2) = 0); paper mode 0. Its gradient is zero, so such a
    kernel stays constant under training: initialise quantized kernels with a non-constant initialiser.
    """
    bits, levels, surrogate = _check_weight_args(w, bits, levels, surrogate)
    if bits == 32:
        return w
    w = jnp.asarray(w)
    wc = _as_compute(w, _compute_dtype(w))
    u = normal_cdf(_standardise_per_tensor(wc, stop_stats_grad))
    return _grid_from_unit_interval(u, bits, levels, surrogate).astype(w.dtype)


# Above this many rounding thresholds the forward uses the CDF formula; at or below it, it counts thresholds.
_MAX_THRESHOLDS = 64


def _activation_grid(levels, relu):
    """The activation grid: "exact" (signed, 2^k levels on [-A, A]), "unsigned" (exact mode followed by a ReLU:
    2^k levels on [0, A]) or "paper" (the official grid; a following ReLU just clips it at 0)."""
    return "unsigned" if (levels == "exact" and relu) else levels


@functools.lru_cache(maxsize=None)
def _activation_thresholds(bits, grid, a):
    """(lowest integer code, ((threshold, inclusive), ...)) such that the rounded code of x is the lowest code
    plus the number of thresholds below x, or None if there are more than _MAX_THRESHOLDS.

    exact: code k = round(n*Phi(x)) in 0..n, thresholds Phi^-1((j + 0.5)/n). unsigned: code k = round(n*(2Phi(x)-1))
    for x > 0 (0 for x <= 0) in 0..n, thresholds Phi^-1(1/2 + (j + 0.5)/(2n)). paper: code k = round(n*A*(2Phi(x)-1)),
    thresholds where n*A*(2Phi-1) = m + 0.5. Computed in float64 (``statistics.NormalDist``). ``inclusive``
    reproduces round-half-to-even at an exact tie: the code goes up at x == threshold iff the upper code is even.
    """
    n = 2**bits - 1
    if grid == "exact":
        halves = [j + 0.5 for j in range(n)]
        to_u = lambda h: h / n  # noqa: E731
    elif grid == "unsigned":
        halves = [j + 0.5 for j in range(n)]
        to_u = lambda h: 0.5 + h / (2.0 * n)  # noqa: E731
    else:
        halves = [m + 0.5 for m in range(-math.ceil(n * a) - 1, math.ceil(n * a) + 1) if abs(m + 0.5) < n * a]
        to_u = lambda h: 0.5 + h / (2.0 * n * a)  # noqa: E731
    if len(halves) > _MAX_THRESHOLDS:
        return None
    normal = statistics.NormalDist()
    thresholds = tuple((normal.inv_cdf(to_u(h)), int(math.floor(h)) % 2 == 1) for h in halves)
    return int(math.floor(halves[0])), thresholds


def _alignq_activation_forward(x, bits, grid, a):
    """Rounded activations on ``grid`` (see _activation_grid), before any ReLU of the paper grid."""
    if grid == "paper" and bits == 1:
        return jnp.sign(a * (2.0 * normal_cdf(x) - 1.0))
    n = 2.0**bits - 1.0
    table = _activation_thresholds(bits, grid, a)
    if table is not None:
        # Counting thresholds needs only compares and adds, which XLA fuses into the ops around them; the erf of
        # the CDF formula stops that fusion and costs an extra activation-sized buffer per layer.
        low, thresholds = table
        code = jnp.full(x.shape, float(low), x.dtype)
        for t, inclusive in thresholds:
            code = code + ((x >= t) if inclusive else (x > t)).astype(x.dtype)
        if grid == "exact":
            q = a * (2.0 * code / n - 1.0)
        elif grid == "unsigned":
            q = a * code / n
        else:
            q = code / n
        return jnp.where(jnp.isnan(x), x, q)  # comparisons with NaN are False; keep NaN in, NaN out
    if grid == "unsigned":
        # 2*Phi(x) - 1 = erf(x/sqrt 2), taken directly (no 1 + erf cancellation); max(., 0) keeps NaN.
        return a * jnp.round(n * jnp.maximum(jax.lax.erf(x * _SQRT_HALF), 0.0)) / n
    u = normal_cdf(x)
    if grid == "exact":
        return a * (2.0 * jnp.round(n * u) / n - 1.0)
    # XLA's float32 erf overshoots +-1 by an ulp or two for |x| > ~5; clipping keeps the code within +-round(n*A)
    # (it mattered only where n*A is a half-integer, whose tie would otherwise round outwards past A).
    return jnp.round(n * a * jnp.clip(2.0 * u - 1.0, -1.0, 1.0)) / n


# One custom VJP for the whole activation quantizer: the backward keeps only x and computes 2*A*phi(x)*g, which
# equals straight-through rounding composed with the exact CDF derivative, without storing the CDF's
# intermediates (less memory and one fused elementwise kernel each way).
# With relu=True the ReLU that follows is fused in too, and its mask is recomputed from x in the backward, so
# quantizer + ReLU keep one tensor for the backward, as a plain BN -> ReLU does.
@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _alignq_activation(x, bits, levels, a, relu):
    return _relu_of_grid(_alignq_activation_forward(x, bits, _activation_grid(levels, relu), a), levels, relu)


def _relu_of_grid(q, levels, relu):
    # The unsigned grid (exact mode + ReLU) is already non-negative; the paper grid is clipped at 0.
    return jnp.maximum(q, 0.0) if (relu and levels == "paper") else q


def _alignq_activation_fwd(x, bits, levels, a, relu):
    return _alignq_activation(x, bits, levels, a, relu), x


def _alignq_activation_bwd(bits, levels, a, relu, x, g):
    factor = (2.0 * a) * normal_pdf(x)
    if relu:
        factor = jnp.where(_positive_mask(x, bits, levels, a), factor, 0.0)
    return (g * factor.astype(g.dtype),)


_alignq_activation.defvjp(_alignq_activation_fwd, _alignq_activation_bwd)


def alignq_activation(x, bits, *, act_range=2.0, levels="exact", relu=False):
    """AlignQ activation quantizer (docs/method.md §2): standard-normal CDF, scaled to (-A, A), rounded.

    Grids (n = 2^bits - 1, A = act_range; :func:`activation_levels` lists the values):

    * exact, relu=False: A*(2*round(n*Phi(x))/n - 1), 2^bits levels A*(2j/n - 1) on [-A, A] (no zero level).
    * exact, relu=True: the unsigned grid on the CDF's upper half, A*round(n*u)/n with u = 2*Phi(x) - 1 for x > 0
      and u = 0 for x <= 0: 2^bits levels A*j/n, j = 0..n, on [0, A]. (ReLU after the signed grid would keep only
      2^(bits-1) + 1 of its levels.)
    * paper: round(n*A*(2*Phi(x)-1))/n (4n+1 levels for A=2; sign at 1 bit), the official grid; relu=True clips
      it at 0 (2n+1 levels for A=2), i.e. equals ``jax.nn.relu(alignq_activation(x, ..., levels="paper"))``.

    Args:
      x: activations of any shape (the BatchNorm output; no statistics are computed here), any float dtype.
      bits: 1..8, or 32 (identity, or a plain ReLU if relu).
      act_range: A > 0.
      levels: "exact" or "paper".
      relu: the quantizer is followed by a ReLU (docs/method.md §7 placement), fused into the same op.
    Returns: same shape and dtype as x. Gradient: 2*A*phi(x) (STE through the rounding, exact CDF derivative);
    with relu, zero where x <= 0 (exact) or where the paper-grid output is 0.
    """
    bits = check_bits(bits)
    levels = check_levels(levels)
    a = check_act_range(act_range)
    if bits == 32:
        return jax.nn.relu(x) if relu else x
    x = jnp.asarray(x)
    xc = _as_compute(x, _compute_dtype(x))
    return _alignq_activation(xc, bits, levels, a, bool(relu)).astype(x.dtype)


def _check_channel_affine(h, scale, shift):
    c = jnp.shape(h)[-1] if jnp.ndim(h) else None
    if jnp.shape(scale) != (c,) or jnp.shape(shift) != (c,):
        raise ValueError(
            f"scale and shift must have shape (C,) = ({c},) for h of shape {jnp.shape(h)}; got "
            f"{jnp.shape(scale)} and {jnp.shape(shift)}"
        )


# BatchNorm folded into the quantizer: the backward keeps h (the BN input, which BN's own statistics need anyway)
# and the per-channel scale/shift, never the BN output, so BN -> Q (-> ReLU) stores what a plain BN -> ReLU does.
@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _alignq_affine(h, scale, shift, bits, levels, a, relu):
    q = _alignq_activation_forward(h * scale + shift, bits, _activation_grid(levels, relu), a)
    return _relu_of_grid(q, levels, relu)


def _alignq_affine_fwd(h, scale, shift, bits, levels, a, relu):
    return _alignq_affine(h, scale, shift, bits, levels, a, relu), (h, scale, shift)


def _positive_mask(x, bits, levels, a):
    """Where the gradient of quantizer + ReLU is not zeroed: a threshold on x, without recomputing the rounded output.

    exact mode (unsigned grid): x > 0, where the CDF's upper half 2*Phi(x) - 1 is positive (the STE passes the
    gradient of the codes that round to 0 just above x = 0, as it does for every other level). paper grid: the
    ReLU mask q(x) > 0; round(n*c) >= 1 needs n*c > 1/2, i.e. x > Phi^-1(1/2 + 1/(4nA)); at 1 bit it is x > 0.
    """
    n = 2**bits - 1
    if levels == "exact" or bits == 1:
        return x > 0
    return x > statistics.NormalDist().inv_cdf(0.5 + 1.0 / (4.0 * n * a))


def _alignq_affine_bwd(bits, levels, a, relu, res, g):
    h, scale, shift = res
    x = h * scale + shift
    factor = (2.0 * a) * normal_pdf(x)
    if relu:
        # The ReLU mask from a threshold on x rather than by recomputing the rounded output: same mask, and XLA
        # then keeps no extra buffer for the backward.
        factor = jnp.where(_positive_mask(x, bits, levels, a), factor, 0.0)
    t = g * factor
    axes = tuple(range(h.ndim - 1))
    return (t * scale).astype(h.dtype), jnp.sum(t * h, axes).astype(scale.dtype), jnp.sum(t, axes).astype(shift.dtype)


_alignq_affine.defvjp(_alignq_affine_fwd, _alignq_affine_bwd)


def alignq_activation_affine(h, scale, shift, bits, *, act_range=2.0, levels="exact", relu=False):
    """``alignq_activation(h * scale + shift, ...)`` for a per-channel affine map, e.g. a BatchNorm's
    normalisation folded into the quantizer (``QuantBatchNorm``). Same values, grids and gradients, less memory.

    Args:
      h: (..., C) pre-normalisation activations (the conv output), any float dtype.
      scale, shift: (C,) per-channel affine (BN: gamma/sqrt(var+eps) and beta - mean*scale), any float dtype.
    Returns: (..., C) in h's dtype. The affine map is computed in float32 (at least) with the quantizer.
    """
    bits = check_bits(bits)
    levels = check_levels(levels)
    a = check_act_range(act_range)
    _check_channel_affine(h, scale, shift)
    h, scale, shift = jnp.asarray(h), jnp.asarray(scale), jnp.asarray(shift)
    dtype = _compute_dtype(h, scale, shift)
    hc, sc, bc = _as_compute(h, dtype), _as_compute(scale, dtype), _as_compute(shift, dtype)
    if bits == 32:
        x = hc * sc + bc
        return (jax.nn.relu(x) if relu else x).astype(h.dtype)
    return _alignq_affine(hc, sc, bc, bits, levels, a, bool(relu)).astype(h.dtype)


# --------------------------------------------------------------------------------------------------------------
# Plain uniform baseline (docs/method.md §9, with the same signature and placement as AlignQ)


def _mean_abs_sign(w):
    scale = jax.lax.stop_gradient(jnp.mean(jnp.abs(w)))
    return scale * ste_sign(w)


def uniform_weight(w, bits, *, levels="exact", stop_stats_grad=False, surrogate=None):
    """Plain uniform weight quantizer on the raw weights (no alignment, no learned scale).

    paper: round(n*w)/n with no clipping (the official baseline). exact: the 2^bits-level grid on [-1, 1],
    2*round(n*(clip(w,-1,1)+1)/2)/n - 1. bits=1 (both): mean|w| * sign(w), the scale held constant.
    ``stop_stats_grad`` is accepted for signature compatibility (only the 1-bit scale is a statistic, and it
    is always constant). ``surrogate`` as in :func:`alignq_weight`. Returns the shape and dtype of w.
    """
    bits, levels, surrogate = _check_weight_args(w, bits, levels, surrogate)
    if bits == 32:
        return w
    w = jnp.asarray(w)
    return _uniform_weight(_as_compute(w, _compute_dtype(w)), bits, levels, surrogate).astype(w.dtype)


def _uniform_weight(w, bits, levels, surrogate):
    if bits == 1:
        return _mean_abs_sign(w)
    n = 2.0**bits - 1.0
    if levels == "paper":
        return _round(n * w, surrogate=surrogate) / n
    u = (jnp.clip(w, -1.0, 1.0) + 1.0) * 0.5
    return _grid_from_unit_interval(u, bits, "exact", surrogate)


def uniform_activation(x, bits, *, act_range=2.0, levels="exact", relu=False):
    """Plain uniform activation quantizer on (-A, A), placed where AlignQ's is (after BN, before ReLU).

    paper: round(n*clip(x, -A, A))/n (4n+1 levels for A=2, like AlignQ's paper grid; sign at 1 bit); relu=True
    clips it at 0. exact: the 2^bits-level grid A*(2*round(n*(clip(x,-A,A)/A+1)/2)/n - 1); with relu=True the
    unsigned 2^bits-level grid on [0, A], A*round(n*clip(x, 0, A)/A)/n (values A*j/n, j = 0..n), as AlignQ's
    exact mode does. Gradient 1 inside the clip range ((-A, A), or (0, A) for the unsigned grid), 0 outside
    (jnp.clip's 1/2 exactly at its ends); the paper grid with relu also zeroes it where the output is 0. The
    official baseline quantizes after ReLU on [0, 1] instead (docs/method.md §9); we keep AlignQ's placement so
    that the comparison changes only the alignment. Returns the shape and dtype of x.
    """
    bits = check_bits(bits)
    levels = check_levels(levels)
    a = check_act_range(act_range)
    if bits == 32:
        return jax.nn.relu(x) if relu else x
    x = jnp.asarray(x)
    return _uniform_activation(_as_compute(x, _compute_dtype(x)), bits, a, levels, bool(relu)).astype(x.dtype)


def _uniform_activation(x, bits, a, levels, relu):
    if relu and levels == "exact":
        # Unsigned grid on [0, A]: the ReLU would zero every negative level of the signed grid.
        n = 2.0**bits - 1.0
        return a * _round(n * jnp.clip(x, 0.0, a) / a) / n
    q = _uniform_activation_signed(x, bits, a, levels)
    return jax.nn.relu(q) if relu else q


def _uniform_activation_signed(x, bits, a, levels):
    clipped = jnp.clip(x, -a, a)
    n = 2.0**bits - 1.0
    if levels == "exact":
        u = (clipped / a + 1.0) * 0.5
        return a * (2.0 * _round(n * u) / n - 1.0)
    if bits == 1:
        return _round(clipped, sign=True)
    return _round(n * clipped) / n


# --------------------------------------------------------------------------------------------------------------
# Registry: one place that maps a method name to its weight and activation quantizer.


class QuantizerPair(NamedTuple):
    weight: Callable
    activation: Callable
    align_activation: Callable  # the unrounded transform the correlation term compares against
    activation_affine: Callable  # activation(h * scale + shift), per-channel affine folded in


def _clip_activation(x, act_range=2.0):
    a = check_act_range(act_range)
    x = jnp.asarray(x)
    return jnp.clip(_as_compute(x, _compute_dtype(x)), -a, a).astype(x.dtype)


def uniform_activation_affine(h, scale, shift, bits, *, act_range=2.0, levels="exact", relu=False):
    """``uniform_activation(h * scale + shift, ...)`` (plain autodiff: its backward only needs a clip mask)."""
    bits = check_bits(bits)
    levels = check_levels(levels)
    a = check_act_range(act_range)
    _check_channel_affine(h, scale, shift)
    h, scale, shift = jnp.asarray(h), jnp.asarray(scale), jnp.asarray(shift)
    dtype = _compute_dtype(h, scale, shift)
    x = _as_compute(h, dtype) * _as_compute(scale, dtype) + _as_compute(shift, dtype)
    if bits == 32:
        return (jax.nn.relu(x) if relu else x).astype(h.dtype)
    return _uniform_activation(x, bits, a, levels, bool(relu)).astype(h.dtype)


QUANTIZERS: dict[str, QuantizerPair] = {
    "alignq": QuantizerPair(alignq_weight, alignq_activation, cdf_align_activation, alignq_activation_affine),
    "uniform": QuantizerPair(uniform_weight, uniform_activation, _clip_activation, uniform_activation_affine),
}


def get_quantizers(method: str) -> QuantizerPair:
    """Weight and activation quantizers of a method name ("alignq", "uniform")."""
    try:
        return QUANTIZERS[method]
    except KeyError:
        raise ValueError(f"method must be one of {tuple(QUANTIZERS)}; got {method!r}") from None


# --------------------------------------------------------------------------------------------------------------
# Level sets: what each configuration can output (for results tables and docs).


def weight_levels(method: str, bits: int, levels: str) -> np.ndarray:
    """The sorted values (float64) the weight quantizer of ``method`` can output at ``bits`` and ``levels``.

    alignq: exact 2j/n - 1, j = 0..n (2^bits values); paper j/n, j = -n..n (2^(bits+1) - 1 values); paper at 1 bit
    {-1, 0, 1} (sign(w - mean): 0 only for a weight exactly at the mean, e.g. a constant tensor).
    uniform: exact 2j/n - 1 as alignq. At 1 bit (both modes) mean|w| * sign(w), returned in units of the
    tensor's mean|w| as {-1, 0, 1} (0 only for w exactly 0).
    Raises ValueError for bits=32 (no finite set) and for uniform paper at 2+ bits, whose grid round(n*w)/n is
    not clipped and so has no bound (any j/n).
    """
    get_quantizers(method)
    bits, levels = check_bits(bits), check_levels(levels)
    if bits == 32:
        raise ValueError("bits=32 is full precision: there is no finite set of levels")
    n = 2**bits - 1
    if bits == 1 and (levels == "paper" or method == "uniform"):
        return np.array([-1.0, 0.0, 1.0])
    if levels == "exact":
        return 2.0 * np.arange(n + 1) / n - 1.0
    if method == "uniform":
        raise ValueError(
            "uniform weights with levels='paper' are not clipped: round(n*w)/n takes any value j/n, so there is "
            "no finite set of levels; use levels='exact' for a bounded grid"
        )
    return np.arange(-n, n + 1) / n


def _paper_activation_max_code(method, bits, a):
    """Largest |code| of the paper activation grid round(n*c) (bits >= 2)."""
    n = 2**bits - 1
    if method == "uniform":
        # c = clip(x, -A, A) reaches A itself; the product is formed in float32, then rounded half to even.
        return int(np.round(np.float32(n) * np.float32(a)))
    if _activation_thresholds(bits, "paper", a) is not None:
        # Threshold counting uses the exact CDF, whose values stay inside (-1, 1): the top code J is the largest
        # with J - 1/2 < n*A.
        return math.ceil(n * a + 0.5) - 1
    # The float32 CDF formula reaches 2*Phi - 1 = +-1 exactly (|x| beyond about 5.5, and +-inf).
    return int(np.round(np.float32(n * a)))


def activation_levels(method: str, bits: int, levels: str, act_range: float = 2.0, relu: bool = False) -> np.ndarray:
    """The sorted values (float64) the activation quantizer of ``method`` can output (with its ReLU if ``relu``).

    n = 2^bits - 1, A = act_range.
    exact: A*(2j/n - 1), j = 0..n; with relu the unsigned grid A*j/n, j = 0..n (2^bits values either way).
    paper: j/n for |j| <= J, J the top code (J = 2n for A = 2: 4n+1 values); at 1 bit {-1, 0, 1} (the sign of
    2*Phi(x) - 1: 0 only where float32 Phi(x) is exactly 1/2, |x| below about 1e-7); with relu the values >= 0
    (2n+1 for A = 2; {0, 1} at 1 bit).
    Raises ValueError for bits=32 (no finite set).
    """
    get_quantizers(method)
    bits, levels, a = check_bits(bits), check_levels(levels), check_act_range(act_range)
    if bits == 32:
        raise ValueError("bits=32 is full precision: there is no finite set of levels")
    n = 2**bits - 1
    if levels == "exact":
        j = np.arange(n + 1)
        return a * j / n if relu else a * (2.0 * j / n - 1.0)
    if bits == 1:
        values = np.array([-1.0, 0.0, 1.0])
    else:
        top = _paper_activation_max_code(method, bits, a)
        values = np.arange(-top, top + 1) / n
    return values[values >= 0] if relu else values
