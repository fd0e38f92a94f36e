"""PACT: Parameterized Clipping Activation (Choi, Wang, Venkataramani, Chuang, Srinivasan, Gopalakrishnan, 2018,
"PACT: Parameterized Clipping Activation for Quantized Neural Networks", arXiv:1805.06085).

Activations (the non-negative input of a conv), with a learned clip alpha per quantized activation:

    y   = clip(x, 0, alpha)                                          (eq. 1)
    y_q = round(y * n / alpha) * alpha / n,   n = 2^k - 1             (eq. 2)

2^k levels alpha*j/n, j = 0..n. Gradients (straight-through estimator on the rounding, eq. 3):

    d y_q / d x     = 1 if 0 <= x < alpha, else 0
    d y_q / d alpha = 1 if x >= alpha, else 0

alpha starts at ``alpha_init``: 10.0, the paper's initial value, whatever the data; or ``"mse"``, the clip that
minimises the quantization MSE of the first batch (``alignq_jax.methods.base.mse_clip``; at 2 bits the constant 10
sends over 90% of the positive values of ReLU(N(0, 1)) to the zero level, a poor start for short fine-tuning).
The paper's L2 regularisation of alpha is not part of the quantizer: alpha is an ordinary parameter of the layer,
so the optimizer's weight decay (SGD with L2, as the training loop applies to every parameter) is that L2 term.

Weights: PACT quantizes weights with DoReFa-Net's scheme (Zhou et al., 2016, "DoReFa-Net: Training Low Bitwidth
Convolutional Neural Networks with Low Bitwidth Gradients"): :func:`dorefa_weight`.

Alpha positivity: alpha is a free parameter of the optimizer (and weight decay pulls it toward 0). The quantizer
uses max(alpha, ``MIN_ALPHA``): alpha <= 0 would divide by zero or invert the clip. The floor keeps values and
gradients finite; alpha's gradient is passed to alpha unchanged, so training can move it back up.

Everything is computed in float32 whatever the input dtype; the result is cast back to the input dtype.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp

from alignq_jax.methods.base import CONV_INPUT, MSE_INIT, QuantMethod, check_clip_init, mse_clip
from alignq_jax.quantizers import ste_round

MIN_ALPHA = 1e-12  # floor on alpha in the forward (see the module docstring)


def _float32(x) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"PACT needs a floating-point tensor; got dtype {x.dtype}")
    return x.astype(jnp.float32)


def _binary_value(w):
    return jnp.mean(jnp.abs(w)) * jnp.where(w >= 0, 1.0, -1.0)


@jax.custom_vjp
def _binary(w):
    """mean|w| * sign(w), sign(0) = +1 (two levels); gradient the identity (DoReFa's dc/dw = dc/dw_q: the mean
    is a constant and not a factor of the gradient)."""
    return _binary_value(w)


_binary.defvjp(lambda w: (_binary_value(w), None), lambda _, g: (g,))


def dorefa_weight(w, bits: int) -> jax.Array:
    """DoReFa-Net weight quantizer (Zhou et al., 2016), as PACT uses it for weights.

    k >= 2: w_q = 2 * quant_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1, quant_k(r) = round((2^k - 1) r) / (2^k - 1):
    the 2^k levels 2j/n - 1, j = 0..n, on [-1, 1] (no zero level). Gradient: straight-through on the rounding,
    exact through tanh and through the max (as DoReFa's chain rule differentiates it).
    k = 1 (DoReFa's binary weights): w_q = mean(|w|) * sign(w), w = 0 mapping to +mean(|w|) (exactly 2 levels);
    gradient the identity (DoReFa's dc/dw = dc/dw_q).
    An all-zero tensor (max|tanh w| = 0) has no defined ratio tanh(w)/max|tanh w|: it is taken as 0, giving every
    weight the grid value nearest the middle (1/n: n/2 is a tie that rounds to the even code (n+1)/2), with zero
    gradient (k >= 2); at k = 1 the output is 0 with the identity gradient. Same values and gradients as
    ``alignq_jax.methods.dorefa``'s weights.

    Args:
      w: any shape, any float dtype; max and mean over the whole tensor.
      bits: 1..8.
    Returns: w's shape and dtype (computed in float32).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"dorefa_weight: bits must be an int in 1..8; got {bits!r}")
    w = jnp.asarray(w)
    w32 = _float32(w)
    if bits == 1:
        return _binary(w32).astype(w.dtype)
    t = jnp.tanh(w32)
    m = jnp.max(jnp.abs(t))
    zero = m == 0  # a NaN in w makes m NaN (not 0), so the NaN propagates
    ratio = jnp.where(zero, 0.0, t / jnp.where(zero, 1.0, m))
    n = 2.0**bits - 1.0
    # (2j - n)/n rather than 2j/n - 1: one rounding, so jit (which may fuse a multiply-add) gives the same value.
    return ((2.0 * ste_round(n * (0.5 * ratio + 0.5)) - n) / n).astype(w.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pact(x, alpha, bits):
    a = jnp.maximum(alpha, MIN_ALPHA)
    n = 2.0**bits - 1.0
    code = jnp.round(jnp.clip(x, 0.0, a) * (n / a))
    # alpha * (1/n), not alpha / n: under jit XLA turns a division by the constant n into a multiply by its
    # reciprocal, eagerly it divides, 1 ulp apart; written as the multiply, jit and eager give the same bits.
    return code * (a * (1.0 / n))


def _pact_fwd(x, alpha, bits):
    return _pact(x, alpha, bits), (x, alpha)


def _pact_bwd(bits, res, g):
    x, alpha = res
    a = jnp.maximum(alpha, MIN_ALPHA)  # the floor is passed straight through to alpha
    return jnp.where((x >= 0) & (x < a), g, 0.0), jnp.sum(jnp.where(x >= a, g, 0.0))


_pact.defvjp(_pact_fwd, _pact_bwd)


def pact_activation(x, alpha, bits: int) -> jax.Array:
    """PACT's quantized clip: round(clip(x, 0, a) * n/a) * a/n, a = max(alpha, MIN_ALPHA), n = 2^k - 1.

    Args:
      x: any shape (the input of a conv), any float dtype.
      alpha: () the learned clip (float32).
      bits: 1..8.
    Returns: x's shape and dtype (computed in float32). Gradients: x: 1 on [0, alpha), else 0; alpha: 1 where
    x >= alpha, else 0 (summed over x).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"pact_activation: bits must be an int in 1..8; got {bits!r}")
    alpha = jnp.asarray(alpha, jnp.float32)
    if alpha.shape != ():
        raise ValueError(f"PACT alpha must be a scalar (one clip per activation); got shape {alpha.shape}")
    x = jnp.asarray(x)
    return _pact(_float32(x), alpha, bits).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class PACT(QuantMethod):
    """PACT (Choi et al., 2018, "PACT: Parameterized Clipping Activation for Quantized Neural Networks").

    Activations (the input of a conv): round(clip(x, 0, alpha) * n/alpha) * alpha/n, n = 2^k - 1, 2^k levels on
    [0, alpha]; one learned scalar ``params["alpha"]`` per quantized activation, initialised to ``alpha_init``
    (the data is not used), gradient 1 where x >= alpha (straight-through); input gradient 1 on [0, alpha).
    L2 on alpha: the optimizer's weight decay. Weights: DoReFa's tanh-normalised quantizer
    (:func:`dorefa_weight`), no learned weight parameters. Bits 1..8. Details: this module's docstring.

    Fields:
      alpha_init: the initial clip: a number > 0 (the paper starts at 10, whatever the data) or "mse" (the clip
        minimising the quantization MSE of the first batch the layer sees).
    """

    name: ClassVar[str] = "pact"
    placement: ClassVar[str] = CONV_INPUT
    activation_params: ClassVar[tuple[str, ...]] = ("alpha",)

    alpha_init: float | str = 10.0

    def __post_init__(self):
        check_clip_init("pact", "alpha_init", self.alpha_init)

    def quantize_weight(self, params: dict, w, bits: int) -> jax.Array:
        """w: any shape (kernel); DoReFa weights, returns w's shape and dtype. ``params`` is empty."""
        self.check_bits(bits)
        return dorefa_weight(w, bits)

    def init_activation(self, x, bits: int) -> dict[str, jax.Array]:
        """{"alpha": () float32}: alpha_init, or with "mse" the MSE-optimal clip of x (the first batch)."""
        self.check_bits(bits)
        x = _float32(x)
        if self.alpha_init == MSE_INIT:
            return {"alpha": mse_clip(x, lambda c: _pact(x, c, bits))}
        return {"alpha": jnp.asarray(self.alpha_init, jnp.float32)}

    def quantize_activation(self, params: dict, x, bits: int) -> jax.Array:
        """x: any shape (B, ..., C); returns its shape and dtype."""
        self.check_bits(bits)
        return pact_activation(x, params["alpha"], bits)
