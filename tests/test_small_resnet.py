"""The small ResNet for 28x28 images: parameter count against a count by hand, output shapes on several image
sizes, and AlignQ's quantizer placement (docs/method.md §7), checked on the recorded forward as in test_models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax.models import SmallResNet, get_model
from alignq_jax.quantize import GAP_COLLECTION, QuantBatchNorm, QuantConfig, QuantConv, gap_shapes
from test_models import CFG, _check_bn_quant, _check_fp_classifier, _only, record_calls


def _param_count(variables) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


def _count_by_hand(in_channels, stem_width, widths, blocks, strides, num_classes) -> int:
    """Weights of a stem 3x3 conv, BasicBlocks (two 3x3 convs; a 1x1 projection where the stride or the channel
    count changes) and a Dense with bias; every conv is bias-free and followed by a BN with scale and bias."""
    conv3 = lambda cin, cout: 9 * cin * cout + 2 * cout  # noqa: E731 - kernel + BN scale/bias
    total = conv3(in_channels, stem_width)
    cin = stem_width
    for w, n, s in zip(widths, blocks, strides):
        for block in range(n):
            total += conv3(cin, w) + conv3(w, w)
            if (block == 0 and s != 1) or cin != w:
                total += cin * w + 2 * w  # 1x1 shortcut conv + its BN
            cin = w
    return total + cin * num_classes + num_classes


def test_default_parameter_count_matches_hand_count():
    """The registered model: stem 1->16 (144 + 32 BN), blocks 16->32, 32->64, 64->128, each at stride 2 with a 1x1
    projection (3x3 + 3x3 + 1x1 kernels + 3 BNs), Dense 128*10 + 10."""
    model = get_model("small_resnet", config=CFG)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=True))
    hand = (
        (144 + 32)
        + (4608 + 9216 + 512 + 192)
        + (18432 + 36864 + 2048 + 384)
        + (73728 + 147456 + 8192 + 768)
        + (1280 + 10)
    )
    assert hand == 303_866  # the count in the model's docstring
    assert _param_count(shapes) == hand
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    assert not any("conv" in jax.tree_util.keystr(k) and "bias" in jax.tree_util.keystr(k) for k, _ in flat)


@pytest.mark.parametrize(
    "stem, widths, blocks, strides, channels, classes",
    [(8, (8, 12), (2, 1), (1, 2), 3, 5), (4, (6, 6, 10), (1, 2, 1), (1, 2, 1), 1, 7)],
)
def test_other_shapes_parameter_count_matches_hand_count(stem, widths, blocks, strides, channels, classes):
    model = SmallResNet(config=CFG, num_classes=classes, stem_width=stem, widths=widths, blocks_per_stage=blocks,
                        strides=strides)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 16, 16, channels)), train=True))
    assert _param_count(shapes) == _count_by_hand(channels, stem, widths, blocks, strides, classes)


@pytest.mark.parametrize("size, pooled", [(28, 4), (32, 4), (8, 1)])
def test_output_shape_and_pooled_resolution(size, pooled):
    """(B, num_classes) logits on any image size; three stride-2 stages take 28 -> 4, 32 -> 4, 8 -> 1 before the
    global average pool."""
    model = get_model("small_resnet", config=QuantConfig(), num_classes=10)
    x = jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32)

    def forward(x):
        v = model.init(jax.random.key(1), x, train=False)
        return model.apply(v, x, train=False, capture_intermediates=True, mutable=["intermediates"])

    logits, out = jax.eval_shape(forward, x)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert out["intermediates"]["stage2_block0"]["__call__"][0].shape == (2, pooled, pooled, 128)


SMALL_VARIANT = dict(stem_width=8, widths=(8, 16), blocks_per_stage=(2, 1), strides=(1, 2))  # identity shortcuts too


@pytest.mark.parametrize("variant, size", [({}, 12), (SMALL_VARIANT, 12)], ids=["default", "identity_shortcuts"])
def test_small_resnet_quantizer_placement(variant, size):
    """docs/method.md §7, as in ResNet-20: stem conv -> BN -> Q -> ReLU; block conv0 -> BN -> Q -> ReLU -> conv1 ->
    BN -> Q -> (+ shortcut) -> ReLU; a 1x1 shortcut conv -> BN -> Q (no ReLU) where the stride or width changes,
    the identity otherwise; the image, block outputs and the final Dense stay full precision."""
    model = SmallResNet(config=CFG, **variant)
    x = jax.random.normal(jax.random.key(0), (4, size, size, 1))  # placement does not depend on the image size
    v = jax.jit(lambda x: model.init(jax.random.key(1), x, train=True))(x)  # one compile instead of one per op
    (logits, _), calls = record_calls(model, v, x, train=True, mutable=["batch_stats", GAP_COLLECTION])
    params = v["params"]

    stem_conv, stem_bn = _check_bn_quant(calls, ("stem_conv",), ("stem_bn",), params, CFG, relu=True)
    np.testing.assert_array_equal(stem_conv.args[0], x)  # the image itself, unquantized
    h = stem_bn.out
    quantized_acts = 1
    projections = 0
    for stage, (width, blocks, stride) in enumerate(zip(model.widths, model.blocks_per_stage, model.strides)):
        for block in range(blocks):
            name = f"stage{stage}_block{block}"
            blk = _only(calls, (name,))
            assert blk.args[0] is h, f"{name} is not fed by the previous block"
            c0, b0 = _check_bn_quant(calls, (name, "conv0"), (name, "bn0"), params, CFG, relu=True)
            c1, b1 = _check_bn_quant(calls, (name, "conv1"), (name, "bn1"), params, CFG, relu=False)
            assert c0.args[0] is h and c1.args[0] is b0.out
            assert c0.module.strides == (stride if block == 0 else 1)
            quantized_acts += 2
            if block == 0 and (stride != 1 or h.shape[-1] != width):
                sc, sb = _check_bn_quant(calls, (name, "shortcut_conv"), (name, "shortcut_bn"), params, CFG,
                                         relu=False)
                assert sc.args[0] is h and sc.module.kernel_size == (1, 1) and sc.module.strides == stride
                shortcut = sb.out
                quantized_acts += 1
                projections += 1
            else:
                assert (name, "shortcut_conv") not in calls and (name, "shortcut_bn") not in calls
                shortcut = h  # identity
            np.testing.assert_array_equal(blk.out, jax.nn.relu(b1.out + shortcut))
            h = blk.out
    expected = {"default": (10, 3), "identity_shortcuts": (8, 1)}["identity_shortcuts" if variant else "default"]
    assert (quantized_acts, projections) == expected
    assert len([p for p, c in calls.items() if isinstance(c[0].module, QuantBatchNorm)]) == quantized_acts
    assert len([p for p, c in calls.items() if isinstance(c[0].module, QuantConv)]) == quantized_acts
    assert len(jax.tree.leaves(gap_shapes(model, v, x, train=True))) == quantized_acts  # one correlation term each
    fc = _check_fp_classifier(calls, params, h)
    np.testing.assert_array_equal(fc.out, logits)


@pytest.mark.parametrize(
    "widths, blocks, strides", [((16,), (), (1,)), ((16, 32), (1,), (1, 2)), ((16,), (0,), (1,)), ((16,), (1,), ())]
)
def test_bad_stage_layout_is_rejected(widths, blocks, strides):
    model = SmallResNet(widths=widths, blocks_per_stage=blocks, strides=strides)
    with pytest.raises(ValueError, match="blocks_per_stage"):
        model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
