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
