"""LSQ: Learned Step Size Quantization (Esser, McKinstry, Bablani, Appuswamy, Modha, 2020, ICLR).

A tensor v is quantized with a learned step s:

    v_q = s * round(clip(v / s, -Q_N, Q_P))

* weights: signed grid, Q_N = 2^(k-1), Q_P = 2^(k-1) - 1: the 2^k levels s*j, j = -Q_N..Q_P.
* activations (the non-negative input of a conv): unsigned grid, Q_N = 0, Q_P = 2^k - 1: the 2^k levels s*j,
  j = 0..Q_P; negative inputs clip to 0.

Gradients (the paper's eq. 3 for the step; straight-through estimator on the rounding):

    d v_q / d v = 1 if -Q_N < v/s < Q_P, else 0
    d v_q / d s = round(v/s) - v/s   if -Q_N < v/s < Q_P
                  -Q_N               if v/s <= -Q_N
                  Q_P                if v/s >= Q_P

and the step's gradient is multiplied by g = 1/sqrt(N * Q_P) (the paper's step size gradient scale), N = the
number of weights of the kernel for the weight step, the number of features of one sample (``x[0].size``) for the
activation step. The forward value does not depend on g.

Initialisation (from the tensor, as the paper does on the initial weights / the first batch of activations):
s = 2 * mean(|v|) / sqrt(Q_P).

Bits: 2..8. At 1 bit the signed weight grid has Q_P = 0: no positive level, an infinite gradient scale and a
division by zero in the init; the paper defines and evaluates none of it (it reports 2, 3, 4 and 8 bits), so
``check_bits`` raises ValueError for 1 bit (activations included, so one method has one set of valid bits).

Step positivity: the step is a free parameter of the optimizer. The quantizer divides by max(s, ``MIN_STEP``):
a step at or below zero (an all-zero init tensor gives s = 0; an optimizer overshoot can give s < 0) would
divide by zero or mirror the grid. The floor keeps values and gradients finite; the step's gradient is the
eq. 3 gradient evaluated at the floored step, passed to s unchanged, so training can move s back up. With the
init rule and the gradient scale, a trained step stays far above the floor in practice.

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

MIN_STEP = 1e-12  # floor on the step in the forward (see the module docstring)


def _float32(x) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"LSQ needs a floating-point tensor; got dtype {x.dtype}")
    return x.astype(jnp.float32)


def _check_step(step) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    if step.shape != ():
        raise ValueError(f"LSQ step must be a scalar (one step per tensor); got shape {step.shape}")
    return step


def weight_bounds(bits: int) -> tuple[int, int]:
    """(Q_N, Q_P) of the signed weight grid: (2^(k-1), 2^(k-1) - 1); k >= 2."""
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def activation_bounds(bits: int) -> tuple[int, int]:
    """(Q_N, Q_P) of the unsigned activation grid: (0, 2^k - 1)."""
    return 0, 2**bits - 1


def init_step(v, qp: int) -> jax.Array:
    """The paper's step init 2 * mean(|v|) / sqrt(Q_P), a float32 scalar, computed in float32.

    Args:
      v: any shape (a kernel, or the first batch of activations), any float dtype.
      qp: Q_P >= 1.
    Returns: () float32; 0 for an all-zero tensor (the quantizer then uses ``MIN_STEP``).
    """
    if qp < 1:
        raise ValueError(f"LSQ init needs Q_P >= 1; got {qp}")
    return jax.lax.stop_gradient(2.0 * jnp.mean(jnp.abs(_float32(v))) / math.sqrt(qp))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _lsq(v, step, qn, qp, grad_scale):
    s = jnp.maximum(step, MIN_STEP)
    return s * jnp.round(jnp.clip(v / s, -qn, qp))


def _lsq_fwd(v, step, qn, qp, grad_scale):
    return _lsq(v, step, qn, qp, grad_scale), (v, step)


def _lsq_bwd(qn, qp, grad_scale, res, g):
    v, step = res
    # Evaluated at the floored step and given to the raw step unchanged (the floor is passed straight through).
    r = v / jnp.maximum(step, MIN_STEP)
    low, high = r <= -qn, r >= qp
    inside = ~(low | high)
    ds_elem = jnp.where(inside, jnp.round(r) - r, jnp.where(low, -float(qn), float(qp)))
    return jnp.where(inside, g, 0.0), grad_scale * jnp.sum(g * ds_elem)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_quantize(v, step, qn: int, qp: int, grad_scale: float) -> jax.Array:
    """s * round(clip(v/s, -Q_N, Q_P)) with LSQ's gradients (module docstring), s = max(step, MIN_STEP).

    Args:
      v: any shape, any float dtype.
      step: () the learned step (float32).
      qn, qp: the grid bounds (Python ints, static).
      grad_scale: g, the factor on the step's gradient (Python float, static).
    Returns: v's shape and dtype (computed in float32). Gradients: v (straight-through inside the range),
    step (eq. 3 times g).
    """
    v = jnp.asarray(v)
    return _lsq(_float32(v), _check_step(step), int(qn), int(qp), float(grad_scale)).astype(v.dtype)


def _features_per_sample(x) -> int:
    shape = jnp.shape(x)
    if len(shape) < 2:
        raise ValueError(f"LSQ activations need a batch axis and features, shape (B, ..., C); got shape {shape}")
    return math.prod(shape[1:])


@dataclasses.dataclass(frozen=True)
class LSQ(QuantMethod):
    """Learned Step Size Quantization (Esser et al., 2020, "Learned Step Size Quantization", ICLR).

    Weights: s_w * round(clip(w/s_w, -2^(k-1), 2^(k-1) - 1)), 2^k levels. Activations (the input of a conv):
    s_a * round(clip(x/s_a, 0, 2^k - 1)), 2^k levels on [0, (2^k - 1) s_a]. One learned scalar step per kernel
    (``params["step"]``) and one per quantized activation; gradient of the step as eq. 3 of the paper, times
    1/sqrt(N*Q_P) (N: kernel size, or features per sample ``x[0].size``); input gradient straight-through inside
    the clip range, 0 outside. Init: 2*mean|v|/sqrt(Q_P) from the kernel / the first batch. Bits 2..8 (1 bit
    raises ValueError: Q_P would be 0 for weights). Details: this module's docstring.
    """

    name: ClassVar[str] = "lsq"
    placement: ClassVar[str] = CONV_INPUT
    weight_params: ClassVar[tuple[str, ...]] = ("step",)
    activation_params: ClassVar[tuple[str, ...]] = ("step",)

    def check_bits(self, bits: int) -> None:
        """Raises ValueError unless bits is an int in 2..8 (1 bit: the signed grid would have Q_P = 0)."""
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(
                f"lsq: bits must be an int in 2..8 (at 1 bit LSQ's signed weight grid has Q_P = 2^0 - 1 = 0, "
                f"which the paper does not define); got {bits!r}"
            )

    def init_weight(self, w, bits: int) -> dict[str, jax.Array]:
        """{"step": () float32} = 2*mean|w|/sqrt(2^(k-1) - 1)."""
        self.check_bits(bits)
        return {"step": init_step(w, weight_bounds(bits)[1])}

    def quantize_weight(self, params: dict, w, bits: int) -> jax.Array:
        """w: any shape (kernel); returns its shape and dtype. Step gradient scale 1/sqrt(w.size * Q_P)."""
        self.check_bits(bits)
        qn, qp = weight_bounds(bits)
        return lsq_quantize(w, params["step"], qn, qp, 1.0 / math.sqrt(jnp.size(w) * qp))

    def init_activation(self, x, bits: int) -> dict[str, jax.Array]:
        """{"step": () float32} = 2*mean|x|/sqrt(2^k - 1) over the whole batch x (B, ..., C)."""
        self.check_bits(bits)
        return {"step": init_step(x, activation_bounds(bits)[1])}

    def quantize_activation(self, params: dict, x, bits: int) -> jax.Array:
        """x: (B, ..., C); returns its shape and dtype. Step gradient scale 1/sqrt(x[0].size * Q_P)."""
        self.check_bits(bits)
        qn, qp = activation_bounds(bits)
        return lsq_quantize(x, params["step"], qn, qp, 1.0 / math.sqrt(_features_per_sample(x) * qp))
