"""DoReFa: Zhou, Wu, Ni, Zhou, Wen, Zou, 2016, "DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with
Low Bitwidth Gradients" (arXiv:1606.06160). Weights and activations as the paper quantizes them; no learned
parameters, no running statistics.

With n = 2^k - 1 and quantize_k(r) = round(n * r) / n (round half to even), straight-through (identity gradient):

* weights, k >= 2 (the paper's f_w^k):
      w_q = 2 * quantize_k(tanh(w) / (2 * M) + 1/2) - 1,   M = max |tanh(w)| over the whole kernel.
  Grid: 2j/n - 1, j = 0..n, i.e. 2^k levels on [-1, 1] (no zero level). Gradient: rounding straight-through,
  tanh and M differentiated exactly, as the paper's chain rule does: M is NOT treated as a constant, so the
  elements where |tanh(w)| is largest also receive -sign * (1 - tanh^2) * sum_i(g_i * tanh(w_i)) / M^2.
  A kernel with M = 0 (every weight 0) has no defined ratio: it is mapped to the grid value nearest the middle,
  2 * round(n / 2) / n - 1 (= 1/n: n/2 is a tie and rounds to the even code (n+1)/2), with zero gradient (as
  ``alignq_weight`` treats a constant kernel); initialise quantized kernels with a non-constant initialiser.
* weights, k = 1 (the paper's binary weights): w_q = E * sign(w), E = mean |w| over the kernel, a constant in the
  gradient; sign(0) = +1, so the grid is exactly {-E, +E} (2 levels). Gradient: the paper's
  dc/dw = dc/dw_q (identity, not scaled by E).
* activations (the input of a conv, normally post-ReLU): x_q = quantize_k(clip(x, 0, 1)); grid j/n, j = 0..n
  (2^k levels on [0, 1]). Gradient: 1 where 0 <= x <= 1 (both ends included), 0 outside. The paper bounds
  activations to [0, 1] before quantizing them; values above 1 saturate, so the network's BatchNorm scale decides
  how much of [0, 1] a layer uses.

Bits: 1..8 all defined. Placement: ``CONV_INPUT``. The weight output is in [-1, 1] whatever the kernel's scale
(the following BatchNorm absorbs it), as in the paper. Everything is computed in float32 whatever the input dtype;
the result is cast back to the input dtype.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp

from alignq_jax.methods.base import CONV_INPUT, QuantMethod


def _float32(x) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"DoReFa needs a floating-point tensor; got dtype {x.dtype}")
    return x.astype(jnp.float32)


def _check_no_params(params) -> None:
    if params:
        raise ValueError(f"DoReFa learns no parameters; params must be empty, got keys {sorted(params)}")


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def quantize_k(r, bits: int):
    """The paper's quantize_k(r) = round((2^k - 1) r) / (2^k - 1) (half to even), gradient exactly the identity
    (straight-through). r: any shape, float32, in [0, 1]. Returns r's shape."""
    n = 2.0**bits - 1.0
    return jnp.round(n * r) / n


quantize_k.defvjp(lambda r, bits: (quantize_k(r, bits), None), lambda bits, _, g: (g,))


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _weight_grid(u, bits: int):
    """2 * quantize_k(u) - 1, written as (2 * round(n u) - n) / n: one rounding of exact integers, so a fused
    multiply-add under jit cannot change the last bit. Gradient exactly 2 (straight-through)."""
    n = 2.0**bits - 1.0
    return (2.0 * jnp.round(n * u) - n) / n


_weight_grid.defvjp(lambda u, bits: (_weight_grid(u, bits), None), lambda bits, _, g: (2.0 * g,))


def _binary_weight_value(w):
    return jnp.mean(jnp.abs(w)) * jnp.where(w >= 0, 1.0, -1.0).astype(w.dtype)


@jax.custom_vjp
def _binary_weight(w):
    """E * sign(w), E = mean|w|, sign(0) = +1; gradient identity (E constant, and not a factor of the gradient)."""
    return _binary_weight_value(w)


_binary_weight.defvjp(lambda w: (_binary_weight_value(w), None), lambda _, g: (g,))


def dorefa_weight(w, bits: int) -> jax.Array:
    """DoReFa weight quantizer (see the module docstring), per kernel.

    Args:
      w: kernel of any shape (float32 compute).
      bits: 1..8 (validated by the caller).
    Returns: float32 array of w's shape; values 2j/n - 1 (k >= 2) or +-mean|w| (k = 1).
    """
    if bits == 1:
        return _binary_weight(w)
    t = jnp.tanh(w)
    m = jnp.max(jnp.abs(t))
    # M = 0 only when every tanh(w) is 0: use ratio 0 there (and a safe divisor, so no 0/0 in value or gradient).
    # A NaN in w makes M NaN, which is not == 0, so the NaN propagates.
    zero = m == 0
    ratio = jnp.where(zero, 0.0, t / jnp.where(zero, 1.0, m))
    return _weight_grid(0.5 * ratio + 0.5, bits)


@jax.custom_vjp
def _clipped_activation_grad(x):
    """clip(x, 0, 1) forward; gradient 1 on the closed interval [0, 1], 0 outside (jnp.clip gives 1/2 at the ends)."""
    return jnp.clip(x, 0.0, 1.0)


_clipped_activation_grad.defvjp(
    lambda x: (jnp.clip(x, 0.0, 1.0), x),
    lambda x, g: (jnp.where((x >= 0.0) & (x <= 1.0), g, jnp.zeros_like(g)),),
)


def dorefa_activation(x, bits: int) -> jax.Array:
    """DoReFa activation quantizer quantize_k(clip(x, 0, 1)). x: any shape (float32). Returns float32, x's shape."""
    return quantize_k(_clipped_activation_grad(x), bits)


@dataclasses.dataclass(frozen=True)
class DoReFa(QuantMethod):
    """DoReFa-Net (Zhou et al., 2016): tanh-normalised weights on 2^k levels of [-1, 1] (E*sign at 1 bit) and
    activations clipped to [0, 1] on 2^k levels; no learned parameters. Formulas, gradients and the zero-kernel
    convention in the module docstring of ``alignq_jax.methods.dorefa``."""

    name: ClassVar[str] = "dorefa"
    placement: ClassVar[str] = CONV_INPUT

    def init_weight(self, w, bits: int) -> dict[str, jax.Array]:
        """No learned weight parameters: {}."""
        self.check_bits(bits)
        return {}

    def quantize_weight(self, params: dict, w, bits: int) -> jax.Array:
        """w: kernel, any shape (output channel last; the statistic M or E is per kernel). Returns w's shape/dtype."""
        self.check_bits(bits)
        _check_no_params(params)
        w = jnp.asarray(w)
        return dorefa_weight(_float32(w), bits).astype(w.dtype)

    def init_activation(self, x, bits: int) -> dict[str, jax.Array]:
        """No learned activation parameters: {}."""
        self.check_bits(bits)
        return {}

    def quantize_activation(self, params: dict, x, bits: int) -> jax.Array:
        """x: (B, ..., C) conv input. Returns x's shape and dtype, values j/n in [0, 1]."""
        self.check_bits(bits)
        _check_no_params(params)
        x = jnp.asarray(x)
        return dorefa_activation(_float32(x), bits).astype(x.dtype)
