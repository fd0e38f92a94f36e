"""CIFAR ResNet-20/56 with AlignQ's quantizer placement (docs/method.md §7).

Post-activation basic blocks: conv -> BN -> Q -> ReLU -> conv -> BN -> Q -> (+ shortcut) -> ReLU. Every conv is
quantized (stem and stride-2 1x1 shortcut convs too); the shortcut conv is followed by BN -> Q (no ReLU); the
identity shortcut has no padding trick. The input image, block outputs and the final Dense stay full precision.
With ``QuantConfig()`` (32 bits) this is the plain FP network.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from alignq_jax.quantize import QuantBatchNorm, QuantConfig, QuantConv

# PyTorch BatchNorm2d defaults: momentum 0.1 there is 0.9 here; eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def bn_quant(config: QuantConfig, train: bool, axis_name: str | None, correlation_axis_name: str | None, **kwargs):
    """BN -> activation quantizer (-> ReLU with relu=True) as one ``QuantBatchNorm`` (docs/method.md §7)."""
    return QuantBatchNorm(
        config,
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        axis_name=axis_name if train else None,
        correlation_axis_name=correlation_axis_name,
        **kwargs,
    )


def conv_factory(config: QuantConfig, dtype: Any):
    """Quantized conv with PyTorch-like settings for CIFAR ResNets (no bias, Kaiming-normal init)."""
    return partial(
        QuantConv, config=config, use_bias=False, kernel_init=nn.initializers.kaiming_normal(), dtype=dtype
    )


class BasicBlock(nn.Module):
    features: int
    strides: int
    config: QuantConfig
    bn_axis_name: str | None = None
    correlation_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = conv_factory(self.config, self.dtype)
        bn_q = partial(bn_quant, self.config, train, self.bn_axis_name, self.correlation_axis_name)
        y = conv(self.features, (3, 3), strides=self.strides, padding=1, name="conv0")(x)
        y = bn_q(relu=True, name="bn0")(y)  # conv -> BN -> Q -> ReLU
        y = conv(self.features, (3, 3), padding=1, name="conv1")(y)
        y = bn_q(name="bn1")(y)  # conv -> BN -> Q, then + shortcut -> ReLU
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv(self.features, (1, 1), strides=self.strides, padding=0, name="shortcut_conv")(x)
            x = bn_q(name="shortcut_bn")(x)  # 1x1 conv -> BN -> Q, no ReLU
        return nn.relu(y + x)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 16-32-64 channels, n blocks per stage."""

    blocks_per_stage: int
    config: QuantConfig = QuantConfig()
    num_classes: int = 10
    widths: Sequence[int] = (16, 32, 64)
    bn_axis_name: str | None = None
    correlation_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = x.astype(self.dtype)
        x = conv_factory(self.config, self.dtype)(self.widths[0], (3, 3), padding=1, name="stem_conv")(x)
        x = bn_quant(self.config, train, self.bn_axis_name, self.correlation_axis_name, relu=True, name="stem_bn")(x)
        for stage, width in enumerate(self.widths):
            for block in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(
                    width,
                    strides,
                    self.config,
                    self.bn_axis_name,
                    self.correlation_axis_name,
                    self.dtype,
                    name=f"stage{stage}_block{block}",
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=jnp.float32, name="fc")(x.astype(jnp.float32))


def resnet20(**kwargs) -> CifarResNet:
    return CifarResNet(blocks_per_stage=3, **kwargs)


def resnet56(**kwargs) -> CifarResNet:
    return CifarResNet(blocks_per_stage=9, **kwargs)
