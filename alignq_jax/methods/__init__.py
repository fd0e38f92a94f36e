"""Quantization methods by name: AlignQ, the paper's uniform baseline and the published baselines."""

from alignq_jax.methods.base import BN_OUTPUT, CONV_INPUT, PLACEMENTS, QuantMethod

__all__ = ["BN_OUTPUT", "CONV_INPUT", "PLACEMENTS", "QuantMethod"]
