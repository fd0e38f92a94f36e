"""Per-layer rules (QuantRules): first match wins, the default covers the rest, layer_report lists every
quantization-aware layer of ResNet-20 (counted here from the architecture) and the rules that matched nothing, a
rule really changes the kernel a conv uses, correlation=False on a rule removes that layer's gap, and bad rules
are refused. Also: a method object as QuantConfig.method (AlignQ(levels="paper")) is the name plus its options, and
options contradicting it are refused."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax import quantizers
from alignq_jax.methods import METHODS, AlignQ, Uniform
from alignq_jax.models import get_model
from alignq_jax.quantize import (
    ConvQuantizer, QuantActivation, QuantBatchNorm, QuantConfig, QuantConv, QuantRules, gap_shapes,
    layer_report, module_path,
)
from alignq_jax.training import TrainConfig, make_model

X = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))


@pytest.fixture(scope="module")
def variables():
    """ResNet-20 variables: alignq and uniform configs (any bits, any rules) have no quantizer state, so the
    full-precision model's variables serve every model of this file."""
    model = get_model("resnet20", config=QuantConfig(), num_classes=10)
    return random_variables(model, X)


def random_variables(model, x, seed=0, bn_scale=(0.8, 1.2)):
    """Variables of ``model`` with random values drawn in numpy (no compiled initialiser): He-normal kernels,
    BatchNorm scales drawn from ``bn_scale``, variances near 1, biases and means near 0."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=True))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), leaf.shape), jnp.float32)
        if name == "scale":
            return jnp.asarray(rng.uniform(*bn_scale, leaf.shape), jnp.float32)
        if name == "var":
            return jnp.asarray(rng.uniform(0.8, 1.2, leaf.shape), jnp.float32)
        return jnp.asarray(rng.normal(0, 0.1, leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _apply_recording(model, variables, interceptor_factory):
    """Jitted train-mode apply under an interceptor that fills a dict; returns (logits, that dict)."""

    def run(v):
        seen = {}
        with nn.intercept_methods(interceptor_factory(seen)):
            out, _ = model.apply(v, X, train=True, mutable=["batch_stats"])
        return out, seen

    return jax.jit(run)(variables)


def resnet20_layers() -> dict[str, str]:
    """Every quantization-aware layer of ResNet-20 ("conv" or "bn"), from the architecture: a stem conv + BN, 3
    stages of 3 basic blocks with two conv + BN pairs each, and a 1x1 conv + BN shortcut in the first block of
    stages 1 and 2 (where the width doubles and the stride is 2). The classifier is a plain Dense."""
    layers = {"stem_conv": "conv", "stem_bn": "bn"}
    for stage in range(3):
        for block in range(3):
            prefix = f"stage{stage}_block{block}/"
            layers.update({prefix + "conv0": "conv", prefix + "bn0": "bn", prefix + "conv1": "conv",
                           prefix + "bn1": "bn"})
            if stage > 0 and block == 0:
                layers.update({prefix + "shortcut_conv": "conv", prefix + "shortcut_bn": "bn"})
    return layers


LAYERS = resnet20_layers()


def _record_conv_operands(seen: dict):
    """Interceptor: for each QuantConv path, the (lhs, rhs) its ConvQuantizer op convolves."""

    def intercept(next_fun, args, kwargs, context):
        if isinstance(context.module, ConvQuantizer) and context.method_name == "op":
            seen[module_path(context.module.parent)] = (args[0], args[1])
        return next_fun(*args, **kwargs)

    return intercept


# ----------------------------------------------------------------------------------------------------------------
# Resolution


def test_first_match_wins_and_default_covers_the_rest(variables):
    a, b, d = QuantConfig(2, 2), QuantConfig(8, 8), QuantConfig(4, 4)
    rules = QuantRules((("stage0_.*conv", a), ("conv", b), ("stage0", QuantConfig(3, 3))), default=d)

    def expected(path):  # written by hand, not with re
        name = path.split("/")[-1]
        if path.startswith("stage0_") and "conv" in name:
            return a
        if "conv" in path:
            return b
        if path.startswith("stage0"):
            return rules.rules[2][1]
        return d

    model = get_model("resnet20", config=rules, num_classes=10)
    report = layer_report(model, variables, X, train=True)
    assert set(report.layers) == set(LAYERS)
    for path, config in report.layers.items():
        assert config is expected(path), path
    # The stage0 BNs take the third rule (the second rule does not match them), every other BN the default.
    assert report.layers["stage0_block1/bn0"].w_bits == 3 and report.layers["stage1_block1/bn0"] is d
    assert report.unmatched == ()


@pytest.mark.parametrize("train", [True, False])
def test_layer_report_lists_every_layer_and_unmatched_rules(variables, train):
    rules = QuantRules(
        (("stem_conv", QuantConfig(8, 8)), ("fc", QuantConfig(4, 4)), ("stgae1_block0", QuantConfig(2, 2))),
        default=QuantConfig(4, 4),
    )
    model = get_model("resnet20", config=rules, num_classes=10)
    report = layer_report(model, variables, X, train=train)
    assert sorted(report.layers) == sorted(LAYERS) and len(report.layers) == 21 + 21
    assert report.layers["stem_conv"].w_bits == 8
    assert all(c.w_bits == 4 for p, c in report.layers.items() if p != "stem_conv")
    # "fc" names a plain nn.Dense (not quantization-aware), "stgae1" is a typo: both matched nothing.
    assert report.unmatched == ("fc", "stgae1_block0")


def test_layer_report_small_cnn():
    rules = QuantRules((("conv0", QuantConfig(8, 8)), ("nothing_here", QuantConfig(2, 2))), default=QuantConfig(4, 4))
    model = get_model("small_cnn", config=rules, num_classes=10)
    x = X[..., :1]
    variables = jax.eval_shape(lambda: model.init(jax.random.key(1), x, train=True))  # layer_report is abstract
    report = layer_report(model, variables, x, train=True)
    assert sorted(report.layers) == ["bn0", "bn1", "bn2", "conv0", "conv1", "conv2"]
    assert report.unmatched == ("nothing_here",)


def test_layer_report_counts_every_layer_of_a_plain_config(variables):
    model = get_model("resnet20", config=QuantConfig(4, 4), num_classes=10)
    report = layer_report(model, variables, X, train=True)
    assert sorted(report.layers) == sorted(LAYERS) and report.unmatched == ()


# ----------------------------------------------------------------------------------------------------------------
# A rule changes what the layer computes


def test_rule_keeps_stem_conv_at_8_bits(variables):
    rules = QuantRules((("stem_conv", QuantConfig(8, 4)),), default=QuantConfig(4, 4))
    model = get_model("resnet20", config=rules, num_classes=10)
    params = variables["params"]
    out, seen = _apply_recording(model, variables, _record_conv_operands)
    convs = [p for p, k in LAYERS.items() if k == "conv"]
    assert sorted(seen) == sorted(convs)
    for path in convs:
        kernel = params
        for name in path.split("/"):
            kernel = kernel[name]
        kernel = kernel["kernel"]
        used = seen[path][1]
        bits = 8 if path == "stem_conv" else 4
        # jit may fuse a multiply-add: 1 ulp from the eager function
        np.testing.assert_allclose(used, quantizers.alignq_weight(kernel, bits), rtol=0, atol=1e-6, err_msg=path)
        distinct = len(np.unique(np.asarray(used)))
        if bits == 8:
            assert 16 < distinct <= 256  # 432 weights: many more values than a 4-bit grid has
        else:
            assert distinct <= 16, path
    # The rule changes the network's output (it is not ignored).
    plain = get_model("resnet20", config=QuantConfig(4, 4), num_classes=10)
    ref, _ = _apply_recording(plain, variables, lambda seen: lambda f, a, k, c: f(*a, **k))
    assert float(jnp.max(jnp.abs(ref - out))) > 1e-4


def test_rule_can_keep_a_layer_in_full_precision(variables):
    rules = QuantRules((("stem_conv", QuantConfig()),), default=QuantConfig(4, 4))
    model = get_model("resnet20", config=rules, num_classes=10)
    _, seen = _apply_recording(model, variables, _record_conv_operands)
    np.testing.assert_array_equal(seen["stem_conv"][1], variables["params"]["stem_conv"]["kernel"])
    k = variables["params"]["stage0_block0"]["conv0"]["kernel"]
    np.testing.assert_allclose(seen["stage0_block0/conv0"][1], quantizers.alignq_weight(k, 4), rtol=0, atol=1e-6)


def test_rule_bits_of_a_batchnorm_quantizer(variables):
    """A rule on one BN changes its activation grid only: 2-bit stem_bn output (with its ReLU) has at most 4
    values, the 4-bit BNs at most 16 and more than 4."""
    rules = QuantRules((("stem_bn", QuantConfig(4, 2)),), default=QuantConfig(4, 4))
    model = get_model("resnet20", config=rules, num_classes=10)

    def record_bn_outputs(outs):
        def intercept(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if isinstance(context.module, QuantBatchNorm) and context.method_name == "__call__":
                outs[module_path(context.module)] = out
            return out

        return intercept

    _, outs = _apply_recording(model, variables, record_bn_outputs)
    assert len(np.unique(np.asarray(outs["stem_bn"]))) <= 4
    counts = [len(np.unique(np.asarray(outs[p]))) for p, k in LAYERS.items() if k == "bn" and p != "stem_bn"]
    assert max(counts) <= 16 and min(counts) > 4


# ----------------------------------------------------------------------------------------------------------------
# The correlation term per layer


def _gap_paths(config: TrainConfig, variables) -> set[str]:
    model = make_model(config, 10)
    gaps = gap_shapes(model, variables, X, train=True)
    paths = set()
    for keys, leaf in jax.tree_util.tree_flatten_with_path(gaps)[0]:
        names = [k.key for k in keys if isinstance(k, jax.tree_util.DictKey)]
        assert names[-1] == "gap" and leaf.shape == (4, 4)
        paths.add("/".join(names[:-1]))
    return paths


def test_correlation_false_rule_removes_that_layers_gap(variables):
    bns = {p for p, k in LAYERS.items() if k == "bn"}
    plain = TrainConfig(model="resnet20", quant=QuantConfig(4, 4), admm=True)
    assert _gap_paths(plain, variables) == bns  # every BN quantizer records its gap with ADMM on

    rules = QuantRules(
        (("stage0_block0/bn0", QuantConfig(4, 4, correlation=False)),), default=QuantConfig(4, 4)
    )
    config = TrainConfig(model="resnet20", quant=rules, admm=True)
    assert config.quant.resolve("stage0_block0/bn0").correlation is False
    assert config.quant.resolve("stage0_block1/bn0").correlation is True
    assert _gap_paths(config, variables) == bns - {"stage0_block0/bn0"}


def test_correlation_only_on_layers_whose_method_defines_it(variables):
    """A rule giving stage 2 a conv-input method: only the alignq BatchNorms record gaps with ADMM."""
    rules = QuantRules((("stage2", QuantConfig(4, 4, method="dorefa")),), default=QuantConfig(4, 4))
    config = TrainConfig(model="resnet20", quant=rules, admm=True)
    bns = {p for p, k in LAYERS.items() if k == "bn" and not p.startswith("stage2")}
    assert len(bns) == 14
    assert _gap_paths(config, variables) == bns


# ----------------------------------------------------------------------------------------------------------------
# Bad rules


@pytest.mark.parametrize(
    "rules, default, match",
    [
        ((("stage0_block0/conv(", QuantConfig(4, 4)),), QuantConfig(), "regular expression"),
        ((("conv", {"w_bits": 4}),), QuantConfig(), "QuantConfig"),
        ((("conv", QuantRules()),), QuantConfig(), "QuantConfig"),
        ((("conv", 4),), QuantConfig(), "QuantConfig"),
        ((("conv",),), QuantConfig(), "pair"),
        (("conv",), QuantConfig(), "pair"),
        (((3, QuantConfig(4, 4)),), QuantConfig(), "string"),
        ((), {"w_bits": 4}, "default"),
        ((), None, "default"),
    ],
)
def test_bad_rules_raise(rules, default, match):
    with pytest.raises(ValueError, match=match):
        QuantRules(rules, default=default)


def test_rules_accept_lists():
    rules = QuantRules([["stem", QuantConfig(8, 8)]], default=QuantConfig(4, 4))
    assert rules.resolve("stem_conv").w_bits == 8 and rules.resolve("stage0_block0/conv0").w_bits == 4


def test_models_refuse_a_non_config():
    model = get_model("resnet20", config={"w_bits": 4}, num_classes=10)
    with pytest.raises(ValueError, match="QuantConfig or QuantRules"):
        jax.eval_shape(lambda: model.init(jax.random.key(1), X, train=True))


# ----------------------------------------------------------------------------------------------------------------
# A method object as QuantConfig.method: normalised to the name plus its options


def test_alignq_object_equals_the_name_with_its_options():
    by_object = QuantConfig(4, 4, method=AlignQ(levels="paper", surrogate=(1.0, 4.0)))
    by_name = QuantConfig(4, 4, levels="paper", surrogate=(1.0, 4.0))
    assert by_object == by_name and hash(by_object) == hash(by_name)
    assert by_object.method == "alignq" and by_object.quantizer == AlignQ(levels="paper", surrogate=(1.0, 4.0))
    # Same numerics as the functions with those options: the kernel a QuantConv uses, the activation grid.
    x = jax.random.normal(jax.random.key(5), (2, 5, 5, 3))
    conv = QuantConv(4, (3, 3), config=by_object)
    v = conv.init(jax.random.key(6), x)
    seen = {}
    with nn.intercept_methods(_record_conv_operands(seen)):
        conv.apply(v, x)
    np.testing.assert_array_equal(seen[""][1], quantizers.alignq_weight(v["params"]["kernel"], 4, levels="paper"))
    np.testing.assert_array_equal(QuantActivation(by_object).apply({}, x),
                                  quantizers.alignq_activation(x, 4, levels="paper"))
    assert len(np.unique(np.asarray(seen[""][1]))) > 16  # "paper" levels: more than 2^4 values at 4 bits


def test_uniform_object_equals_the_name_with_its_options():
    by_object = QuantConfig(3, 3, method=Uniform(act_range=3.0))
    assert by_object == QuantConfig(3, 3, method="uniform", act_range=3.0)
    x = jax.random.normal(jax.random.key(7), (2, 5, 5, 3)) * 2
    np.testing.assert_array_equal(QuantActivation(by_object).apply({}, x),
                                  quantizers.uniform_activation(x, 3, act_range=3.0))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(levels="paper", method=AlignQ()),
        dict(act_range=3.0, method=AlignQ(act_range=2.5)),
        dict(surrogate=(2.0, 4.0), method=AlignQ(surrogate=(1.0, 4.0))),
        dict(stop_stats_grad=True, method=Uniform(stop_stats_grad=False, levels="paper"), levels="paper"),
    ],
)
def test_options_contradicting_the_method_object_raise(kwargs):
    with pytest.raises(ValueError, match="contradicts"):
        QuantConfig(4, 4, **kwargs)


def test_options_agreeing_with_the_method_object_are_accepted():
    config = QuantConfig(4, 4, levels="paper", act_range=2.5, method=AlignQ(levels="paper", act_range=2.5))
    assert config == QuantConfig(4, 4, levels="paper", act_range=2.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(method="dorefa", levels="paper"),
        dict(method="lsq", act_range=3.0),
        dict(method="apot", surrogate=(1.0, 4.0)),
        dict(method="pact", stop_stats_grad=True),
    ],
)
def test_alignq_options_with_another_method_raise(kwargs):
    if kwargs["method"] not in METHODS:
        pytest.skip(f"method {kwargs['method']!r} is not registered yet")
    with pytest.raises(ValueError, match="levels|act_range|surrogate|stop_stats_grad"):
        QuantConfig(4, 4, **kwargs)
