"""ResNet-50 (torchvision v1.5 layout): torchvision's parameter count, the quantizer placement of AlignQ (stem BN,
bn1/bn2/bn3 of every bottleneck quantized; the downsample BN output and the block outputs not) and of conv-input
methods (every conv but the stem quantizes its non-negative input), the converter from torchvision's state dict
(every key used, a forward in torch's own NCHW/OIHW layout written here equals the model on the converted
weights), the .npz file, partial restore into a new model (new head, quantizer state, a backbone under a prefix)
with its errors, and the converter CLI (torch replaced by a stand-in: torch is not a dependency).

The full network is only traced (``jax.eval_shape``: data flow, shapes, module settings); every value is checked
on the reduced network with one block per stage (``stage_sizes=(1, 1, 1, 1)``: every kind of layer, a
downsample in each stage), which compiles in seconds on a CPU."""

import sys
import types
from collections import Counter

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax.methods import get_method
from alignq_jax.models import get_model
from alignq_jax.models.resnet50 import ResNet50
from alignq_jax.pretrained import (
    RestoreReport, convert_torchvision_resnet50, flatten_variables, load_pretrained, read_pretrained,
    restore_pretrained, save_pretrained,
)
from alignq_jax.quantize import GAP_COLLECTION, QuantBatchNorm, QuantConfig, QuantConv, gap_shapes
from test_mobilenet_v2 import (
    _quantize_activation, _quantize_weight, _run_recorded, traced_conv_input_quantization,
)
from test_models import CFG, _check_bn_quant, _check_fp_classifier, _only, _plain_conv_outputs, record_calls_traced
from test_placement_conv_input import _expected_state, numpy_batchnorm
from test_placement_conv_input import random_variables as random_variables_with_quantizers
from test_quant_rules import random_variables

SMALL = (1, 1, 1, 1)
FULL = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)


def _blocks(stage_sizes):
    """(name, input channels, width, stride, has downsample) of every bottleneck, from torchvision's ResNet:
    stride 2 in the first block of stages 2-4, a downsample wherever the stride or the channel count changes
    (the first block of every stage, as 64 != 256 in stage 1)."""
    out, cin = [], 64
    for s, (n, w) in enumerate(zip(stage_sizes, WIDTHS)):
        for b in range(n):
            stride = 2 if s > 0 and b == 0 else 1
            out.append((f"layer{s + 1}_{b}", cin, w, stride, stride != 1 or cin != 4 * w))
            cin = 4 * w
    return out


def _shapes(model, size=32, batch=2):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, size, size, 3)), train=True))


def _param_count(variables) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


def numpy_max_pool(x):
    """PyTorch's MaxPool2d(3, stride=2, padding=1) on NHWC: windows over the input padded with -inf."""
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    p = np.full((b, h + 2, w + 2, c), -np.inf)
    p[:, 1:-1, 1:-1] = x
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return np.stack([np.stack([p[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max((1, 2)) for j in range(wo)], 1)
                     for i in range(ho)], 1)


# ----------------------------------------------------------------------------------------------------------------
# torchvision's state dict, written out from torchvision.models.resnet (ResNet(Bottleneck, [3, 4, 6, 3]))


def torchvision_state_dict(stage_sizes=FULL, num_classes=1000, seed=0, fc=True):
    """A randomly initialised state dict with the names, shapes and order of torchvision's resnet50() (numpy
    arrays; num_batches_tracked int64 scalars): conv weights (out, in, kH, kW) He-normal, BN weights near 1,
    biases and running means near 0, running variances in [0.5, 2]."""
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(name, out, cin, k):
        sd[f"{name}.weight"] = rng.standard_normal((out, cin, k, k), dtype=np.float32) * np.float32(
            np.sqrt(2.0 / (cin * k * k)))

    def bn(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.bias"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
        sd[f"{name}.running_mean"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        sd[f"{name}.num_batches_tracked"] = np.array(0, np.int64)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    for s, (n, width) in enumerate(zip(stage_sizes, WIDTHS)):
        for b in range(n):
            p = f"layer{s + 1}.{b}"
            conv(f"{p}.conv1", width, inplanes, 1)
            bn(f"{p}.bn1", width)
            conv(f"{p}.conv2", width, width, 3)
            bn(f"{p}.bn2", width)
            conv(f"{p}.conv3", width * 4, width, 1)
            bn(f"{p}.bn3", width * 4)
            if b == 0:  # stride 2 (stages 2-4) or 64 -> 256 channels (stage 1)
                conv(f"{p}.downsample.0", width * 4, inplanes, 1)
                bn(f"{p}.downsample.1", width * 4)
            inplanes = width * 4
    if fc:
        sd["fc.weight"] = (rng.standard_normal((num_classes, 2048)) / np.sqrt(2048)).astype(np.float32)
        sd["fc.bias"] = (0.1 * rng.standard_normal(num_classes)).astype(np.float32)
    return sd


@pytest.fixture(scope="module")
def full_state_dict():
    return torchvision_state_dict()


@pytest.fixture(scope="module")
def full_converted(full_state_dict):
    return convert_torchvision_resnet50(full_state_dict)


@pytest.fixture(scope="module")
def small_state_dict():
    return torchvision_state_dict(SMALL)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory, small_state_dict):
    path = tmp_path_factory.mktemp("weights") / "small.npz"
    save_pretrained(convert_torchvision_resnet50(small_state_dict, stage_sizes=SMALL), path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize("num_classes, count", [(1000, 25_557_032), (0, 23_508_032)])
def test_parameter_count_matches_torchvision(num_classes, count, full_state_dict):
    """torchvision's resnet50() has 25,557,032 parameters (BN weight and bias included, running statistics not),
    as the state dict written out here says; without the fc (2048 * 1000 + 1000) 23,508,032. The state dict has
    320 entries: 53 convs, 53 BNs of 5 each, the fc's 2."""
    assert len(full_state_dict) == 320
    torch_params = sum(v.size for k, v in full_state_dict.items() if k.endswith((".weight", ".bias")))
    assert torch_params == 25_557_032 and torch_params - 2048 * 1000 - 1000 == 23_508_032
    model = get_model("resnet50", config=CFG, num_classes=num_classes)
    assert isinstance(model, ResNet50)
    shapes = _shapes(model, size=224, batch=1)
    assert _param_count(shapes) == count
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 224, 224, 3)), train=False), shapes)
    assert out.shape == (1, num_classes or 2048) and out.dtype == jnp.float32
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    assert not any("conv" in jax.tree_util.keystr(k) and "bias" in jax.tree_util.keystr(k) for k, _ in flat)


