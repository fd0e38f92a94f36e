"""MobileNetV2 for 32x32 inputs: torchvision's parameter count, the quantizer placement of AlignQ (every BN output
quantized; ReLU6 after the unsigned-grid quantizer) and of conv-input methods (only the convs after a ReLU6
quantize their input), the FP network at 32 bits (ReLU6's cap at 6 included), jit == no-jit, and per-layer rules
by module path. The forward is recorded with Flax method interception, as in test_models: traced under jit on a
reduced block table with every kind of block (every value checked), and under ``jax.eval_shape`` on the full
network (its data flow, module settings and shapes, nothing computed)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax import quantizers
from alignq_jax.methods import METHODS, get_method
from alignq_jax.models.mobilenet_v2 import INVERTED_RESIDUAL_SETTINGS, MobileNetV2, mobilenet_v2
from alignq_jax.quantize import (
    GAP_COLLECTION, ConvQuantizer, QuantBatchNorm, QuantConfig, QuantConv, QuantRules, gap_shapes, layer_report,
    module_path,
)
from test_quant_rules import random_variables
from test_models import CFG, _check_bn_quant, _check_fp_classifier, _only, record_calls_traced
from test_placement_conv_input import _expected_state, numpy_batchnorm
from test_placement_conv_input import random_variables as random_variables_with_quantizers

N_BLOCKS = 17
N_CONVS = 52  # stem, 2 in block0 (t=1), 3 in each of the 16 others, head; one BN after each


# A reduced table with every kind of block, for the checks that run the network: a t=1 block, an expansion block
# at stride 2, a residual block (stride 1, same channels), a stride-1 block that changes the channel count.
SMALL_TABLE = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 1))
JIT_TABLE = SMALL_TABLE[:2]  # blocks 0-2: t=1, expansion at stride 2, residual


def _blocks(table=None):
    """(name, input channels, expansion, output channels, stride) of every block; by default from the torchvision
    table written out here (the 24-channel stage at stride 1 for 32x32 inputs)."""
    if table is None:
        table = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                 (6, 320, 1, 1)]
        assert tuple(table) == INVERTED_RESIDUAL_SETTINGS
    out, cin = [], 32
    for t, c, n, s in table:
        for b in range(n):
            out.append((f"block{len(out)}", cin, t, c, s if b == 0 else 1))
            cin = c
    return out


def _param_count(variables) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


def _shapes(model, size=32):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, size, size, 3)), train=True))


# ----------------------------------------------------------------------------------------------------------------
# Parameter count and layer shapes


@pytest.mark.parametrize("num_classes, count", [(1000, 3_504_872), (10, 2_236_682)])
def test_parameter_count_matches_torchvision(num_classes, count):
    """torchvision's mobilenet_v2() has 3,504,872 parameters (BN scale and bias included, running statistics
    not); the strides changed for 32x32 do not change it. With 10 classes the Dense has 1280*990 + 990 fewer."""
    shapes = _shapes(mobilenet_v2(config=CFG, num_classes=num_classes))
    assert _param_count(shapes) == count
    assert 3_504_872 - 2_236_682 == 1280 * 990 + 990
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    assert not any("conv" in jax.tree_util.keystr(k) and "bias" in jax.tree_util.keystr(k) for k, _ in flat)
    assert not any("depthwise" in jax.tree_util.keystr(k) and "bias" in jax.tree_util.keystr(k)
                   and "_bn" not in jax.tree_util.keystr(k) for k, _ in flat)


def test_layer_shapes_follow_the_table():
    params = _shapes(mobilenet_v2(config=QuantConfig()))["params"]
    assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 32)
    for name, cin, t, c, _ in _blocks():
        hidden = cin * t
        block = params[name]
        assert ("expand_conv" in block) == (t != 1), name
        if t != 1:
            assert block["expand_conv"]["kernel"].shape == (1, 1, cin, hidden)
        assert block["depthwise"]["kernel"].shape == (3, 3, 1, hidden)  # one filter per channel
        assert block["project_conv"]["kernel"].shape == (1, 1, hidden, c)
    assert len([k for k in params if k.startswith("block")]) == N_BLOCKS
    assert params["head_conv"]["kernel"].shape == (1, 1, 320, 1280)
    assert params["fc"]["kernel"].shape == (1280, 10)


# ----------------------------------------------------------------------------------------------------------------
# AlignQ: BN -> Q -> ReLU6, projection BN -> Q


def _bn_quant(calls, conv_path, bn_path, params, relu, values):
    """``_check_bn_quant`` (jitted forward) with ``values``; else its structural part: module types and configs,
    the BN fed by the conv, the relu flag."""
    if values:
        return _check_bn_quant(calls, conv_path, bn_path, params, CFG, relu, jit=True)
    conv, bn = _only(calls, conv_path), _only(calls, bn_path)
    assert isinstance(conv.module, QuantConv) and conv.module.config == CFG
    assert isinstance(bn.module, QuantBatchNorm) and bn.module.config == CFG
    assert bn.args[0] is conv.out, f"{bn_path} is not fed by {conv_path}"
    assert bn.module.relu is relu, f"{bn_path}: relu={bn.module.relu}, expected {relu}"
    return conv, bn


def _check_alignq_placement(model, v, x, values):
    """The AlignQ placement of ``model`` (config CFG) on its forward recorded under jit (``values``: every output
    checked against its reference) or under ``jax.eval_shape`` (data flow, module settings and shapes only).
    Returns the number of residual adds."""
    (logits, _), calls = record_calls_traced(model, v, x, abstract=not values, train=True,
                                             mutable=["batch_stats", GAP_COLLECTION])
    params = v["params"]
    blocks = _blocks(model.block_settings)
    n_convs = 2 + sum(3 if t != 1 else 2 for _, _, t, _, _ in blocks)

    def same(a, b):  # the value (jitted forward) or the shape (abstract)
        if values:
            np.testing.assert_array_equal(a, b)
        else:
            assert a.shape == b.shape

    stem_conv, stem_bn = _bn_quant(calls, ("stem_conv",), ("stem_bn",), params, True, values)
    same(stem_conv.args[0], x)  # the image itself, unquantized
    h = np.minimum(stem_bn.out, 6.0) if values else stem_bn.out
    residuals = 0
    for name, cin, t, c, stride in blocks:
        blk = _only(calls, (name,))
        same(blk.args[0], h)
        if t != 1:
            ce, be = _bn_quant(calls, (name, "expand_conv"), (name, "expand_bn"), params, True, values)
            assert ce.args[0] is blk.args[0] and ce.module.kernel_size == (1, 1)
            dw_in = np.minimum(be.out, 6.0) if values else be.out
        else:
            assert (name, "expand_conv") not in calls and (name, "expand_bn") not in calls
            dw_in = h
        cd, bd = _bn_quant(calls, (name, "depthwise"), (name, "depthwise_bn"), params, True, values)
        same(cd.args[0], dw_in)
        assert cd.module.feature_group_count == cin * t and cd.module.strides == stride
        assert params[name]["depthwise"]["kernel"].shape == (3, 3, 1, cin * t)
        if values:  # unsigned grid before the ReLU6: at most 2^bits values, all >= 0
            assert np.asarray(bd.out).min() >= 0 and len(np.unique(bd.out)) <= 2**CFG.a_bits
        cp, bp = _bn_quant(calls, (name, "project_conv"), (name, "project_bn"), params, False, values)
        same(cp.args[0], np.minimum(bd.out, 6.0) if values else bd.out)
        assert blk.out.shape == bp.out.shape
        if stride == 1 and cin == c:
            assert blk.out is not bp.out
            if values:
                np.testing.assert_array_equal(blk.out, bp.out + blk.args[0])
            residuals += 1
        else:
            assert blk.out is bp.out
        h = blk.out
    head_conv, head_bn = _bn_quant(calls, ("head_conv",), ("head_bn",), params, True, values)
    assert head_conv.args[0] is h
    assert len([p for p, c in calls.items() if isinstance(c[0].module, QuantBatchNorm)]) == n_convs
    assert len([p for p, c in calls.items() if isinstance(c[0].module, QuantConv)]) == n_convs
    assert len(jax.tree.leaves(gap_shapes(model, v, x, train=True))) == n_convs  # one correlation term each
    fc = _only(calls, ("fc",))
    assert type(fc.module) is nn.Dense and logits.shape == (x.shape[0], model.num_classes)
    if values:
        _check_fp_classifier(calls, params, np.minimum(head_bn.out, 6.0))
        np.testing.assert_array_equal(fc.out, logits)
    return residuals


def test_alignq_quantizer_placement():
    """Every conv (depthwise ones included) convolves its quantized kernel; every BN output is quantized: with
    relu=True (the unsigned grid, then min(., 6)) before each ReLU6, relu=False after a projection conv; residual
    adds where the stride is 1 and the channels match; image and classifier full precision. Every value on a
    reduced table with each kind of block; the data flow, module settings and shapes of the full network."""
    model = MobileNetV2(config=CFG, block_settings=SMALL_TABLE)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))  # 8 -> 4: placement is size-independent
    v = jax.jit(lambda x: model.init(jax.random.key(1), x, train=True))(x)
    assert _check_alignq_placement(model, v, x, values=True) == 2
    full = MobileNetV2(config=CFG)
    xf = jnp.zeros((2, 32, 32, 3))
    assert N_CONVS == 2 + sum(3 if t != 1 else 2 for _, _, t, _, _ in _blocks())
    assert _check_alignq_placement(full, _shapes(full), xf, values=False) == 10


# ----------------------------------------------------------------------------------------------------------------
# Conv-input methods: only convs after a ReLU6 quantize their input

QUANTIZED_INPUT = ("depthwise", "project_conv")
FP_INPUT = ("stem_conv", "expand_conv", "head_conv")


def _record_operands(seen):
    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        m = context.module
        if isinstance(m, ConvQuantizer) and context.method_name in ("__call__", "op"):
            entry = seen.setdefault(module_path(m.parent), {})
            entry[context.method_name] = args[0]
            if context.method_name == "op":
                entry["kernel"] = args[1]
        elif isinstance(m, QuantBatchNorm) and context.method_name == "__call__":
            seen[module_path(m)] = {"in": args[0], "out": out}
        return out

    return intercept


def traced_conv_input_quantization(model, x, shapes) -> dict[str, bool]:
    """{conv path: whether its operand differs from its input (a quantized input)} for a training-mode forward
    of ``model`` on ``x``, traced only (``jax.eval_shape`` over the variable ``shapes``)."""
    quantized = {}

    def run(v):
        seen = {}
        with nn.intercept_methods(_record_operands(seen)):
            model.apply(v, x, train=True, mutable=["batch_stats", GAP_COLLECTION])
        quantized.update({path: r["op"] is not r["__call__"] for path, r in seen.items() if "op" in r})
        return 0

    jax.eval_shape(run, shapes)
    return quantized


def _run_recorded(model, variables, x, train=True):
    def run(v):
        seen = {}
        with nn.intercept_methods(_record_operands(seen)):
            out, updates = model.apply(v, x, train=train, mutable=["batch_stats", GAP_COLLECTION])
        return out, seen, updates

    return jax.jit(run)(variables)


def _conv_input_params():
    names = ("lsq", "pact", "dorefa", "apot", "absmax")
    return [pytest.param(n, marks=pytest.mark.skipif(n not in METHODS, reason=f"{n!r} is not registered"))
            for n in names]


# The references jitted: one compiled program per shape instead of every op of the quantizer eagerly.
_quantize_weight = jax.jit(lambda method, params, w, bits: method.quantize_weight(params, w, bits),
                           static_argnums=(0, 3))
_quantize_activation = jax.jit(lambda method, state, x, bits: method.quantize_activation(state, x, bits),
                               static_argnums=(0, 3))


@pytest.mark.parametrize("method_name", _conv_input_params())
def test_conv_input_method_quantizes_only_inputs_after_relu6(method_name):
    """On the reduced table (every kind of block): each conv's kernel and input as the method quantizes them,
    the input only after a ReLU6; every BN plain. The full network's placement: the next test."""
    bits = 4
    method = get_method(method_name)
    model = MobileNetV2(config=QuantConfig(bits, bits, method=method_name), block_settings=SMALL_TABLE)
    n_blocks = len(_blocks(SMALL_TABLE))
    n_convs = 2 + sum(3 if t != 1 else 2 for _, _, t, _, _ in _blocks(SMALL_TABLE))
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
    variables = random_variables_with_quantizers(model, x, method, bits)
    _, seen, updates = _run_recorded(model, variables, x)
    assert not jax.tree.leaves(updates.get(GAP_COLLECTION, {}))
    convs = [p for p, r in seen.items() if "op" in r]
    assert len(convs) == n_convs
    params = variables["params"]
    n_quantized = 0
    for path in convs:
        raw, used = np.asarray(seen[path]["__call__"]), np.asarray(seen[path]["op"])
        kind = path.split("/")[-1]
        # Weights always quantized (the depthwise (3, 3, 1, C) kernels too).
        p = params
        for k in path.split("/"):
            p = p[k]
        quantizer = p.get("ConvQuantizer_0", {})
        want_w = _quantize_weight(method, quantizer.get("weight", {}), p["kernel"], bits)
        np.testing.assert_allclose(seen[path]["kernel"], want_w, rtol=0, atol=1e-6, err_msg=path)
        assert np.abs(np.asarray(seen[path]["kernel"]) - np.asarray(p["kernel"])).max() > 1e-4, path
        if kind in FP_INPUT:
            np.testing.assert_array_equal(used, raw, err_msg=path)
            assert "activation" not in quantizer, path
            if kind != "stem_conv":
                assert raw.min() < 0, f"{path}: expected a signed input"
            else:
                np.testing.assert_array_equal(raw, x)
            continue
        assert kind in QUANTIZED_INPUT, path
        block = path.split("/")[0]
        before = {"project_conv": f"{block}/depthwise_bn",
                  "depthwise": "stem_bn" if block == "block0" else f"{block}/expand_bn"}[kind]
        np.testing.assert_array_equal(raw, np.minimum(np.asarray(seen[before]["out"]), 6.0), err_msg=path)
        assert 0.0 <= raw.min() and raw.max() <= 6.0, path
        state = _expected_state(method, variables, path, jnp.asarray(raw), True)
        want = _quantize_activation(method, state, jnp.asarray(raw), bits)
        np.testing.assert_allclose(used, want, rtol=0, atol=1e-6, err_msg=path)
        assert len(np.unique(used)) <= 2**bits, path
        assert np.abs(used - raw).max() > 1e-3, f"{path}: the input was not quantized"
        n_quantized += 1
    assert n_quantized == 2 * n_blocks
    # Every BN is a plain BN (-> ReLU before the cap), nothing quantized.
    bns = [p for p, r in seen.items() if "in" in r]
    assert len(bns) == n_convs
    for path in bns:
        p, s = params, variables["batch_stats"]
        for k in path.split("/"):
            p, s = p[k], s[k]
        want = numpy_batchnorm(seen[path]["in"], p["scale"], p["bias"], s["mean"], s["var"],
                               relu=not path.endswith("project_bn"), train=True)
        np.testing.assert_allclose(seen[path]["out"], want, rtol=1e-4, atol=1e-4, err_msg=path)


