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

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from alignq_jax.models.layers import QuantClassifier, QuantLayers


class BasicBlock(QuantLayers, kw_only=True):
    """conv -> BN (-> Q) -> ReLU -> conv -> BN (-> Q) (+ shortcut) -> ReLU; a 1x1 conv -> BN (-> Q) shortcut where
    ``strides`` or the channel count changes. Input (B, H, W, C), output (B, H / strides, W / strides, features)."""

    features: int
    strides: int

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv, bn_q = self.conv_and_bn(train)
        y = conv(self.features, (3, 3), strides=self.strides, padding=1, name="conv0")(x)
        y = bn_q(relu=True, name="bn0")(y)  # conv -> BN -> Q -> ReLU
        y = conv(self.features, (3, 3), padding=1, name="conv1")(y)
        y = bn_q(name="bn1")(y)  # conv -> BN -> Q, then + shortcut -> ReLU
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv(self.features, (1, 1), strides=self.strides, padding=0, name="shortcut_conv")(x)
            x = bn_q(name="shortcut_bn")(x)  # 1x1 conv -> BN -> Q, no ReLU
        return nn.relu(y + x)


class CifarResNet(QuantClassifier, kw_only=True):
    """ResNet-(6n+2) for 32x32 inputs: 16-32-64 channels, n = ``blocks_per_stage`` blocks per stage (the layer
    fields are ``QuantLayers``'). Input (B, H, W, C) images; output (B, num_classes) float32 logits."""

    blocks_per_stage: int
    widths: Sequence[int] = (16, 32, 64)

    @nn.compact
    def __call__(self, x, train: bool = True):
        stages = [(width, self.blocks_per_stage, 2 if stage > 0 else 1) for stage, width in enumerate(self.widths)]
        return residual_network(self, x, train, self.widths[0], stages)


def residual_network(net: QuantClassifier, x, train: bool, stem_width: int, stages) -> jnp.ndarray:
    """The body the residual models share, called inside ``net``'s compact ``__call__``: stem conv (never
    quantizing its input, the image) -> BN (-> Q) -> ReLU, then ``stages`` [(width, blocks, stride of the first
    block)] of BasicBlocks named "stage{s}_block{b}", global average pooling and a full-precision Dense "fc".
    Returns float32 logits."""
    x = x.astype(net.dtype)
    conv, bn_q = net.conv_and_bn(train)
    x = conv(stem_width, (3, 3), padding=1, quantize_input=False, name="stem_conv")(x)
    x = bn_q(relu=True, name="stem_bn")(x)
    for stage, (width, blocks, first_stride) in enumerate(stages):
        for block in range(int(blocks)):
            x = BasicBlock(
                features=width, strides=int(first_stride) if block == 0 else 1, name=f"stage{stage}_block{block}",
                **net.layer_fields(),
            )(x, train)
    return net.classify(x)


def resnet20(**kwargs) -> CifarResNet:
    return CifarResNet(blocks_per_stage=3, **kwargs)


def resnet56(**kwargs) -> CifarResNet:
    return CifarResNet(blocks_per_stage=9, **kwargs)