def test_stage_sizes_are_checked():
    with pytest.raises(ValueError, match="stage_sizes must be 4 block counts"):
        _shapes(ResNet50(stage_sizes=(1, 1, 1)))
    with pytest.raises(ValueError, match="stage_sizes"):
        _shapes(ResNet50(stage_sizes=(1, 0, 1, 1)))


# ----------------------------------------------------------------------------------------------------------------
# AlignQ: stem BN -> Q -> ReLU; bn1 -> Q -> ReLU, bn2 -> Q -> ReLU, bn3 -> Q -> (+ shortcut) -> ReLU


def _check_alignq_placement(model, v, x, values):
    """The AlignQ placement of ``model`` (config CFG) on its forward recorded under jit (``values``: every output
    checked against its reference) or under ``jax.eval_shape`` (data flow, module settings and shapes). Returns
    the block output shapes."""
    (logits, _), calls = record_calls_traced(model, v, x, abstract=not values, train=True,
                                             mutable=["batch_stats", GAP_COLLECTION])
    params = v["params"]
    blocks = _blocks(model.stage_sizes)

    def same(a, b):
        if values:
            np.testing.assert_array_equal(a, b)
        else:
            assert a.shape == b.shape

    def bn_quant(conv_path, bn_path, relu):
        if values:
            return _check_bn_quant(calls, conv_path, bn_path, params, CFG, relu, jit=True)
        conv, bn = _only(calls, conv_path), _only(calls, bn_path)
        assert isinstance(conv.module, QuantConv) and conv.module.config == CFG
        assert isinstance(bn.module, QuantBatchNorm) and bn.module.config == CFG
        assert bn.args[0] is conv.out and bn.module.relu is relu, bn_path
        return conv, bn

    stem, stem_bn = bn_quant(("conv1",), ("bn1",), True)
    same(stem.args[0], x)  # the image, unquantized
    assert stem.module.kernel_size == (7, 7) and stem.module.strides == 2 and stem.module.quantize_input is False
    assert stem.out.shape[1:] == (x.shape[1] // 2, x.shape[2] // 2, 64)
    h = None
    out_shapes = []
    for name, cin, width, stride, has_downsample in blocks:
        blk = _only(calls, (name,))
        if h is None:  # the max pool of the stem: 3x3, stride 2, padding 1
            if values:
                np.testing.assert_array_equal(blk.args[0], numpy_max_pool(stem_bn.out).astype(np.float32))
            else:
                assert blk.args[0].shape == (x.shape[0], x.shape[1] // 4, x.shape[2] // 4, 64)
        else:
            assert blk.args[0] is h, f"{name} is not fed by the previous block"
        c1, b1 = bn_quant((name, "conv1"), (name, "bn1"), True)
        c2, b2 = bn_quant((name, "conv2"), (name, "bn2"), True)
        c3, b3 = bn_quant((name, "conv3"), (name, "bn3"), False)
        assert c1.args[0] is blk.args[0] and c2.args[0] is b1.out and c3.args[0] is b2.out
        # v1.5: the stride on the 3x3 conv, none on the 1x1 convs.
        assert (c1.module.kernel_size, c1.module.strides, c1.module.features) == ((1, 1), 1, width)
        assert (c2.module.kernel_size, c2.module.strides, c2.module.features) == ((3, 3), stride, width)
        assert (c3.module.kernel_size, c3.module.strides, c3.module.features) == ((1, 1), 1, 4 * width)
        assert params[name]["conv2"]["kernel"].shape == (3, 3, width, width)
        if has_downsample:
            dc, db = _only(calls, (name, "downsample_conv")), _only(calls, (name, "downsample_bn"))
            assert isinstance(dc.module, QuantConv) and dc.module.config == CFG and dc.args[0] is blk.args[0]
            assert (dc.module.kernel_size, dc.module.strides) == ((1, 1), stride)
            # A plain BatchNorm after the (weight-quantized) downsample conv: its output is not quantized.
            assert isinstance(db.module, QuantBatchNorm) and db.args[0] is dc.out and db.module.relu is False
            assert not db.module.config.quantizes_bn_output
            if values:
                quantized, _ = _plain_conv_outputs(dc.module, params[name]["downsample_conv"]["kernel"],
                                                   dc.args[0], CFG.w_bits)
                np.testing.assert_allclose(dc.out, quantized, atol=1e-5)
                p = params[name]["downsample_bn"]
                want = numpy_batchnorm(dc.out, p["scale"], p["bias"], None, None, relu=False, train=True)
                np.testing.assert_allclose(db.out, want, rtol=1e-4, atol=1e-4)
                assert len(np.unique(db.out)) > 100 * 2**CFG.a_bits
            shortcut = db.out
        else:
            assert (name, "downsample_conv") not in calls and (name, "downsample_bn") not in calls
            shortcut = blk.args[0]
        if values:  # + shortcut -> ReLU, full precision
            np.testing.assert_array_equal(blk.out, jax.nn.relu(b3.out + shortcut))
        assert blk.out.shape == b3.out.shape == shortcut.shape
        out_shapes.append(blk.out.shape)
        h = blk.out
    n_convs = 1 + 3 * len(blocks) + sum(d for *_, d in blocks)
    assert len([p for p, c in calls.items() if isinstance(c[0].module, QuantConv)]) == n_convs
    assert len([p for p, c in calls.items() if isinstance(c[0].module, QuantBatchNorm)]) == n_convs
    # One correlation gap per quantized activation: the stem and three per block (none on the downsample BN).
    gaps = gap_shapes(model, v, x, train=True)
    assert len(jax.tree.leaves(gaps)) == 1 + 3 * len(blocks)
    assert not any("downsample" in jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(gaps)[0])
    fc = _only(calls, ("fc",))
    assert type(fc.module) is nn.Dense and logits.shape == (x.shape[0], model.num_classes)
    if values:
        _check_fp_classifier(calls, params, h)
        np.testing.assert_array_equal(fc.out, logits)
    return out_shapes


def test_alignq_quantizer_placement():
    """Every conv (stem, bottleneck and downsample convs) convolves its quantized kernel; the stem BN and every
    bottleneck's bn1, bn2 (-> ReLU) and bn3 (no ReLU) quantize their output; the downsample BN output, the block
    outputs (after + shortcut -> ReLU), the image and the classifier stay full precision. Every value on the
    reduced network; the data flow, settings and shapes of the full network at 224x224: 49 correlation gaps,
    blocks at 56, 28, 14, 7."""
    model = ResNet50(config=CFG, num_classes=10, stage_sizes=SMALL)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    v = random_variables(model, x)
    assert _check_alignq_placement(model, v, x, values=True) == [(4, 8, 8, 256), (4, 4, 4, 512), (4, 2, 2, 1024),
                                                                 (4, 1, 1, 2048)]
    full = ResNet50(config=CFG)
    xf = jnp.zeros((2, 224, 224, 3))  # two samples: a batch correlation
    shapes = _check_alignq_placement(full, _shapes(full, 224, 2), xf, values=False)
    want = [(2, 56, 56, 256)] * 3 + [(2, 28, 28, 512)] * 4 + [(2, 14, 14, 1024)] * 6 + [(2, 7, 7, 2048)] * 3
    assert shapes == want


def test_fp_config_has_no_quantizer_state_or_gaps():
    model = ResNet50(config=QuantConfig(), stage_sizes=SMALL)
    x = jnp.zeros((2, 32, 32, 3))
    shapes = _shapes(model)
    assert set(shapes) == {"params", "batch_stats"}
    assert not any("Quantizer" in k for k in flatten_variables(shapes))
    assert not jax.tree.leaves(gap_shapes(model, shapes, x, train=True))


# ----------------------------------------------------------------------------------------------------------------
# Conv-input methods: every conv but the stem quantizes its (non-negative) input

QUANTIZED_INPUT = ("conv1", "conv2", "conv3", "downsample_conv")


def test_conv_input_method_quantizes_every_conv_input_but_the_stem(method_name="lsq"):
    """On the reduced network (LSQ; the placement is the model's, the same for every conv-input method): each
    conv's kernel and input as the method quantizes them, the input of every conv but the stem (a block input, which follows the max pool or a block's ReLU, for conv1 and the downsample conv;
    the ReLU of bn1 / bn2 for conv2 / conv3), all non-negative; every BN a plain BN (-> ReLU), no gap."""
    bits = 4
    method = get_method(method_name)
    model = ResNet50(config=QuantConfig(bits, bits, method=method_name), num_classes=10, stage_sizes=SMALL)
    x = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
    variables = random_variables_with_quantizers(model, x, method, bits)
    _, seen, updates = _run_recorded(model, variables, x)
    assert not jax.tree.leaves(updates.get(GAP_COLLECTION, {}))
    params = variables["params"]
    blocks = _blocks(SMALL)
    convs = [p for p, r in seen.items() if "op" in r]
    assert len(convs) == 1 + 4 * len(blocks)
    previous = np.asarray(numpy_max_pool(seen["bn1"]["out"]), np.float32)  # the first block's input
    for name, *_ in blocks:
        for kind in QUANTIZED_INPUT:
            path = f"{name}/{kind}"
            raw, used = np.asarray(seen[path]["__call__"]), np.asarray(seen[path]["op"])
            p = params[name][kind]
            want_w = _quantize_weight(method, p.get("ConvQuantizer_0", {}).get("weight", {}), p["kernel"], bits)
            np.testing.assert_allclose(seen[path]["kernel"], want_w, rtol=0, atol=1e-6, err_msg=path)
            before = {"conv1": None, "downsample_conv": None, "conv2": f"{name}/bn1", "conv3": f"{name}/bn2"}[kind]
            if before is None:
                np.testing.assert_array_equal(raw, previous, err_msg=path)
            else:
                np.testing.assert_array_equal(raw, seen[before]["out"], err_msg=path)
            assert raw.min() >= 0.0, path
            state = _expected_state(method, variables, path, jnp.asarray(raw), True)
            np.testing.assert_allclose(used, _quantize_activation(method, state, jnp.asarray(raw), bits),
                                       rtol=0, atol=1e-6, err_msg=path)
            assert len(np.unique(used)) <= 2**bits and np.abs(used - raw).max() > 1e-3, path
        previous = np.asarray(jax.nn.relu(seen[f"{name}/bn3"]["out"] + seen[f"{name}/downsample_bn"]["out"]))
    # The stem convolves the image itself with its quantized kernel.
    np.testing.assert_array_equal(seen["conv1"]["op"], x)
    assert "activation" not in params["conv1"].get("ConvQuantizer_0", {})
    for path in [p for p, r in seen.items() if "in" in r]:
        p, s = params, variables["batch_stats"]
        for k in path.split("/"):
            p, s = p[k], s[k]
        relu = path == "bn1" or path.endswith(("/bn1", "/bn2"))
        want = numpy_batchnorm(seen[path]["in"], p["scale"], p["bias"], s["mean"], s["var"], relu=relu, train=True)
        np.testing.assert_allclose(seen[path]["out"], want, rtol=1e-4, atol=1e-4, err_msg=path)


def test_conv_input_placement_of_the_full_network():
    """The full network traced: all 52 convs after the stem convolve a new (quantized) input, the stem the image;
    only those own an activation quantizer."""
    model = ResNet50(config=QuantConfig(4, 4, method="lsq"))
    x = jnp.zeros((1, 224, 224, 3))
    shapes = _shapes(model, 224, 1)
    quantized = traced_conv_input_quantization(model, x, shapes)
    want = {f"{name}/{kind}" for name, *_, d in _blocks(FULL) for kind in QUANTIZED_INPUT
            if d or kind != "downsample_conv"}
    assert len(want) == 52
    assert {path for path, q in quantized.items() if q} == want
    assert {path for path, q in quantized.items() if not q} == {"conv1"}
    owners = {k.split("/ConvQuantizer_0")[0].split("/", 1)[1] for k in flatten_variables(shapes)
              if "/activation/" in k}
    assert owners == want


# ----------------------------------------------------------------------------------------------------------------
# Converter


def _fingerprint(a):
    """The same for an array and any transpose of it (exact: no sums), distinct for the random arrays here."""
    a = np.asarray(a)
    return a.size, float(a.max()), float(a.min())


def test_converter_uses_every_key_and_matches_the_model_shapes(full_state_dict, full_converted):
    """Every array of the state dict but the 53 num_batches_tracked counters comes out exactly once (possibly
    transposed), nothing else comes out, and the result has the tree and shapes of ResNet50's variables."""
    converted = full_converted
    flat = flatten_variables(converted)
    used = {k: v for k, v in full_state_dict.items() if not k.endswith("num_batches_tracked")}
    assert len(used) == 320 - 53 == len(flat)
    assert Counter(map(_fingerprint, used.values())) == Counter(map(_fingerprint, flat.values()))
    assert all(v.dtype == np.float32 for v in flat.values())
    model_shapes = _shapes(ResNet50(config=QuantConfig()))
    assert jax.tree.structure(jax.tree.map(np.shape, converted)) == jax.tree.structure(
        jax.tree.map(lambda s: s.shape, model_shapes))
    assert jax.tree.map(np.shape, converted) == jax.tree.map(lambda s: tuple(s.shape), model_shapes)
    # Named places, by index: OIHW -> HWIO, fc (classes, 2048) -> (2048, classes), BN names and collections.
    w = full_state_dict["layer2.0.conv2.weight"]
    assert converted["params"]["layer2_0"]["conv2"]["kernel"][2, 0, 5, 7] == w[7, 5, 2, 0]
    d = full_state_dict["layer3.0.downsample.0.weight"]
    assert converted["params"]["layer3_0"]["downsample_conv"]["kernel"][0, 0, 11, 13] == d[13, 11, 0, 0]
    np.testing.assert_array_equal(converted["params"]["layer3_0"]["downsample_bn"]["scale"],
                                  full_state_dict["layer3.0.downsample.1.weight"])
    np.testing.assert_array_equal(converted["batch_stats"]["layer4_2"]["bn3"]["var"],
                                  full_state_dict["layer4.2.bn3.running_var"])
    np.testing.assert_array_equal(converted["batch_stats"]["bn1"]["mean"], full_state_dict["bn1.running_mean"])
    np.testing.assert_array_equal(converted["params"]["fc"]["kernel"], full_state_dict["fc.weight"].T)


def torch_layout_forward(sd, x_nchw, stage_sizes):
    """ResNet-50 in evaluation mode in torch's layout (NCHW activations, OIHW kernels, torchvision's module
    names), from torchvision's forward: returns (output of the stem + max pool + layer1.0, logits)."""
    hp = jax.lax.Precision.HIGHEST

    def conv(x, name, stride=1, pad=0):
        return jax.lax.conv_general_dilated(x, sd[f"{name}.weight"], (stride, stride), [(pad, pad), (pad, pad)],
                                            dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=hp)

    def bn(x, name):
        c = lambda a: sd[f"{name}.{a}"][None, :, None, None]  # noqa: E731
        return (x - c("running_mean")) / jnp.sqrt(c("running_var") + 1e-5) * c("weight") + c("bias")

    x = jax.nn.relu(bn(conv(x_nchw, "conv1", 2, 3), "bn1"))
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2), [(0, 0), (0, 0), (1, 1), (1, 1)])
    first = None
    for s, n in enumerate(stage_sizes):
        for b in range(n):
            p = f"layer{s + 1}.{b}"
            stride = 2 if s > 0 and b == 0 else 1
            y = jax.nn.relu(bn(conv(x, f"{p}.conv1"), f"{p}.bn1"))
            y = jax.nn.relu(bn(conv(y, f"{p}.conv2", stride, 1), f"{p}.bn2"))
            y = bn(conv(y, f"{p}.conv3"), f"{p}.bn3")
            identity = bn(conv(x, f"{p}.downsample.0", stride), f"{p}.downsample.1") if b == 0 else x
            x = jax.nn.relu(y + identity)
            first = x if first is None else first
    pooled = x.mean((2, 3))
    return first, jnp.dot(pooled, sd["fc.weight"].T, precision=hp) + sd["fc.bias"]


