"""MobileNetV2 for 32x32 inputs (the usual CIFAR/SVHN variant) with each method's quantizer placement
(docs/method.md §7).

torchvision's MobileNetV2 layers with two strides changed for 32x32 images: the stem 3x3 conv (32 channels) has
stride 1 instead of 2, and so does the first block of the (t=6, c=24, n=2) stage. Inverted residual blocks,
(expansion t, output channels c, blocks n, stride s of the first block):
(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1).
A block is a 1x1 expansion conv -> BN -> ReLU6 (omitted when t=1), a 3x3 depthwise conv (one group per channel)
-> BN -> ReLU6, a 1x1 projection conv -> BN (linear bottleneck, no activation), plus the block input where the
stride is 1 and the channel count is unchanged. Then a 1x1 conv to 1280 channels -> BN -> ReLU6, global average
pooling and a full-precision Dense "fc". Every conv is bias-free and quantized (weights); the image and the
classifier stay full precision. With ``QuantConfig()`` (32 bits) this is the plain FP network.

Parameters (kernels, BN scale and bias, the Dense; running statistics excluded): 3,504,872 with 1000 classes,
torchvision's ``mobilenet_v2()`` count (only strides differ, so the count is the same); 2,236,682 with 10.

Module paths, for ``QuantRules``: "stem_conv", "stem_bn"; "block{i}" (i = 0..16) with "expand_conv",
"expand_bn" (t > 1 only), "depthwise", "depthwise_bn", "project_conv", "project_bn"; "head_conv", "head_bn";
"fc". E.g. ``QuantRules([("depthwise", QuantConfig(8, 8))], default=QuantConfig(4, 4))`` keeps every depthwise
conv and its BN at 8 bits.

Where the activation quantizer sits is the method's placement:

* after BatchNorm (AlignQ, uniform): every BN output is quantized, BN -> Q -> ReLU6 after the stem, expansion,
  depthwise and head convs, and BN -> Q (no activation) after the projection convs, as the ResNets' shortcut BN.
  ReLU6 is ``QuantBatchNorm(relu=True)`` followed by ``min(., 6)``: with ``relu=True`` the quantizer is told a
  ReLU follows, and in the "exact" levels mode it then puts all 2^bits levels on the unsigned grid [0, A] instead
  of spending half of them on negative values the ReLU would zero. ReLU6 zeroes the same negative values, so the
  unsigned grid fits it equally; the cap at 6 is applied after the quantizer (a no-op unless ``act_range`` > 6,
  since the grid ends at A). For the FP network and conv-input methods this is exactly ReLU6(BN(x)).
* on conv inputs (LSQ, PACT, DoReFa, APoT, absmax): a conv quantizes its input only when that input follows a
  ReLU6 (non-negative): the depthwise convs (after the expansion's or, in block0, the stem's ReLU6) and the
  projection convs (after the depthwise ReLU6). The stem conv (the image), the expansion convs (a block input: a
  linear bottleneck output, signed) and the head conv (the last block's projection output, signed) keep
  ``quantize_input=False``. Every BN is then a plain BN (-> ReLU6).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from alignq_jax.models.layers import QuantClassifier, QuantLayers

# (expansion t, output channels c, blocks n, stride s of the first block); torchvision's with s=1 for c=24.
INVERTED_RESIDUAL_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                              (6, 160, 3, 2), (6, 320, 1, 1))
STEM_WIDTH = 32
HEAD_WIDTH = 1280
RELU6_CAP = 6.0


def relu6_cap(y):
    """The upper half of ReLU6, after a ``QuantBatchNorm(relu=True)`` that applied the lower one (y >= 0)."""
    return jnp.minimum(y, RELU6_CAP)


class InvertedResidual(QuantLayers, kw_only=True):
    """[1x1 expansion conv -> BN -> ReLU6] -> 3x3 depthwise conv -> BN -> ReLU6 -> 1x1 projection conv -> BN
    (+ input where ``strides`` is 1 and the channel count is unchanged). Input (B, H, W, C_in), output
    (B, H / strides, W / strides, features)."""

    features: int
    expansion: int
    strides: int

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv, bn_q = self.conv_and_bn(train)
        in_features = x.shape[-1]
        hidden = in_features * self.expansion
        y = x
        if self.expansion != 1:
            # The block input is a linear bottleneck output (signed): not quantized by conv-input methods.
            y = conv(hidden, (1, 1), padding=0, quantize_input=False, name="expand_conv")(y)
            y = relu6_cap(bn_q(relu=True, name="expand_bn")(y))  # BN -> Q -> ReLU6
        y = conv(hidden, (3, 3), strides=self.strides, padding=1, feature_group_count=hidden, name="depthwise")(y)
        y = relu6_cap(bn_q(relu=True, name="depthwise_bn")(y))  # BN -> Q -> ReLU6
        y = conv(self.features, (1, 1), padding=0, name="project_conv")(y)
        y = bn_q(name="project_bn")(y)  # BN -> Q, linear
        if self.strides == 1 and in_features == self.features:
            y = y + x
        return y


class MobileNetV2(QuantClassifier):
    """MobileNetV2 for 32x32 images (stem and the 24-channel stage at stride 1): 32x32 -> 16 -> 8 -> 4 before the
    global average pool. ``block_settings``: the (expansion t, output channels c, blocks n, first stride s) table,
    torchvision's by default (``INVERTED_RESIDUAL_SETTINGS``); the layer fields are ``QuantLayers``'. Input
    (B, H, W, C) images; output (B, num_classes) float32 logits."""

    block_settings: Sequence[tuple[int, int, int, int]] = INVERTED_RESIDUAL_SETTINGS

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = x.astype(self.dtype)
        conv, bn_q = self.conv_and_bn(train)
        x = conv(STEM_WIDTH, (3, 3), padding=1, quantize_input=False, name="stem_conv")(x)  # the image
        x = relu6_cap(bn_q(relu=True, name="stem_bn")(x))
        i = 0
        for t, c, n, s in self.block_settings:
            for block in range(n):
                x = InvertedResidual(features=c, expansion=t, strides=s if block == 0 else 1, name=f"block{i}",
                                     **self.layer_fields())(x, train)
                i += 1
        # The last block's projection output is signed: not quantized by conv-input methods.
        x = conv(HEAD_WIDTH, (1, 1), padding=0, quantize_input=False, name="head_conv")(x)
        x = relu6_cap(bn_q(relu=True, name="head_bn")(x))
        return self.classify(x)


def mobilenet_v2(**kwargs) -> MobileNetV2:
    return MobileNetV2(**kwargs)
