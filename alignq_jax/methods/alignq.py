"""AlignQ (Gaussian-CDF alignment) and the paper's own uniform baseline as methods (docs/method.md §1, §2, §9).

Both quantize a layer's kernel per tensor and the BatchNorm output before the ReLU (placement ``BN_OUTPUT``), learn
nothing, and wrap the pure functions of ``alignq_jax.quantizers`` unchanged, so their numerics are those functions'.
They also give what the correlation term and the fused BatchNorm need: the activation quantizer with a per-channel
affine folded in, and the unrounded transform the correlation gap compares against.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from alignq_jax import quantizers as _q
from alignq_jax.methods.base import BN_OUTPUT, QuantMethod


@dataclasses.dataclass(frozen=True)
class BNOutputMethod(QuantMethod):
    """A method quantizing the BatchNorm output (before the ReLU) with a fixed grid on (-A, A).

    Fields:
      levels: "exact" (k bits = at most 2^k values) or "paper" (the official grid, about one bit more).
      act_range: A, the activation grid's range (-A, A); official 2.0.
      stop_stats_grad: treat the weight mean/std as constants in the gradient (official: False; AlignQ only).
      surrogate: None (straight-through rounding) or (lam, lam2), the paper's soft-step weight gradient (opt-in).
    """

    placement: ClassVar[str] = BN_OUTPUT
    levels: str = "exact"
    act_range: float = 2.0
    stop_stats_grad: bool = False
    surrogate: tuple[float, float] | None = None

    def __post_init__(self):
        _q.check_levels(self.levels)
        object.__setattr__(self, "act_range", _q.check_act_range(self.act_range))
        if self.surrogate is not None:
            object.__setattr__(self, "surrogate", _q._check_surrogate(self.surrogate))

    @property
    def _pair(self) -> _q.QuantizerPair:
        return _q.get_quantizers(self.name)

    def quantize_weight(self, params, w, bits):
        return self._pair.weight(w, bits, levels=self.levels, stop_stats_grad=self.stop_stats_grad,
                                 surrogate=self.surrogate)

    def quantize_activation(self, params, x, bits, relu=False):
        """Q(x) on the (-A, A) grid; ``relu`` fuses the ReLU that follows (unsigned grid in exact mode)."""
        return self._pair.activation(x, bits, act_range=self.act_range, levels=self.levels, relu=relu)

    def quantize_activation_affine(self, h, scale, shift, bits, relu=False):
        """``quantize_activation(h * scale + shift)`` with a per-channel (C,) scale and shift folded in."""
        return self._pair.activation_affine(h, scale, shift, bits, act_range=self.act_range, levels=self.levels,
                                            relu=relu)

    def align_activation(self, x):
        """The unrounded transform of x the correlation gap compares against (docs/method.md §4)."""
        return self._pair.align_activation(x, self.act_range)


@dataclasses.dataclass(frozen=True)
class AlignQ(BNOutputMethod):
    """AlignQ: weights standardised and mapped through the Gaussian CDF, then rounded; activations through the
    Gaussian CDF on (-A, A) (docs/method.md §1, §2). Chen, Yang and Chen, CVPR 2022."""

    name: ClassVar[str] = "alignq"


@dataclasses.dataclass(frozen=True)
class Uniform(BNOutputMethod):
    """The paper's uniform baseline: the same grids and placement as AlignQ without the CDF alignment and without
    a scale (docs/method.md §9). It is the paper's ablation row, not a fair production baseline (see ``absmax``)."""

    name: ClassVar[str] = "uniform"