def test_converted_weights_give_the_torch_layout_forward(small_state_dict):
    """The FP model on the converted weights, in evaluation mode (the random running statistics), equals the
    forward written above in torch's layout: after the stem and the first bottleneck (with its downsample), and
    the logits of the reduced network."""
    sd = {k: jnp.asarray(v) for k, v in small_state_dict.items() if not k.endswith("num_batches_tracked")}
    x = jax.random.normal(jax.random.key(7), (2, 3, 64, 64))  # NCHW
    want_first, want_logits = jax.jit(lambda x: torch_layout_forward(sd, x, SMALL))(x)
    variables = convert_torchvision_resnet50(small_state_dict, stage_sizes=SMALL)
    model = ResNet50(config=QuantConfig(), num_classes=1000, stage_sizes=SMALL)
    run = jax.jit(lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                                           mutable=["intermediates"]))
    logits, inter = run(variables, jnp.transpose(x, (0, 2, 3, 1)))
    first = jnp.transpose(inter["intermediates"]["layer1_0"]["__call__"][0], (0, 3, 1, 2))
    assert first.shape == (2, 256, 16, 16)
    scale = float(jnp.abs(want_first).max())
    np.testing.assert_allclose(first, want_first, rtol=1e-4, atol=1e-4 * scale)
    assert float(jnp.abs(want_logits).std()) > 0.1  # not a degenerate comparison
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4 * float(jnp.abs(want_logits).max()))