@pytest.mark.parametrize("method_name", _conv_input_params()[:1])
def test_conv_input_placement_of_the_full_network(method_name):
    """The full network traced (``jax.eval_shape``, nothing computed): the depthwise and projection convs of all
    17 blocks convolve a new (quantized) input, the stem, expansion and head convs the input they are given; only
    the former own an activation quantizer (the placement is the model's, the same for every conv-input
    method)."""
    model = MobileNetV2(config=QuantConfig(4, 4, method=method_name))
    x = jnp.zeros((2, 32, 32, 3))
    shapes = _shapes(model)
    quantized = traced_conv_input_quantization(model, x, shapes)
    assert len(quantized) == N_CONVS
    want = {f"{name}/{kind}" for name, *_ in _blocks() for kind in QUANTIZED_INPUT}
    assert {path for path, q in quantized.items() if q} == want
    assert all(path.split("/")[-1] in FP_INPUT for path, q in quantized.items() if not q)
    owners = {"/".join(str(k.key) for k in path[: [k.key for k in path].index("ConvQuantizer_0")])
              for path, _ in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
              if "activation" in [k.key for k in path]}
    assert owners == want


# ----------------------------------------------------------------------------------------------------------------
# Full precision, jit, rules


def test_fp32_config_is_the_plain_network_with_relu6():
    """QuantConfig(): no quantizer state or gaps, (B, num_classes) logits, and ReLU6 = clip(BN, 0, 6) with the cap
    reached (BN scales of 4-8 push many values past 6)."""
    model = mobilenet_v2(config=QuantConfig(), num_classes=10)
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    init = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=True))
    assert set(init) == {"params", "batch_stats"}
    assert not any("Quantizer" in jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(init)[0])
    assert not jax.tree.leaves(gap_shapes(model, init, x, train=True))
    v = random_variables(model, x, bn_scale=(4.0, 8.0))
    logits, seen, updates = _run_recorded(model, v, x)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert not jax.tree.leaves(updates.get(GAP_COLLECTION, {}))
    capped = 0
    for name, _, t, _, _ in _blocks():
        bn_before_dw = "stem_bn" if t == 1 else f"{name}/expand_bn"
        for conv, bn in ((f"{name}/depthwise", bn_before_dw), (f"{name}/project_conv", f"{name}/depthwise_bn")):
            pre = np.asarray(seen[bn]["out"])  # BN -> ReLU
            np.testing.assert_array_equal(seen[conv]["__call__"], np.clip(pre, 0.0, 6.0))
            np.testing.assert_array_equal(seen[conv]["op"], seen[conv]["__call__"])  # FP: nothing quantized
            capped += int(pre.max() > 6.0)
    assert capped > N_BLOCKS  # the cap really acts


