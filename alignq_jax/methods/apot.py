"""APoT: Li, Dong, Wang, 2020 (ICLR), "Additive Powers-of-Two Quantization: An Efficient Non-uniform Discretization
for Neural Networks". Weights and activations are projected onto additive powers-of-two levels inside a learned
clipping threshold alpha, with the paper's reparameterised clipping function (RCF) and weight normalisation.

Level sets (:func:`apot_levels`, values in [0, 1] / [-1, 1], maximum 1):

* unsigned, b bits: the paper's additive set, b = k*n with base bit-width k = 2 and n = b/2 terms,
      { sum_{i=0}^{n-1} p_i },  p_i in {0, 2^-i, 2^-(i+n), 2^-(i+2n)},
  scaled so that the largest level is 1. The n terms use disjoint exponents, so the 4^n = 2^b sums are distinct:
  exactly 2^b levels. Odd b (3, 5) follow the authors' released construction (one extra 1-bit term, see
  :func:`apot_levels`), also exactly 2^b levels. b = 2 is plain powers of two {0, 1/4, 1/2, 1}; b = 1 is {0, 1}.
* signed, k bits (weights): one sign bit and the unsigned set of k - 1 bits for the magnitude, +-levels. The set
  is symmetric and 0 is shared, so k bits give 2^k - 1 levels, one fewer than 2^k. At k = 2 the magnitude set
  {0, 1} makes the ternary uniform grid {-1, 0, 1}, which is what APoT uses for 2-bit weights.

Quantizers (alpha > 0 learned, per tensor; projection = nearest level, a tie goes to the smaller magnitude):

* weights: z = (w - mean(w)) / std(w) over the whole kernel (unbiased std; mean and std are constants in the
  gradient, as APoT's weight normalisation), v = z / alpha, w_q = alpha * sign(v) * P_{k-1}(min(|v|, 1)).
  A constant kernel (std 0) standardises to z = 0 (zero gradient), as ``alignq_weight`` does.
  The output is on the standardised scale (|w_q| <= alpha), not the kernel's: the following BatchNorm absorbs it.
* activations (the input of a conv, normally post-ReLU): v = x / alpha, x_q = alpha * P_k(clip(v, 0, 1)).

Gradients: the RCF of the paper (its eq. for d w_q / d alpha, straight-through estimator for the projection), with
c the clipped v and q = P(c):

    d out / d x     = 1 where lo <= v <= 1 (lo = -1 for weights, 0 for activations), else 0
    d out / d alpha = q - v where lo <= v <= 1;  sign(v) outside (weights);  1 above, 0 below (activations)

i.e. alpha * (stop_gradient(q - c) + c) differentiated exactly; outside the range the derivative equals c
itself (+-1 for weights; 1 for activations above alpha, 0 for negative activations, whose output is 0 for
every alpha). For weights d/dw = d/dz / std. The interval ends belong to the inside (torch's clamp convention).

Initialisation: weight alpha = ``weight_alpha_init`` (the authors' 3.0, in standard deviations), activation
alpha = ``activation_alpha_init`` (the authors' 8.0), float32 scalars, whatever the data. Either can instead be
``"mse"``: the threshold minimising the quantization MSE of the tensor it first quantizes (the standardised kernel,
or the first batch; ``alignq_jax.methods.base.mse_clip``). At 2 bits the constants round most values to 0
(weights: every |z| < 1.5 standard deviations; activations: about 70% of the positive values of ReLU(N(0, 1))),
which short fine-tuning from an FP32 model does not recover from.

Alpha positivity: alpha is a free parameter of the optimizer. The forward divides by max(alpha, ``MIN_ALPHA``)
(a non-positive alpha would divide by zero or mirror the grid); the gradient is the one above evaluated at the
floored alpha and passed to alpha unchanged, so training can move it back up.

Bits: 2..6, the bit-widths at which the authors' released code builds level sets for both quantizers (activations
b = k, weights b = k - 1 magnitude bits; it builds unsigned sets of at most 6 bits). 1 bit leaves weights no
magnitude bit; 7 bits would need a 7-bit activation set, and 8-bit weights a 7-bit magnitude set, an odd width
beyond what the code constructs. ``check_bits`` raises ValueError outside 2..6.

Everything is computed in float32 whatever the input dtype; the result is cast back to the input dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from alignq_jax.methods.base import CONV_INPUT, MSE_INIT, QuantMethod, check_clip_init, mse_clip
from alignq_jax.quantizers import _standardise_per_tensor

ALLOWED_BITS = (2, 3, 4, 5, 6)
MIN_ALPHA = 1e-12  # floor on alpha in the forward (see the module docstring)


# --------------------------------------------------------------------------------------------------------------
# Level sets


def _unsigned_exponents(bits: int) -> list[list[int]]:
    """The exponents e (level term 2^-e) of each additive term of the unsigned b-bit set; each term is 0 or one of
    its 2^-e. Even b: k = 2, m = b/2 terms, term i has exponents i + 1 + j*m, j = 0..2 (the paper's p_i with
    n = m, times 1/2). Odd b = 2m + 1 (the authors' code): the m-term set of b - 1 bits with a 1-bit term
    inserted at exponent 2m + 1, the last round of exponents (2m + 1 .. 3m) shifted up by one. b = 1: one term
    {0, 2^-1}."""
    if bits == 1:
        return [[1]]
    m = bits // 2
    terms = [[i + 1 + j * m for j in range(3)] for i in range(m)]
    if bits % 2:
        terms = [[e + 1 if e > 2 * m else e for e in term] for term in terms] + [[2 * m + 1]]
    return terms


@functools.lru_cache(maxsize=None)
def _unsigned_levels(bits: int) -> tuple[float, ...]:
    terms = [[0.0] + [2.0**-e for e in term] for term in _unsigned_exponents(bits)]
    sums = sorted({sum(choice) for choice in itertools.product(*terms)})
    top = sums[-1]
    return tuple(s / top for s in sums)


def apot_levels(bits: int, signed: bool) -> np.ndarray:
    """The sorted APoT level set (float64) on [0, 1] (unsigned) or [-1, 1] (signed), maximum 1.

    Args:
      bits: unsigned: 1..6 (2^bits levels; 1 bit is {0, 1}, 2 bits {0, 1/4, 1/2, 1}, 3 bits
        {0, .1, .2, .3, .4, .6, .8, 1}). signed: 2..7, the sign bit included: +-(unsigned set of bits - 1),
        2^bits - 1 levels (0 is shared; 2 bits give {-1, 0, 1}).
      signed: the weight (signed) or activation (unsigned) set.
    Returns: (L,) float64, strictly increasing.
    Raises ValueError for bit-widths outside those ranges.
    """
    allowed = range(2, 8) if signed else range(1, 7)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        kind = "signed" if signed else "unsigned"
        span = f"{allowed.start}..{allowed.stop - 1}"
        raise ValueError(f"apot_levels: {kind} bits must be an int in {span}; got {bits!r}")
    if signed:
        mag = np.asarray(_unsigned_levels(bits - 1))
        return np.concatenate([-mag[:0:-1], mag])
    return np.asarray(_unsigned_levels(bits))


@functools.lru_cache(maxsize=None)
def _projection_table(bits: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(levels, midpoints) of the unsigned set as float32-representable floats: projection onto the nearest level
    counts the midpoints strictly below the value (a value exactly at a midpoint goes to the lower level)."""
    levels = np.asarray(_unsigned_levels(bits))
    mids = 0.5 * (levels[:-1] + levels[1:])
    return tuple(np.float32(levels).tolist()), tuple(np.float32(mids).tolist())


def _project_unsigned(c, bits: int):
    """Nearest level of the unsigned b-bit set for c in [0, 1] (float32), ties to the lower level; NaN stays NaN."""
    levels, mids = _projection_table(bits)
    # Counting midpoints is a chain of compares and adds that XLA fuses (at most 63 of them at 6 bits).
    idx = jnp.zeros(c.shape, jnp.int32)
    for t in mids:
        idx = idx + (c > t).astype(jnp.int32)
    q = jnp.take(jnp.asarray(levels, jnp.float32), idx)
    return jnp.where(jnp.isnan(c), c, q)


# --------------------------------------------------------------------------------------------------------------
# The RCF quantizer: alpha * P(clip(x / alpha)) with the paper's gradients


def _rcf_forward(x, alpha, bits, signed):
    """(alpha * q, v, q) with alpha floored at MIN_ALPHA, v = x / alpha, q = P(clip(v)) the projected level."""
    a = jnp.maximum(alpha, MIN_ALPHA)
    v = x / a
    if signed:
        c = jnp.clip(v, -1.0, 1.0)
        q = jnp.sign(c) * _project_unsigned(jnp.abs(c), bits - 1)
    else:
        q = _project_unsigned(jnp.clip(v, 0.0, 1.0), bits)
    return a * q, v, q


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rcf(x, alpha, bits, signed):
    return _rcf_forward(x, alpha, bits, signed)[0]


def _rcf_fwd(x, alpha, bits, signed):
    # Keep only x and alpha; the backward recomputes v and q (elementwise, cheap) instead of storing two more
    # activation-sized tensors.
    return _rcf_forward(x, alpha, bits, signed)[0], (x, alpha)


def _rcf_bwd(bits, signed, res, g):
    x, alpha = res
    _, v, q = _rcf_forward(x, alpha, bits, signed)
    inside = (v >= (-1.0 if signed else 0.0)) & (v <= 1.0)
    # Outside the range the derivative w.r.t. alpha is the clipped value itself, which is its own level there
    # (+-1 for weights; 1 above and 0 below the range for activations).
    d_alpha = jnp.where(inside, q - v, q)
    grad_x = jnp.where(inside, g, jnp.zeros_like(g))
    return grad_x, jnp.sum(g * d_alpha).astype(alpha.dtype)


_rcf.defvjp(_rcf_fwd, _rcf_bwd)


# --------------------------------------------------------------------------------------------------------------
# Public functions


def _float32(x) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"APoT needs a floating-point tensor; got dtype {x.dtype}")
    return x.astype(jnp.float32)


