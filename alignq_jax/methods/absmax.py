"""AbsMax: the production post-training / QAT baseline, a uniform grid scaled from the tensor's range, no learning.

This is the symmetric max (or percentile) calibration of production int8 toolchains, at k bits, as Wu, Judd, Zhang,
Isaev and Micikevicius (2020, "Integer Quantization for Deep Learning Inference: Principles and Empirical
Evaluation") describe it: symmetric narrow-range scale (int8: -127..127), per-tensor or per-channel weight ranges,
max or percentile activation ranges.

Weights (signed, narrow range): r = max|w| (or the ``percentile`` of |w|), per tensor or per output channel (last
axis) with ``per_channel``; Q_P = 2^(k-1) - 1, scale = r / Q_P,

    w_q = scale * round(clip(w / scale, -Q_P, Q_P))

the 2^k - 1 levels scale*j, j = -Q_P..Q_P (int8: -127..127), zero included. 1 bit is not defined: Q_P = 0 leaves
only the level 0, and binary weights are a different quantizer (sign with a mean scale), so ``check_bits`` raises
ValueError for 1 bit (activations included, so one method has one set of valid bits).

Activations (unsigned; the non-negative input of a conv): r = ``range``, a running statistic the layer keeps from
``activation_batch_stats`` (this batch's max(x), or its ``percentile`` over all elements), per tensor;
n = 2^k - 1,

    x_q = (r/n) * round(clip(x, 0, r) * n / r)

the 2^k levels r*j/n, j = 0..n.

Gradients: straight-through inside the range, |w| <= r (weights) and 0 <= x <= r (activations), ends included (the
max element itself is not clipped), 0 outside; the range / scale get no gradient.

A zero range (an all-zero tensor or channel, a percentile of 0, a batch with no positive value) quantizes to 0
everywhere, with a finite gradient: 1 where the value is exactly 0 (the range [0, 0] or [-0, 0]), else 0; a
negative activation range (a batch with no non-negative value) passes no gradient.

Everything is computed in float32 whatever the input dtype; the result is cast back to the input dtype.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp

from alignq_jax.methods.base import CONV_INPUT, QuantMethod


def _float32(x) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"AbsMax needs a floating-point tensor; got dtype {x.dtype}")
    return x.astype(jnp.float32)


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(
            f"absmax: bits must be an int in 2..8 (at 1 bit the symmetric narrow grid, Q_P = 2^0 - 1 = 0, has only "
            f"the level 0); got {bits!r}"
        )
    return bits


def _check_percentile(percentile):
    if percentile is None:
        return None
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)):
        raise ValueError(f"absmax: percentile must be None or a number in (0, 100]; got {percentile!r}")
    if not (math.isfinite(percentile) and 0 < percentile <= 100):
        raise ValueError(f"absmax: percentile must be None or a number in (0, 100]; got {percentile!r}")
    return float(percentile)


def _percentile_last_axis(a, percentile: float) -> jax.Array:
    """The ``percentile`` of a (..., N) along its last axis, linearly interpolated as numpy's default.

    The position p/100 * (N - 1) is computed in float64 from the static N (jnp.percentile forms it in float32,
    up to 2e-5 relative off at 99.99), and only the top N - floor(position) values are selected (top_k), not a
    full sort. Returns a's shape without the last axis.
    """
    n = a.shape[-1]
    pos = percentile / 100.0 * (n - 1)
    lo = min(math.floor(pos), n - 1)
    frac = pos - lo
    top = jax.lax.top_k(a, n - lo)[0]  # descending: top[..., -1] is the value at rank lo, top[..., -2] at lo + 1
    low = top[..., -1]
    if frac == 0.0:
        return low
    return low + (top[..., -2] - low) * jnp.float32(frac)


def weight_range(w, *, per_channel: bool = False, percentile: float | None = None) -> jax.Array:
    """r = max|w| (or the ``percentile`` of |w|, linear interpolation as numpy), no gradient, float32.

    Args:
      w: any shape with the output channel last; per_channel needs at least 1 axis.
    Returns: () per tensor, or (C,) = (w.shape[-1],) per channel (over every axis but the last).
    """
    percentile = _check_percentile(percentile)
    a = jnp.abs(_float32(w))
    if per_channel:
        if a.ndim < 1:
            raise ValueError(f"absmax: per_channel needs a kernel with an output-channel axis; got shape {a.shape}")
        a = a.reshape(-1, a.shape[-1]).T  # (C, elements per channel)
    else:
        a = a.reshape(-1)
    r = jnp.max(a, axis=-1) if percentile is None else _percentile_last_axis(a, percentile)
    return jax.lax.stop_gradient(r)


def activation_range(x, *, percentile: float | None = None) -> jax.Array:
    """This batch's range: max(x) (or the ``percentile`` of x over all its elements), () float32, no gradient.

    Args:
      x: (B, ..., C), any float dtype.
    """
    percentile = _check_percentile(percentile)
    x = _float32(x).reshape(-1)
    r = jnp.max(x) if percentile is None else _percentile_last_axis(x, percentile)
    return jax.lax.stop_gradient(r)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _grid(v, r, low, n):
    """(r/n) * round(clip(v, low*r, r) * n/r), 0 where r <= 0; r broadcasts against v."""
    ok = r > 0
    safe = jnp.where(ok, r, 1.0)
    code = jnp.round(jnp.clip(v, low * safe, safe) * (n / safe))
    # r * (1/n), not r / n: under jit XLA turns a division by the constant n into a multiply by its reciprocal,
    # eagerly it divides, 1 ulp apart; written as the multiply, jit and eager give the same bits.
    return jnp.where(ok, code * (safe * (1.0 / n)), 0.0)


def _grid_fwd(v, r, low, n):
    return _grid(v, r, low, n), (v, r)


def _grid_bwd(low, n, res, g):
    v, r = res
    inside = (v >= low * r) & (v <= r)
    return jnp.where(inside, g, 0.0), jnp.zeros_like(r)


_grid.defvjp(_grid_fwd, _grid_bwd)


def absmax_weight(w, bits: int, *, per_channel: bool = False, percentile: float | None = None) -> jax.Array:
    """Symmetric narrow-range weights: (r/Q_P) * round(clip(w, -r, r) * Q_P/r), Q_P = 2^(k-1) - 1, r = weight_range.

    Args:
      w: any shape, output channel last; any float dtype.
      bits: 2..8.
    Returns: w's shape and dtype (computed in float32); 2^k - 1 levels per tensor (per channel). Gradient 1 where
    |w| <= r, else 0; 0 everywhere in a tensor/channel whose range is 0, except at w = 0 exactly.
    """
    bits = _check_bits(bits)
    w = jnp.asarray(w)
    r = weight_range(w, per_channel=per_channel, percentile=percentile)
    return _grid(_float32(w), r, -1.0, float(2 ** (bits - 1) - 1)).astype(w.dtype)


def absmax_activation(x, value_range, bits: int) -> jax.Array:
    """Unsigned activations: (r/n) * round(clip(x, 0, r) * n/r), n = 2^k - 1, r = ``value_range``.

    Args:
      x: any shape, any float dtype.
      value_range: () the range r (a running statistic; no gradient). r <= 0 gives 0 everywhere.
      bits: 2..8.
    Returns: x's shape and dtype (computed in float32); 2^k levels. Gradient 1 where 0 <= x <= r, else 0.
    """
    bits = _check_bits(bits)
    r = jax.lax.stop_gradient(jnp.asarray(value_range, jnp.float32))
    if r.shape != ():
        raise ValueError(f"absmax: the activation range must be a scalar; got shape {r.shape}")
    x = jnp.asarray(x)
    return _grid(_float32(x), r, 0.0, float(2**bits - 1)).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class AbsMax(QuantMethod):
    """Uniform quantization scaled from the tensor's absolute max or a percentile; nothing learned.

    Weights: symmetric narrow-range grid, scale = r / (2^(k-1) - 1), r = max|w| or the ``percentile`` of |w|, per
    tensor or per output channel (last axis); 2^k - 1 levels. Activations (the input of a conv): unsigned grid
    on [0, r] with 2^k levels, r = the running average of ``activation_batch_stats``'s "range" (max(x), or the
    ``percentile`` of x over the batch), per tensor. Straight-through gradient inside the range (ends included),
    0 outside; no gradient to the range. Bits 2..8 (1 bit raises ValueError). Details: this module's docstring.

    Fields:
      per_channel: one weight scale per output channel (the kernel's last axis) instead of one per tensor.
      percentile: None for the absolute max; else a percentile in (0, 100] (e.g. 99.99) of |w| for weights and of
        x for activations, linearly interpolated as numpy's default (a top-k selection: costlier than the max
        on large activations; jit may fuse the interpolation's multiply-add, so a jitted range can be 1 ulp
        off an eager one).
    """

    name: ClassVar[str] = "absmax"
    placement: ClassVar[str] = CONV_INPUT
    activation_stats: ClassVar[tuple[str, ...]] = ("range",)

    per_channel: bool = False
    percentile: float | None = None

    def __post_init__(self):
        if not isinstance(self.per_channel, bool):
            raise ValueError(f"absmax: per_channel must be True or False; got {self.per_channel!r}")
        _check_percentile(self.percentile)

    def check_bits(self, bits: int) -> None:
        """Raises ValueError unless bits is an int in 2..8 (1 bit: the narrow signed grid has only 0)."""
        _check_bits(bits)

    def quantize_weight(self, params: dict, w, bits: int) -> jax.Array:
        """w: any shape, output channel last; returns its shape and dtype. ``params`` is empty."""
        return absmax_weight(w, bits, per_channel=self.per_channel, percentile=self.percentile)

    def activation_batch_stats(self, x, bits: int) -> dict[str, jax.Array]:
        """{"range": () float32}: max(x), or the percentile of x, over the whole batch x (B, ..., C)."""
        _check_bits(bits)
        return {"range": activation_range(x, percentile=self.percentile)}

    def reduce_activation_stats(self, stats: dict, axis_name: str) -> dict:
        """The global batch's range from the per-device ones: the max of maxima is exact (so 1 device == N
        devices); a percentile does not combine, so per-device percentiles are averaged (an approximation)."""
        if self.percentile is None:
            return jax.lax.pmax(stats, axis_name)
        return jax.lax.pmean(stats, axis_name)

    def quantize_activation(self, params: dict, x, bits: int) -> jax.Array:
        """x: (B, ..., C); ``params["range"]``: () the batch's (training) or running (evaluation) range."""
        return absmax_activation(x, params["range"], bits)