def _record_bns(seen):
    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, QuantBatchNorm) and context.method_name == "__call__":
            seen[module_path(context.module)] = (args[0], out)
        return out

    return intercept


def test_jit_equals_no_jit_in_evaluation():
    """The FP network: jitted logits equal eager ones (to float32 reordering). The 4-bit AlignQ network: every
    BN -> Q gives the same output jitted and eager wherever its input is the same (up to 1e-5), except threshold
    flips (a few elements, one level). Whole-network logits are not compared there: the grid levels themselves
    can differ by one float32 ulp between the compiled and the eager computation, and over many quantized layers
    such differences flip roundings that then spread. An eager forward compiles every op for every new shape, so
    this runs the first three blocks of the reduced table: a t=1 block, an expansion block at stride 2, a residual
    block."""
    x = jax.random.normal(jax.random.key(4), (2, 16, 16, 3))
    fp = MobileNetV2(config=QuantConfig(), num_classes=10, block_settings=JIT_TABLE)
    v = random_variables(fp, x)  # alignq keeps no quantizer state: the same variables serve the 4-bit model
    eager = fp.apply(v, x, train=False)
    jitted = jax.jit(lambda v, x: fp.apply(v, x, train=False))(v, x)
    assert eager.shape == (2, 10)
    np.testing.assert_allclose(jitted, eager, rtol=1e-4, atol=1e-4)  # float32 reordering over the conv + BN

    cfg = QuantConfig(4, 4)
    model = MobileNetV2(config=cfg, num_classes=10, block_settings=JIT_TABLE)

    def run(v, x):
        seen = {}
        with nn.intercept_methods(_record_bns(seen)):
            model.apply(v, x, train=False)
        return seen

    eager, jitted = run(v, x), jax.jit(run)(v, x)
    assert len(eager) == 2 + 2 + 3 + 3
    step = 2 * cfg.act_range / (2**cfg.a_bits - 1)
    compared = total = 0
    for path, (ie, oe) in eager.items():
        ij, oj = jitted[path]
        same_input = np.abs(np.asarray(ie) - np.asarray(ij)) <= 1e-5
        diff = np.abs(np.asarray(oe) - np.asarray(oj))[same_input]
        if path == "stem_bn":
            assert same_input.all()
        if diff.size:
            assert diff.max() <= step * 1.001, path
            assert np.mean(diff > 1e-5) < 1e-3, path
            compared += diff.size
        total += np.asarray(oe).size
    assert compared > total / 2  # most inputs agree: the comparison covers most of the network