def _alpha(params) -> jax.Array:
    if set(params) != {"alpha"}:
        raise ValueError(f"APoT params must have exactly the key 'alpha'; got keys {sorted(params)}")
    alpha = jnp.asarray(params["alpha"], jnp.float32)
    if alpha.shape != ():
        raise ValueError(f"APoT alpha must be a scalar (one threshold per tensor); got shape {alpha.shape}")
    return alpha


def apot_weight(w, alpha, bits: int) -> jax.Array:
    """APoT weight quantizer: alpha * sign(v) * P_{bits-1}(min(|v|, 1)), v = standardised(w) / alpha.

    Args:
      w: kernel of any shape, at least 2 elements (float32); statistics over the whole kernel, held constant.
      alpha: float32 scalar clipping threshold, in standard deviations.
      bits: 2..6 including the sign bit (2^bits - 1 levels).
    Returns: float32 array of w's shape.
    """
    if jnp.size(w) < 2:
        raise ValueError(f"APoT weight normalisation uses an unbiased std and needs at least 2 elements; got {w.shape}")
    return _rcf(_standardise_per_tensor(w, stop_stats_grad=True), alpha, bits, True)


def apot_activation(x, alpha, bits: int) -> jax.Array:
    """APoT activation quantizer alpha * P_bits(clip(x / alpha, 0, 1)). x: any shape (float32); alpha: float32
    scalar. Returns float32 array of x's shape, 2^bits levels."""
    return _rcf(x, alpha, bits, False)


