"""The quantization-method interface: a frozen config with pure functions, optax-style.

A method says how a kernel and an activation are quantized, which parameters it learns (initialised from the tensor
they quantize, trained by the optimizer as Flax params of the layer that uses them), which running statistics it
keeps (as BatchNorm keeps its moments, in "batch_stats"), and where its activation quantizer sits in a network
(``placement``). The Flax layers in ``alignq_jax.quantize`` call these functions; a method holds no Flax state.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

BN_OUTPUT = "bn_output"  # after BatchNorm, before the ReLU (AlignQ, the paper's uniform)
CONV_INPUT = "conv_input"  # on the (non-negative) input of every conv that follows a ReLU (LSQ, PACT, DoReFa, ...)
PLACEMENTS = (BN_OUTPUT, CONV_INPUT)


@dataclasses.dataclass(frozen=True)
class QuantMethod:
    """Base of every method. Subclasses are frozen dataclasses whose fields are the method's options.

    Class attributes:
      name: the registry name ("alignq", "lsq", ...).
      placement: ``BN_OUTPUT`` or ``CONV_INPUT`` (see the module docstring).
      weight_params / activation_params: names of the learned parameters ``init_weight`` / ``init_activation``
        return (empty: nothing learned).
      activation_stats: names of running statistics ``activation_batch_stats`` returns (kept like BN moments).

    Contract: kernels have the output channel on the last axis; ``bits`` is a Python int 1..8 (full precision
    never reaches a method); results have the input's shape and dtype, computed in float32.
    """

    name: ClassVar[str] = ""
    placement: ClassVar[str] = CONV_INPUT
    weight_params: ClassVar[tuple[str, ...]] = ()
    activation_params: ClassVar[tuple[str, ...]] = ()
    activation_stats: ClassVar[tuple[str, ...]] = ()

    def check_bits(self, bits: int) -> None:
        """Raises ValueError for a bit-width this method does not define (default: 1..8 are all defined)."""
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"{self.name}: bits must be an int in 1..8; got {bits!r}")

    def init_weight(self, w: jax.Array, bits: int) -> dict[str, jax.Array]:
        """Learned weight-quantizer parameters initialised from the kernel ``w``."""
        return {}

    def quantize_weight(self, params: dict, w: jax.Array, bits: int) -> jax.Array:
        raise NotImplementedError

    def init_activation(self, x: jax.Array, bits: int) -> dict[str, jax.Array]:
        """Learned activation-quantizer parameters initialised from the first batch ``x`` the layer sees."""
        return {}

    def activation_batch_stats(self, x: jax.Array, bits: int) -> dict[str, jax.Array]:
        """This batch's values of the running statistics named in ``activation_stats``."""
        return {}

    def quantize_activation(self, params: dict, x: jax.Array, bits: int) -> jax.Array:
        raise NotImplementedError

    def reduce_activation_stats(self, stats: dict, axis_name: str) -> dict:
        """This batch's statistics combined over the devices of ``axis_name`` (data parallel); default: the mean."""
        return jax.lax.pmean(stats, axis_name)


# A learned clip can start from a constant (the papers' rule) or from the data: MSE_INIT names the second option.
MSE_INIT = "mse"
MSE_CANDIDATES = 100


def check_clip_init(method: str, field: str, value) -> None:
    """Raises ValueError unless ``value`` is a positive finite number or ``MSE_INIT``."""
    import math

    if value == MSE_INIT and isinstance(value, str):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{method}: {field} must be a positive finite number or {MSE_INIT!r}; got {value!r}")


def mse_clip(x, quantize, target=None, candidates: int = MSE_CANDIDATES) -> jax.Array:
    """The clip c = max|x| * j / candidates (j = 1..candidates) that minimises mean((quantize(c) - target)^2).

    A data-driven start for a learned clip: at 2 bits the papers' constant clips (PACT 10, APoT 8 on activations,
    APoT 3 standard deviations on weights) round most BatchNorm-scaled values to 0. Ties go to the smaller
    clip. An all-zero ``x`` (every clip is exact) gives 1.

    Args:
      x: the tensor whose range sets the candidates (float32).
      quantize: c -> the quantized tensor at clip c (a float32 scalar), the method's own quantizer.
      target: what the quantized tensor should approximate (default: x).
      candidates: number of candidate clips.
    Returns: a float32 scalar.
    """
    import jax.numpy as jnp

    target = x if target is None else target
    top = jnp.max(jnp.abs(x)).astype(jnp.float32)
    clips = top * jnp.arange(1, candidates + 1, dtype=jnp.float32) / candidates
    # One candidate at a time (lax.map), so memory stays at one copy of x whatever the number of candidates.
    errors = jax.lax.map(lambda c: jnp.mean(jnp.square(quantize(c) - target)), clips)
    best = clips[jnp.argmin(errors)]
    return jax.lax.stop_gradient(jnp.where(top > 0, best, 1.0))
