"""ResNet-50 in torchvision's v1.5 layout with each method's quantizer placement (docs/method.md §7 and §10).

torchvision's ``resnet50()``: a 7x7/2 stem conv (64 channels) -> BN -> ReLU -> 3x3/2 max pool (padding 1), then
four stages of bottleneck blocks, [3, 4, 6, 3] blocks of widths 64, 128, 256, 512 with expansion 4 (outputs 256,
512, 1024, 2048 channels); the first block of stages 2-4 has stride 2, on its 3x3 conv (v1.5; v1 strides the first
1x1 conv). A bottleneck is 1x1 conv -> BN -> ReLU -> 3x3 conv -> BN -> ReLU -> 1x1 conv -> BN, plus the block
input, then ReLU; the first block of every stage adds a downsample 1x1 conv (stride of the block) -> BN instead
of the input. Global average pooling and a full-precision Dense "fc" (or, with ``num_classes=0``, the pooled
(B, 2048) features: a backbone for other heads). Every conv is bias-free and quantized (weights); the image, the
downsample branch's output, the block outputs and the classifier stay full precision.

Parameters (kernels, BN scale and bias, the Dense; running statistics excluded): 25,557,032 with 1000 classes,
torchvision's count; 23,508,032 with ``num_classes=0``.

Module paths, named after torchvision's state-dict keys ("layer1.0.conv1.weight" is "layer1_0/conv1/kernel";
:func:`alignq_jax.pretrained.convert_torchvision_resnet50` converts a checkpoint): the stem "conv1", "bn1"; the
blocks "layer{s}_{b}" (s = 1..4, b from 0) with "conv1", "bn1", "conv2", "bn2", "conv3", "bn3" and, in the first
block of a stage, "downsample_conv", "downsample_bn" (torchvision's "downsample.0", "downsample.1"); "fc". A
``QuantRules`` pattern is searched in the path, so "conv1" matches the stem and every block's first conv;
anchor it for the stem alone: ``QuantRules([("^bn1$", QuantConfig(4, 32))], default=QuantConfig(4, 4))`` keeps
the stem's BN output in full precision (the official CDF-only DSAN model has no quantizer there).

Where the activation quantizer sits is the method's placement:

* after BatchNorm (AlignQ, uniform), as the official code: stem BN -> Q -> ReLU; in each block bn1 -> Q -> ReLU,
  bn2 -> Q -> ReLU, bn3 -> Q (no ReLU), then + (block input or downsample BN output, unquantized) -> ReLU. The
  downsample BN is a plain BatchNorm whatever the config (unlike the CIFAR ResNets' shortcut BN), so it records
  no correlation gap: 1 + 3 * (number of blocks) gaps, 49 in ResNet-50.
* on conv inputs (LSQ, PACT, DoReFa, APoT, absmax): every conv but the stem quantizes its input, which is
  non-negative everywhere (a block input follows the max pool of a ReLU output or a block's final ReLU; conv2
  and conv3 follow the ReLUs inside the block; the downsample conv takes the block input). Every BN is then a
  plain BN (-> ReLU).

``config`` is a QuantConfig or QuantRules; with ``QuantConfig()`` (32 bits) this is the plain FP network.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from alignq_jax.models.layers import QuantClassifier, QuantLayers, bn_quant
from alignq_jax.quantize import QuantConfig

STAGE_SIZES = (3, 4, 6, 3)
STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
STEM_WIDTH = 64

# The downsample BN output stays full precision in every method (docs/method.md §10): a 32-bit config makes
# QuantBatchNorm a plain BatchNorm with PyTorch's running statistics.
_FP = QuantConfig()


class Bottleneck(QuantLayers, kw_only=True):
    """torchvision's v1.5 bottleneck: 1x1 conv -> BN (-> Q) -> ReLU -> 3x3 conv (``strides``) -> BN (-> Q) -> ReLU
    -> 1x1 conv -> BN (-> Q) -> (+ shortcut) -> ReLU. The shortcut is the input, or where ``strides`` is not 1 or
    the channel count changes a 1x1 conv (``strides``) -> plain BN. Input (B, H, W, C), output
    (B, H / strides, W / strides, 4 * width)."""

    width: int
    strides: int

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv, bn_q = self.conv_and_bn(train)
        features = self.width * EXPANSION
        y = conv(self.width, (1, 1), padding=0, name="conv1")(x)
        y = bn_q(relu=True, name="bn1")(y)  # BN -> Q -> ReLU
        y = conv(self.width, (3, 3), strides=self.strides, padding=1, name="conv2")(y)
        y = bn_q(relu=True, name="bn2")(y)
        y = conv(features, (1, 1), padding=0, name="conv3")(y)
        y = bn_q(name="bn3")(y)  # BN -> Q, then + shortcut -> ReLU
        if self.strides != 1 or x.shape[-1] != features:
            x = conv(features, (1, 1), strides=self.strides, padding=0, name="downsample_conv")(x)
            # A plain BN (with this network's momentum and data-parallel axis): unquantized in every method.
            x = bn_quant(_FP, train, self.bn_axis_name, None, momentum=self.bn_momentum, name="downsample_bn")(x)
        return nn.relu(y + x)


class ResNet50(QuantClassifier):
    """ResNet-50 (torchvision v1.5) for 224x224 images (any size of at least 32 works: 224 -> 112 -> 56 -> 56 -> 28
    -> 14 -> 7 before the global average pool). ``stage_sizes``: blocks per stage, [3, 4, 6, 3] for ResNet-50
    (fewer, e.g. [1, 1, 1, 1], give a small network of the same kinds of layers, for tests); the layer fields are
    ``QuantLayers'``. Input (B, H, W, 3) images; output (B, num_classes) float32 logits, or the (B, 2048) float32
    pooled features with ``num_classes=0``."""

    num_classes: int = 1000
    stage_sizes: Sequence[int] = STAGE_SIZES

    @nn.compact
    def __call__(self, x, train: bool = True):
        if len(self.stage_sizes) != len(STAGE_WIDTHS) or any(int(n) < 1 for n in self.stage_sizes):
            raise ValueError(f"stage_sizes must be {len(STAGE_WIDTHS)} block counts >= 1; got {self.stage_sizes!r}")
        x = x.astype(self.dtype)
        conv, bn_q = self.conv_and_bn(train)
        x = conv(STEM_WIDTH, (7, 7), strides=2, padding=3, quantize_input=False, name="conv1")(x)  # the image
        x = bn_q(relu=True, name="bn1")(x)
        # PyTorch's MaxPool2d(3, 2, padding=1) pads with -inf, as Flax's max_pool does.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (blocks, width) in enumerate(zip(self.stage_sizes, STAGE_WIDTHS)):
            for block in range(int(blocks)):
                strides = 2 if stage > 0 and block == 0 else 1
                x = Bottleneck(width=width, strides=strides, name=f"layer{stage + 1}_{block}",
                               **self.layer_fields())(x, train)
        return self.classify(x)


def resnet50(**kwargs) -> ResNet50:
    return ResNet50(**kwargs)
