"""alignq_jax: AlignQ (CVPR 2022) quantization-aware training in JAX/Flax.

Layers (each imports only the ones above it): ``quantizers`` and ``correlation`` (pure numerics), ``admm``
(correlation-preservation solver), ``quantize`` (Flax layers and ``QuantConfig``), ``models``, ``data``,
``training``.
"""

from alignq_jax import admm, correlation, quantize, quantizers
from alignq_jax.admm import ADMM, ADMMState
from alignq_jax.quantize import QuantConfig

__version__ = "0.1.0"
__all__ = ["ADMM", "ADMMState", "QuantConfig", "admm", "correlation", "quantize", "quantizers"]
