"""A small CNN for 8x8 digits, with each method's quantizer placement (conv -> BN -> Q -> ReLU for AlignQ)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from alignq_jax.models.resnet_cifar import BN_MOMENTUM, bn_quant, conv_factory
from alignq_jax.quantize import QuantConfig, QuantRules


class SmallCNN(nn.Module):
    """conv(16) -> conv(32, stride 2) -> conv(32) blocks, global average pool, FP Dense classifier. The first conv
    never quantizes its input (the image)."""

    config: QuantConfig | QuantRules = QuantConfig()
    num_classes: int = 10
    widths: Sequence[int] = (16, 32, 32)
    strides: Sequence[int] = (1, 2, 1)
    bn_axis_name: str | None = None
    correlation_axis_name: str | None = None
    dtype: Any = jnp.float32
    bn_momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = x.astype(self.dtype)
        conv = conv_factory(self.config, self.dtype, train, self.bn_momentum, self.bn_axis_name)
        for i, (width, stride) in enumerate(zip(self.widths, self.strides)):
            x = conv(width, (3, 3), strides=stride, padding=1, quantize_input=i > 0, name=f"conv{i}")(x)
            x = bn_quant(self.config, train, self.bn_axis_name, self.correlation_axis_name, momentum=self.bn_momentum,
                         relu=True, name=f"bn{i}")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=jnp.float32, name="fc")(x.astype(jnp.float32))