class FakeTensor:
    """The part of torch.Tensor's interface the converter uses (torch is not installed here)."""

    def __init__(self, array):
        self.array = np.asarray(array)

    def detach(self):
        return self

    def cpu(self):
        return self

    def is_floating_point(self):
        return np.issubdtype(self.array.dtype, np.floating)

    def float(self):
        return FakeTensor(self.array.astype(np.float32))

    def numpy(self):
        return self.array


def test_converter_accepts_tensors_and_half_precision(small_state_dict):
    tensors = {k: FakeTensor(v.astype(np.float16) if k.startswith("layer2") and v.dtype == np.float32 else v)
               for k, v in small_state_dict.items()}
    got = flatten_variables(convert_torchvision_resnet50(tensors, stage_sizes=SMALL))
    want = flatten_variables(convert_torchvision_resnet50(small_state_dict, stage_sizes=SMALL))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == np.float32, k
        if "layer2_0" in k:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-3, atol=1e-3, err_msg=k)
        else:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_converter_without_fc_gives_a_backbone(small_state_dict):
    sd = {k: v for k, v in small_state_dict.items() if not k.startswith("fc.")}
    converted = convert_torchvision_resnet50(sd, stage_sizes=SMALL)
    assert "fc" not in converted["params"]
    assert jax.tree.map(np.shape, converted) == jax.tree.map(
        lambda s: tuple(s.shape), _shapes(ResNet50(num_classes=0, stage_sizes=SMALL)))


