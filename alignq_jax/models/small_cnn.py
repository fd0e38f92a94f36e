"""A small CNN for 8x8 digits, with each method's quantizer placement (conv -> BN -> Q -> ReLU for AlignQ)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from alignq_jax.models.layers import QuantClassifier


class SmallCNN(QuantClassifier):
    """conv(16) -> conv(32, stride 2) -> conv(32) blocks, global average pool, FP Dense classifier. The first conv
    never quantizes its input (the image)."""

    widths: Sequence[int] = (16, 32, 32)
    strides: Sequence[int] = (1, 2, 1)

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = x.astype(self.dtype)
        conv, bn_q = self.conv_and_bn(train)
        for i, (width, stride) in enumerate(zip(self.widths, self.strides)):
            x = conv(width, (3, 3), strides=stride, padding=1, quantize_input=i > 0, name=f"conv{i}")(x)
            x = bn_q(relu=True, name=f"bn{i}")(x)
        return self.classify(x)
