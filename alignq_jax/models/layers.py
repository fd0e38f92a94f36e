"""What every model here is built from: the quantized conv and BatchNorm factories and the fields that blocks and
networks share.

``QuantLayers`` holds the settings each conv and BatchNorm inside a block or network takes (``config``,
``bn_axis_name``, ``correlation_axis_name``, ``dtype``, ``bn_momentum``); ``QuantClassifier`` adds
``num_classes`` and the full-precision classifier head. Blocks and networks subclass them (with ``kw_only=True``
where they add required fields), so one change here reaches every model.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from alignq_jax.quantize import QuantBatchNorm, QuantConfig, QuantConv, QuantRules

# PyTorch BatchNorm2d defaults: momentum 0.1 there is 0.9 here; eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def bn_quant(config, train: bool, axis_name: str | None, correlation_axis_name: str | None, *,
             momentum: float = BN_MOMENTUM, **kwargs):
    """BN (-> activation quantizer for BN-output methods) (-> ReLU with relu=True) as one ``QuantBatchNorm``."""
    return QuantBatchNorm(
        config,
        use_running_average=not train,
        momentum=momentum,
        epsilon=BN_EPSILON,
        axis_name=axis_name if train else None,
        correlation_axis_name=correlation_axis_name,
        **kwargs,
    )


def conv_factory(config, dtype: Any, train: bool = True, momentum: float = BN_MOMENTUM,
                 axis_name: str | None = None):
    """Quantized conv with PyTorch-like settings (no bias, Kaiming-normal init). ``train``, ``momentum`` and
    ``axis_name`` (BatchNorm's) drive the running statistics some methods keep for their input quantizer."""
    return partial(
        QuantConv, config=config, use_bias=False, kernel_init=nn.initializers.kaiming_normal(), dtype=dtype,
        use_running_average=not train, stats_momentum=momentum, stats_axis_name=axis_name if train else None,
    )


class QuantLayers(nn.Module):
    """Base of every quantized block and network: the settings of the convs and BatchNorms inside.

    ``config``: a QuantConfig, or QuantRules (per-layer configs by module path). ``bn_axis_name``: the device axis
    BatchNorm statistics are averaged over in training (data parallelism). ``correlation_axis_name``: all-gather the
    batch over this axis for the correlation gap. ``dtype``: compute dtype. ``bn_momentum``: the running-statistics
    momentum of every BatchNorm (and of quantizer statistics), 0.9 = PyTorch's 0.1.
    """

    config: QuantConfig | QuantRules = QuantConfig()
    bn_axis_name: str | None = None
    correlation_axis_name: str | None = None
    dtype: Any = jnp.float32
    bn_momentum: float = BN_MOMENTUM

    @nn.nowrap
    def layer_fields(self) -> dict:
        """These fields as keyword arguments, for the blocks a network builds."""
        return {"config": self.config, "bn_axis_name": self.bn_axis_name,
                "correlation_axis_name": self.correlation_axis_name, "dtype": self.dtype,
                "bn_momentum": self.bn_momentum}

    @nn.nowrap
    def conv_and_bn(self, train: bool):
        """(conv, bn): partials building a quantized conv (``conv_factory``) and a BN (-> Q) (-> ReLU)
        (``bn_quant``) with these fields; called inside a compact ``__call__``, they become its submodules."""
        conv = conv_factory(self.config, self.dtype, train, self.bn_momentum, self.bn_axis_name)
        bn = partial(bn_quant, self.config, train, self.bn_axis_name, self.correlation_axis_name,
                     momentum=self.bn_momentum)
        return conv, bn


class QuantClassifier(QuantLayers):
    """A network ending in global average pooling and a full-precision Dense "fc" with ``num_classes`` outputs.

    ``num_classes=0``: no head; the network returns its pooled features (a backbone for other heads, e.g. the
    domain-adaptation networks of ``alignq_jax.adaptation``).
    """

    num_classes: int = 10

    @nn.nowrap
    def classify(self, features):
        """(B, H, W, C) features -> (B, num_classes) float32 logits, or the (B, C) float32 pooled features when
        ``num_classes`` is 0; called inside the compact ``__call__``."""
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no head, pooled features); got {self.num_classes}")
        pooled = jnp.mean(features, axis=(1, 2)).astype(jnp.float32)
        if self.num_classes == 0:
            return pooled
        return nn.Dense(self.num_classes, dtype=jnp.float32, name="fc")(pooled)