def _edited(sd, drop=(), **replace):
    out = {k: v for k, v in sd.items() if k not in drop}
    out.update({k.replace("__", "."): v for k, v in replace.items()})
    return out


@pytest.mark.parametrize("edit, match", [
    (dict(layer1__0__conv4__weight=np.zeros((1, 1, 1, 1))), r"no torchvision ResNet-50 layer.*layer1\.0\.conv4"),
    (dict(conv1__bias=np.zeros(64)), r"no torchvision ResNet-50 layer.*'conv1\.bias'"),
    (dict(drop=("layer3.0.bn2.running_var",)), r"missing \['layer3\.0\.bn2\.running_var'\]"),
    (dict(layer1__0__conv2__weight=np.zeros((64, 64, 1, 1), np.float32)),
     r"layer1\.0\.conv2\.weight \(converted to params/layer1_0/conv2/kernel\): shape \(1, 1, 64, 64\) after "
     r"conversion, ResNet-50 needs \(3, 3, 64, 64\)"),
    (dict(layer1__0__conv2__weight=np.zeros((64, 64, 3), np.float32)), r"layer1\.0\.conv2\.weight: a conv weight "
                                                                       r"must be 4-D"),
    (dict(layer4__1__conv1__weight=np.zeros((512, 2048, 1, 1), np.float32)), r"unexpected \['layer4\.1\.conv1"),
])
def test_converter_errors_name_the_key(small_state_dict, edit, match):
    edit = dict(edit)
    drop = edit.pop("drop", ())
    with pytest.raises(ValueError, match=match):
        convert_torchvision_resnet50(_edited(small_state_dict, drop, **edit), stage_sizes=SMALL)


