"""DenseNet for 32x32 inputs (Huang et al. 2017, "Densely Connected Convolutional Networks"), with each method's
quantizer placement (docs/method.md §7).

The plain DenseNet of the paper's CIFAR table (no bottleneck, no compression): a 3x3 stem conv with 16 output
channels, three dense blocks of ``n = (depth - 4) / 3`` layers with growth rate ``k``, each layer
BN -> ReLU -> 3x3 conv (k channels) whose output is concatenated to its input; between blocks a transition
BN -> ReLU -> 1x1 conv (same channel count) -> 2x2 average pooling; after the last block BN -> ReLU -> global
average pooling -> full-precision Dense.

The layers are pre-activation (BN -> ReLU -> conv), so where the activation quantizer sits is:

* BN-output methods (AlignQ, uniform): every BatchNorm is BN -> Q -> ReLU (one ``QuantBatchNorm(relu=True)``),
  the BN before each conv and the final BN before pooling alike: one correlation gap per BatchNorm. The stem
  conv's input (the image) and the concatenated features stay full precision.
* conv-input methods (LSQ, PACT, DoReFa, APoT, absmax): every conv but the stem quantizes its input, which follows
  a ReLU; every BatchNorm is a plain BN -> ReLU.

Every conv's weights are quantized (the stem's too); the classifier Dense stays full precision. Layer names, for
per-layer rules (``QuantRules``): "stem_conv"; "block{b}_layer{i}/bn", "block{b}_layer{i}/conv";
"transition{t}/bn", "transition{t}/conv" (t = 0, 1); "final_bn"; "fc". With ``QuantConfig()`` (32 bits) this is
the plain FP network.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from alignq_jax.models.layers import QuantClassifier, QuantLayers

STEM_WIDTH = 16  # Huang et al.'s first conv for the plain DenseNet (DenseNet-BC uses 2k)
NUM_BLOCKS = 3


def _pre_act_conv(layer: QuantLayers, features: int, x, train: bool, kernel_size: int):
    """BN (-> Q) -> ReLU -> conv ``features`` x (kernel_size x kernel_size), "same" padding, as the submodules
    "bn" and "conv" of ``layer`` (called inside its compact ``__call__``). The conv's weights are quantized, and its
    input too for conv-input methods. (B, H, W, C) -> (B, H, W, features)."""
    conv, bn_q = layer.conv_and_bn(train)
    y = bn_q(relu=True, name="bn")(x)
    return conv(features, (kernel_size, kernel_size), padding=kernel_size // 2, name="conv")(y)


class DenseLayer(QuantLayers, kw_only=True):
    """One layer of a dense block: its BN (-> Q) -> ReLU -> 3x3 conv output (``features`` = growth-rate channels)
    concatenated to its input. Input (B, H, W, C), output (B, H, W, C + features)."""

    features: int

    @nn.compact
    def __call__(self, x, train: bool = True):
        return jnp.concatenate([x, _pre_act_conv(self, self.features, x, train, 3)], axis=-1)


class Transition(QuantLayers, kw_only=True):
    """Between dense blocks: BN (-> Q) -> ReLU -> 1x1 conv (``features`` = the input's channel count) -> 2x2
    average pooling. Input (B, H, W, C), output (B, H // 2, W // 2, features)."""

    features: int

    @nn.compact
    def __call__(self, x, train: bool = True):
        return nn.avg_pool(_pre_act_conv(self, self.features, x, train, 1), (2, 2), strides=(2, 2))


class DenseNet(QuantClassifier):
    """DenseNet-(3n+4) without bottleneck or compression for 32x32 inputs (any size divisible by 4 works).

    ``depth`` = 3n + 4 counts the stem conv, 3n layer convs, the 2 transition convs and the classifier; each dense
    block has n layers of ``growth_rate`` channels. DenseNet-40 (k=12, the registered default): 1,019,722
    parameters with 10 classes (the paper's Table 2 gives 1.0M; convs without bias, BatchNorm scale and bias
    counted, running statistics not), 39 BatchNorms (36 layers, 2 transitions, the final one), 39 convs.
    ``stem_width``: channels of the first conv, 16 as in Huang et al.'s plain DenseNet (16 -> 160 -> 304 -> 448
    channels); the official AlignQ code uses 24 = 2k (24 -> 168 -> 312 -> 456, 1,059,298 parameters). The layer
    fields are ``QuantLayers``'.

    Input (B, H, W, C) images; output (B, num_classes) float32 logits.
    """

    depth: int = 40
    growth_rate: int = 12
    stem_width: int = STEM_WIDTH

    def __post_init__(self):
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 7 or (self.depth - 4) % 3:
            raise ValueError(
                f"depth must be 3n + 4 with n >= 1 layers per dense block (7, 10, ..., 40, ...); got {self.depth!r}"
            )
        for name in ("growth_rate", "stem_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        super().__post_init__()

    @property
    def layers_per_block(self) -> int:
        return (self.depth - 4) // 3

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = x.astype(self.dtype)
        conv, bn_q = self.conv_and_bn(train)
        x = conv(self.stem_width, (3, 3), padding=1, quantize_input=False, name="stem_conv")(x)
        for block in range(NUM_BLOCKS):
            if block:
                x = Transition(features=x.shape[-1], name=f"transition{block - 1}", **self.layer_fields())(x, train)
            for layer in range(self.layers_per_block):
                x = DenseLayer(features=self.growth_rate, name=f"block{block}_layer{layer}",
                               **self.layer_fields())(x, train)
        x = bn_q(relu=True, name="final_bn")(x)
        return self.classify(x)


def densenet40(**kwargs) -> DenseNet:
    """DenseNet-40 (k=12): 1,019,722 parameters with 10 classes."""
    return DenseNet(**{"depth": 40, "growth_rate": 12, **kwargs})