@dataclasses.dataclass(frozen=True)
class APoT(QuantMethod):
    """Additive Powers-of-Two quantization (Li, Dong, Wang, 2020): standardised weights and activations projected
    onto additive powers-of-two levels inside learned clipping thresholds, with the RCF gradient. Level sets,
    formulas, gradients and bit range in the module docstring of ``alignq_jax.methods.apot``.

    Fields:
      weight_alpha_init: initial weight threshold alpha (in standard deviations of the kernel): a number > 0
        (default 3.0, the authors') or "mse" (MSE-optimal for the kernel it first quantizes).
      activation_alpha_init: initial activation threshold alpha: a number > 0 (default 8.0, the authors') or "mse"
        (MSE-optimal for the first batch).
    """

    name: ClassVar[str] = "apot"
    placement: ClassVar[str] = CONV_INPUT
    weight_params: ClassVar[tuple[str, ...]] = ("alpha",)
    activation_params: ClassVar[tuple[str, ...]] = ("alpha",)

    weight_alpha_init: float | str = 3.0
    activation_alpha_init: float | str = 8.0

    def __post_init__(self):
        check_clip_init("apot", "weight_alpha_init", self.weight_alpha_init)
        check_clip_init("apot", "activation_alpha_init", self.activation_alpha_init)

    def check_bits(self, bits: int) -> None:
        """Raises ValueError unless bits is an int in 2..6 (the bit-widths APoT defines; module docstring)."""
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
            raise ValueError(
                f"apot: bits must be an int in 2..6 (1 bit leaves weights no magnitude bit; APoT defines no level "
                f"set beyond 6 bits); got {bits!r}"
            )

    def init_weight(self, w, bits: int) -> dict[str, jax.Array]:
        """{"alpha": () float32}: weight_alpha_init, or with "mse" the MSE-optimal threshold for w."""
        self.check_bits(bits)
        if self.weight_alpha_init == MSE_INIT:
            w = _float32(w)
            # The output is on the standardised scale, so the error is measured against the standardised kernel.
            z = _standardise_per_tensor(w, stop_stats_grad=True)
            return {"alpha": mse_clip(z, lambda c: apot_weight(w, c, bits))}
        return {"alpha": jnp.asarray(self.weight_alpha_init, jnp.float32)}

    def quantize_weight(self, params: dict, w, bits: int) -> jax.Array:
        """w: kernel, any shape (output channel last; statistics and alpha per kernel). Returns w's shape/dtype."""
        self.check_bits(bits)
        alpha = _alpha(params)
        w = jnp.asarray(w)
        return apot_weight(_float32(w), alpha, bits).astype(w.dtype)

    def init_activation(self, x, bits: int) -> dict[str, jax.Array]:
        """{"alpha": () float32}: activation_alpha_init, or with "mse" the MSE-optimal threshold for x."""
        self.check_bits(bits)
        if self.activation_alpha_init == MSE_INIT:
            x = _float32(x)
            return {"alpha": mse_clip(x, lambda c: apot_activation(x, c, bits))}
        return {"alpha": jnp.asarray(self.activation_alpha_init, jnp.float32)}

    def quantize_activation(self, params: dict, x, bits: int) -> jax.Array:
        """x: (B, ..., C) conv input. Returns x's shape and dtype, values alpha * (unsigned APoT level)."""
        self.check_bits(bits)
        alpha = _alpha(params)
        x = jnp.asarray(x)
        return apot_activation(_float32(x), alpha, bits).astype(x.dtype)