def test_converter_error_hints_at_a_data_parallel_prefix(small_state_dict):
    with pytest.raises(ValueError, match="DataParallel.*'module.' prefix"):
        convert_torchvision_resnet50({f"module.{k}": v for k, v in small_state_dict.items()}, stage_sizes=SMALL)


# ----------------------------------------------------------------------------------------------------------------
# File and partial restore


def test_file_keys_are_the_variable_paths(tmp_path, small_state_dict):
    """A flat .npz of "/"-joined paths that numpy alone reads; the name is kept as given."""
    converted = convert_torchvision_resnet50(small_state_dict, stage_sizes=SMALL)
    path = save_pretrained(converted, tmp_path / "weights.bin")
    assert path == tmp_path / "weights.bin" and sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]
    with np.load(path, allow_pickle=False) as data:
        assert "params/layer1_0/downsample_conv/kernel" in data.files and "batch_stats/bn1/var" in data.files
        np.testing.assert_array_equal(data["params/fc/bias"], small_state_dict["fc.bias"])
        assert len(data.files) == len(flatten_variables(converted))
    back = read_pretrained(path)
    assert jax.tree.all(jax.tree.map(np.array_equal, back, converted))


def _template(model, seed=1, x=None):
    x = jnp.zeros((2, 32, 32, 3)) if x is None else x
    return random_variables(model, x, seed=seed)


