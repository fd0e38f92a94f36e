"""CIFAR ResNet-20/56 with each method's quantizer placement (docs/method.md §7).

Post-activation basic blocks: conv -> BN -> ReLU -> conv -> BN -> (+ shortcut) -> ReLU, with the stride-2 1x1
shortcut conv followed by BN (no ReLU). Every conv is quantized (stem and shortcut convs too) and the final Dense
stays full precision. Where the activation quantizer sits is the method's placement:

* after BatchNorm, before the ReLU (AlignQ, uniform): conv -> BN -> Q -> ReLU, the shortcut BN -> Q, the block
  outputs and the input image unquantized (the official code's placement);
* on conv inputs (LSQ, PACT, DoReFa, APoT, absmax): every conv but the stem quantizes its input, which follows a
  ReLU (a block input, or the ReLU inside the block); the image is not quantized.

``config`` is a QuantConfig or QuantRules (per-layer configs by module path, e.g. "stem_conv").
With ``QuantConfig()`` (32 bits) this is the plain FP network.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

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
    """Quantized conv with PyTorch-like settings for CIFAR ResNets (no bias, Kaiming-normal init). ``train``,
    ``momentum`` and ``axis_name`` (BatchNorm's) drive the running statistics some methods keep for their input
    quantizer."""
    return partial(
        QuantConv, config=config, use_bias=False, kernel_init=nn.initializers.kaiming_normal(), dtype=dtype,
        use_running_average=not train, stats_momentum=momentum, stats_axis_name=axis_name if train else None,
    )


class BasicBlock(nn.Module):
    features: int
    strides: int
    config: QuantConfig | QuantRules
    bn_axis_name: str | None = None
    correlation_axis_name: str | None = None
    dtype: Any = jnp.float32
    bn_momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = conv_factory(self.config, self.dtype, train, self.bn_momentum, self.bn_axis_name)
        bn_q = partial(bn_quant, self.config, train, self.bn_axis_name, self.correlation_axis_name,
                       momentum=self.bn_momentum)
        y = conv(self.features, (3, 3), strides=self.strides, padding=1, name="conv0")(x)
        y = bn_q(relu=True, name="bn0")(y)  # conv -> BN -> Q -> ReLU
        y = conv(self.features, (3, 3), padding=1, name="conv1")(y)
        y = bn_q(name="bn1")(y)  # conv -> BN -> Q, then + shortcut -> ReLU
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv(self.features, (1, 1), strides=self.strides, padding=0, name="shortcut_conv")(x)
            x = bn_q(name="shortcut_bn")(x)  # 1x1 conv -> BN -> Q, no ReLU
        return nn.relu(y + x)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 16-32-64 channels, n blocks per stage. ``bn_momentum``: the running-statistics
    momentum of every BatchNorm (and of quantizer statistics), 0.9 = PyTorch's 0.1."""

    blocks_per_stage: int
    config: QuantConfig | QuantRules = QuantConfig()
    num_classes: int = 10
    widths: Sequence[int] = (16, 32, 64)
    bn_axis_name: str | None = None
    correlation_axis_name: str | None = None
    dtype: Any = jnp.float32
    bn_momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, x, train: bool = True):
        stages = [(width, self.blocks_per_stage, 2 if stage > 0 else 1) for stage, width in enumerate(self.widths)]
        return residual_network(self, x, train, self.widths[0], stages)


def residual_network(net: nn.Module, x, train: bool, stem_width: int, stages) -> jnp.ndarray:
    """The body the residual models share, called inside ``net``'s compact ``__call__`` (its fields config,
    num_classes, bn_axis_name, correlation_axis_name, dtype, bn_momentum): stem conv (never quantizing its input,
    the image) -> BN (-> Q) -> ReLU, then ``stages`` [(width, blocks, stride of the first block)] of BasicBlocks
    named "stage{s}_block{b}", global average pooling and a full-precision Dense "fc". Returns float32 logits."""
    x = x.astype(net.dtype)
    stem = conv_factory(net.config, net.dtype, train, net.bn_momentum, net.bn_axis_name)
    x = stem(stem_width, (3, 3), padding=1, quantize_input=False, name="stem_conv")(x)
    x = bn_quant(net.config, train, net.bn_axis_name, net.correlation_axis_name, momentum=net.bn_momentum,
                 relu=True, name="stem_bn")(x)
    for stage, (width, blocks, first_stride) in enumerate(stages):
        for block in range(int(blocks)):
            x = BasicBlock(
                width,
                int(first_stride) if block == 0 else 1,
                net.config,
                net.bn_axis_name,
                net.correlation_axis_name,
                net.dtype,
                net.bn_momentum,
                name=f"stage{stage}_block{block}",
            )(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(net.num_classes, dtype=jnp.float32, name="fc")(x.astype(jnp.float32))


def resnet20(**kwargs) -> CifarResNet:
    return CifarResNet(blocks_per_stage=3, **kwargs)


def resnet56(**kwargs) -> CifarResNet:
    return CifarResNet(blocks_per_stage=9, **kwargs)
