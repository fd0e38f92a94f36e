"""Quantization methods by name: AlignQ, the paper's uniform baseline and the published baselines.

``get_method(name, **options)`` builds a method (a frozen config with pure functions, see
``alignq_jax.methods.base.QuantMethod``); ``METHODS`` maps every name to its class.
"""

from __future__ import annotations

from alignq_jax.methods.absmax import AbsMax
from alignq_jax.methods.alignq import AlignQ, BNOutputMethod, Uniform
from alignq_jax.methods.apot import APoT
from alignq_jax.methods.base import BN_OUTPUT, CONV_INPUT, MSE_INIT, PLACEMENTS, QuantMethod, mse_clip
from alignq_jax.methods.dorefa import DoReFa
from alignq_jax.methods.lsq import LSQ
from alignq_jax.methods.pact import PACT

METHODS: dict[str, type[QuantMethod]] = {
    cls.name: cls for cls in (AlignQ, Uniform, AbsMax, LSQ, PACT, DoReFa, APoT)
}


def get_method(name: str, **options) -> QuantMethod:
    """The method called ``name`` with its options (dataclass fields), e.g. ``get_method("lsq")``."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"method must be one of {tuple(METHODS)}; got {name!r}") from None
    return cls(**options)


__all__ = [
    "APoT", "AbsMax", "AlignQ", "BNOutputMethod", "DoReFa", "LSQ", "PACT", "BN_OUTPUT", "CONV_INPUT", "METHODS",
    "MSE_INIT", "PLACEMENTS", "QuantMethod", "Uniform", "get_method", "mse_clip",
]