@pytest.mark.parametrize("num_classes", [31, 0])
def test_restore_takes_the_backbone_and_keeps_a_new_head(small_file, small_state_dict, num_classes):
    """Into a model with another head (31 classes) or none: every backbone entry from the file, the template's
    head kept, the file's fc dropped and said why."""
    model = ResNet50(config=CFG, num_classes=num_classes, stage_sizes=SMALL)
    template = _template(model)
    variables, report = load_pretrained(small_file, template)
    assert isinstance(report, RestoreReport)
    file_flat = flatten_variables(read_pretrained(small_file))
    got = flatten_variables(variables)
    assert got.keys() == flatten_variables(template).keys()
    backbone = [k for k in file_flat if not k.startswith("params/fc/")]
    assert sorted(report.loaded) == sorted(backbone)
    for k in backbone:
        np.testing.assert_array_equal(got[k], file_flat[k], err_msg=k)
    np.testing.assert_array_equal(variables["params"]["layer1_0"]["conv2"]["kernel"],
                                  small_state_dict["layer1.0.conv2.weight"].transpose(2, 3, 1, 0))
    assert set(report.dropped) == {"params/fc/kernel", "params/fc/bias"}
    if num_classes:
        assert "(2048, 1000) in the file, (2048, 31) in the template" in report.dropped["params/fc/kernel"]
        assert set(report.kept) == {"params/fc/kernel", "params/fc/bias"}
        assert got["params/fc/kernel"] is flatten_variables(template)["params/fc/kernel"]
    else:
        assert report.dropped["params/fc/kernel"] == "the template has no 'fc'" and report.kept == ()


def test_restore_with_the_same_head_loads_it_unless_fresh(small_file):
    model = ResNet50(config=CFG, num_classes=1000, stage_sizes=SMALL)
    template = _template(model)
    file_fc = read_pretrained(small_file)["params"]["fc"]
    variables, report = load_pretrained(small_file, template)
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], file_fc["kernel"])
    assert report.dropped == {} and report.kept == ()
    variables, report = load_pretrained(small_file, template, fresh=("fc",))
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], template["params"]["fc"]["kernel"])
    assert set(report.dropped) == {"params/fc/kernel", "params/fc/bias"}
    assert set(report.kept) == {"params/fc/kernel", "params/fc/bias"}
    with pytest.raises(ValueError, match=r"fresh names no module.*\['head'\]"):
        load_pretrained(small_file, template, fresh=("head",))
    with pytest.raises(ValueError, match=r"fresh must be a sequence of module names, e.g. \('fc',\); got 'fc'"):
        load_pretrained(small_file, template, fresh="fc")


def test_restore_keeps_the_quantizer_state_of_the_template(small_file):
    """An LSQ template: kernels and BN from the file, every ConvQuantizer parameter and statistic the
    template's."""
    method = get_method("lsq")
    model = ResNet50(config=QuantConfig(4, 4, method="lsq"), num_classes=31, stage_sizes=SMALL)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    template = random_variables_with_quantizers(model, x, method, 4)
    variables, report = load_pretrained(small_file, template)
    quantizer = {k for k in flatten_variables(template) if "ConvQuantizer_0" in k}
    assert quantizer and quantizer <= set(report.kept)
    assert set(report.kept) == quantizer | {"params/fc/kernel", "params/fc/bias"}
    got, want = flatten_variables(variables), flatten_variables(template)
    for k in quantizer:
        assert got[k] is want[k]
    assert not any("ConvQuantizer" in k for k in report.loaded) and len(report.loaded) == len(
        [k for k in flatten_variables(read_pretrained(small_file)) if "/fc/" not in k])