def test_rules_give_depthwise_layers_their_own_bits():
    """QuantRules by module path: "depthwise" matches every block's depthwise conv and its BN (8 bits), the rest
    takes the default (4 bits); the depthwise kernel convolved is the 8-bit one."""
    rules = QuantRules([("depthwise", QuantConfig(8, 8))], default=QuantConfig(4, 4))
    model = MobileNetV2(config=rules)
    x = jax.random.normal(jax.random.key(5), (2, 8, 8, 3))
    report = layer_report(model, _shapes(model, 8), x, train=True)  # abstract: shapes suffice
    assert report.unmatched == ()
    eight = {p for p, c in report.layers.items() if c.w_bits == 8}
    assert eight == {f"block{i}/{n}" for i in range(N_BLOCKS) for n in ("depthwise", "depthwise_bn")}
    assert len(report.layers) == 2 * N_CONVS
    assert all(c.w_bits == 4 for p, c in report.layers.items() if p not in eight)
    # The kernels convolved, on the reduced table (the same rules; compiling the full network is slow).
    small = MobileNetV2(config=rules, block_settings=SMALL_TABLE)
    v = random_variables(small, x)
    _, seen, _ = _run_recorded(small, v, x)
    for path, bits in (("block2/depthwise", 8), ("block2/project_conv", 4)):
        kernel = v["params"]["block2"][path.split("/")[1]]["kernel"]
        np.testing.assert_allclose(seen[path]["kernel"], quantizers.alignq_weight(kernel, bits), atol=1e-6)
        assert len(np.unique(seen[path]["kernel"])) <= 2**bits
    assert len(np.unique(seen["block2/depthwise"]["kernel"])) > 16  # more than 4 bits' worth