class DomainAdaptationNet(nn.Module):
    """The shape of a domain-adaptation network: the ResNet-50 features under "backbone", then new heads."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        features = ResNet50(config=CFG, num_classes=0, stage_sizes=SMALL, name="backbone")(x, train)
        return nn.Dense(31, name="classifier")(nn.Dense(256, name="bottleneck")(features))


def test_restore_into_a_prefix(small_file):
    model = DomainAdaptationNet()
    template = _template(model)
    assert set(template["params"]) == {"backbone", "bottleneck", "classifier"}
    for prefix in ("backbone", ("backbone",)):
        variables, report = load_pretrained(small_file, template, prefix=prefix)
        file_flat = flatten_variables(read_pretrained(small_file))
        got, want = flatten_variables(variables), flatten_variables(template)
        for k, v in file_flat.items():
            if "/fc/" in k:
                continue
            collection, rest = k.split("/", 1)
            np.testing.assert_array_equal(got[f"{collection}/backbone/{rest}"], v)
        for k in want:
            if "/backbone/" not in k:
                assert got[k] is want[k], k  # the new heads: the template's
        assert report.loaded[0].startswith(("params/backbone/", "batch_stats/backbone/"))
        assert report.dropped == {"params/backbone/fc/kernel": "the template has no 'fc' under prefix 'backbone'",
                                  "params/backbone/fc/bias": "the template has no 'fc' under prefix 'backbone'"}
    # The network takes the restored variables (traced: the tree and every shape fit).
    out = jax.eval_shape(lambda v: model.apply(v, jnp.ones((1, 32, 32, 3)), train=False), variables)
    assert out.shape == (1, 31)


# ----------------------------------------------------------------------------------------------------------------
# Restore errors


def test_missing_file_says_how_to_make_it(tmp_path):
    path = tmp_path / "nowhere" / "resnet50.npz"
    with pytest.raises(FileNotFoundError) as info:
        load_pretrained(path, {})
    message = str(info.value)
    assert str(path) in message and "alignq-convert-torchvision" in message and "resnet50-0676ba61.pth" in message


def test_not_a_weights_file(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("not weights")
    with pytest.raises(ValueError, match="is not a weights file"):
        read_pretrained(text)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match="a single array"):
        read_pretrained(single)


def test_shape_mismatch_names_the_key_and_both_shapes(small_file, tmp_path):
    pretrained = read_pretrained(small_file)
    pretrained["params"]["layer2_0"]["conv2"]["kernel"] = np.zeros((3, 3, 128, 64), np.float32)
    path = save_pretrained(pretrained, tmp_path / "edited.npz")
    template = _template(ResNet50(config=CFG, num_classes=31, stage_sizes=SMALL))
    with pytest.raises(ValueError, match=r"params/layer2_0/conv2/kernel: shape \(3, 3, 128, 64\) in the file, "
                                         r"\(3, 3, 128, 128\) in the template"):
        load_pretrained(path, template)


def test_a_file_of_another_network_is_refused(small_file):
    template = _template(get_model("resnet20", config=CFG))
    with pytest.raises(ValueError, match="is this a ResNet-50 checkpoint"):
        load_pretrained(small_file, template)
    # The right network at the wrong place: the same question, naming where it looked.
    da = _template(DomainAdaptationNet())
    with pytest.raises(ValueError, match="is this a ResNet-50 checkpoint.*hold a ResNet50 at the top"):
        load_pretrained(small_file, da)
    with pytest.raises(ValueError, match=r"prefix 'encoder'.*has no 'encoder'.*\['backbone', 'bottleneck'"):
        load_pretrained(small_file, da, prefix="encoder")
    with pytest.raises(ValueError, match="prefix must be None, a module name"):
        load_pretrained(small_file, da, prefix="")


def test_more_blocks_in_the_file_than_in_the_template(full_converted):
    """Full ResNet-50 weights into the reduced network: the extra blocks have no place."""
    template = _template(ResNet50(config=CFG, num_classes=31, stage_sizes=SMALL))
    with pytest.raises(ValueError, match=r"entries of the file have no place in the template.*layer1_1"):
        restore_pretrained(full_converted, template)


def test_a_template_entry_missing_from_the_file_is_refused(small_file, tmp_path):
    pretrained = read_pretrained(small_file)
    del pretrained["params"]["layer3_0"]["bn2"]["scale"]
    path = save_pretrained(pretrained, tmp_path / "truncated.npz")
    template = _template(ResNet50(config=CFG, num_classes=31, stage_sizes=SMALL))
    with pytest.raises(ValueError, match=r"the file lacks 1 entries.*'params/layer3_0/bn2/scale'"):
        load_pretrained(path, template)


def test_a_collection_missing_from_the_template_is_refused(small_file):
    template = _template(ResNet50(config=CFG, num_classes=31, stage_sizes=SMALL))
    with pytest.raises(ValueError, match="the template has no collection 'batch_stats'"):
        restore_pretrained(read_pretrained(small_file), {"params": template["params"]})


# ----------------------------------------------------------------------------------------------------------------
# The converter CLI (torch replaced by a stand-in module)


@pytest.fixture
def fake_torch(monkeypatch, full_state_dict):
    calls = []

    def load(path, map_location=None, weights_only=False):
        calls.append((path, map_location, weights_only))
        return {k: FakeTensor(v) for k, v in full_state_dict.items()}

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=load))
    return calls


def test_cli_converts_a_checkpoint(tmp_path, fake_torch, full_converted, capsys):
    from alignq_jax.cli.convert_torchvision import main

    ckpt = tmp_path / "resnet50-0676ba61.pth"
    ckpt.write_bytes(b"stand-in")
    out = tmp_path / "resnet50.npz"
    assert main([str(ckpt), str(out)]) == 0
    assert fake_torch == [(str(ckpt), "cpu", True)]  # tensors only: no code in the file runs
    assert "25,557,032 parameters" in capsys.readouterr().out
    got, want = read_pretrained(out), full_converted
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want))
    # An existing output is kept unless --overwrite.
    assert main([str(ckpt), str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main([str(ckpt), str(out), "--overwrite"]) == 0


def test_cli_without_torch_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    from alignq_jax.cli.convert_torchvision import main

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    ckpt = tmp_path / "resnet50.pth"
    ckpt.write_bytes(b"stand-in")
    assert main([str(ckpt), str(tmp_path / "out.npz")]) == 2
    assert "pip install torch" in capsys.readouterr().err
    assert not (tmp_path / "out.npz").exists()
    assert main([str(tmp_path / "absent.pth"), str(tmp_path / "out.npz")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_cli_refuses_a_checkpoint_that_is_no_state_dict(tmp_path, monkeypatch, capsys):
    from alignq_jax.cli.convert_torchvision import main

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=lambda *a, **k: {"epoch": 3}))
    ckpt = tmp_path / "checkpoint.pth"
    ckpt.write_bytes(b"stand-in")
    assert main([str(ckpt), str(tmp_path / "out.npz")]) == 2
    assert "expected a state dict" in capsys.readouterr().err
