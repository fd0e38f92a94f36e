"""Where the activation quantizer sits, per method, in ResNet-20 and the SmallCNN.

Methods placed on conv inputs (dorefa, apot, and lsq / pact / absmax once registered): every conv but the first
convolves a quantized copy of its (non-negative, post-ReLU) input, the first conv convolves the image as it is,
every BatchNorm is a plain BatchNorm (+ ReLU) with nothing quantized, and no correlation gap is recorded.
AlignQ and uniform: conv inputs pass unchanged and the BatchNorm outputs are quantized.

The operands are read with ``nn.intercept_methods`` on the ConvQuantizer (its ``__call__`` receives the raw input,
its ``op`` the operands it convolves) and on QuantBatchNorm (input and output, compared with a BatchNorm computed
here in numpy).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax.methods import CONV_INPUT, METHODS, get_method
from alignq_jax.models import get_model
from alignq_jax.quantize import (
    GAP_COLLECTION, ConvQuantizer, QuantBatchNorm, QuantConfig, QuantRules, module_path,
)
from alignq_jax.training import TrainConfig

BITS = 4
CONV_INPUT_NAMES = ("dorefa", "apot", "lsq", "pact", "absmax")


def _registered(names):
    return [
        pytest.param(n, marks=pytest.mark.skipif(n not in METHODS, reason=f"method {n!r} is not registered yet"))
        for n in names
    ]


def test_conv_input_names_are_conv_input_methods():
    for name in CONV_INPUT_NAMES:
        if name in METHODS:
            assert METHODS[name].placement == CONV_INPUT, name
    # Every registered method placed on conv inputs is tested here.
    assert {n for n, cls in METHODS.items() if cls.placement == CONV_INPUT} <= set(CONV_INPUT_NAMES)


MODELS = {
    # name: (input channels, the first conv (it convolves the image), number of convs = number of BatchNorms)
    "small_cnn": (1, "conv0", 3),
    "resnet20": (3, "stem_conv", 21),
    "small_resnet": (1, "stem_conv", 10),
}
MODEL_PARAMS = [pytest.param("small_cnn"), pytest.param("resnet20", marks=pytest.mark.slow),
                pytest.param("small_resnet", marks=pytest.mark.slow)]


def _input(model_name, seed=0):
    channels = MODELS[model_name][0]
    return jax.random.normal(jax.random.key(seed), (4, 8, 8, channels))


def _leaf_value(method, bits, path, leaf, kernels, rng):
    """A value for one variable: kernels He-normal, BN scales/variances near 1, biases/means near 0; quantizer
    parameters by the method's own init rules (weights from the conv's kernel, activations from a stand-in
    non-negative batch), quantizer statistics from the same stand-in batch."""
    names = [p.key for p in path]
    if "ConvQuantizer_0" in names:
        conv = "/".join(names[1: names.index("ConvQuantizer_0")])
        kind, key = names[-2], names[-1]
        if kind == "weight":
            return jnp.asarray(method.init_weight(kernels[conv], bits)[key], jnp.float32)
        stand_in = jnp.abs(jnp.asarray(rng.normal(size=(4, 8, 8, kernels[conv].shape[-2])), jnp.float32))
        if key in method.activation_params and names[0] == "params":
            return jnp.asarray(method.init_activation(stand_in, bits)[key], jnp.float32)
        return jnp.asarray(method.activation_batch_stats(stand_in, bits)[key], jnp.float32)
    if names[-1] == "kernel":
        return kernels["/".join(names[1:-1])]
    if names[-1] in ("scale", "var"):
        return jnp.asarray(rng.uniform(0.8, 1.2, leaf.shape), jnp.float32)
    return jnp.asarray(rng.normal(0, 0.1, leaf.shape), jnp.float32)


def random_variables(model, x, method, bits=BITS, seed=0):
    """Variables of ``model`` filled in numpy (no compiled initialiser; see ``_leaf_value``)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=True))
    rng = np.random.default_rng(seed)
    kernels = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]:
        names = [p.key for p in path]
        if names[-1] == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            kernels["/".join(names[:-1])] = jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), leaf.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _leaf_value(method, bits, path, leaf, kernels, rng), shapes
    )


def _record(seen):
    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if isinstance(module, ConvQuantizer) and context.method_name in ("__call__", "op"):
            seen.setdefault(module_path(module.parent), {})[context.method_name] = args[0]
        elif isinstance(module, QuantBatchNorm) and context.method_name == "__call__":
            seen[module_path(module)] = {"in": args[0], "out": out}
        return out

    return intercept


def run_recorded(model, variables, x, train):
    """Jitted apply recording every conv's raw and convolved input and every BN's input and output; also returns
    the names of the collections the apply wrote (gaps would appear there)."""

    def run(v):
        seen = {}
        with nn.intercept_methods(_record(seen)):
            _, updates = model.apply(v, x, train=train, mutable=["batch_stats", GAP_COLLECTION])
        return seen, updates

    seen, updates = jax.jit(run)(variables)
    return seen, {k for k, v in updates.items() if jax.tree.leaves(v)}


def _get(tree, path):
    for name in path.split("/"):
        tree = tree[name]
    return tree


def numpy_batchnorm(h, scale, bias, mean, var, relu, train, eps=1e-5):
    h = np.asarray(h, np.float64)
    if train:
        mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
    y = (h - np.asarray(mean, np.float64)) / np.sqrt(np.asarray(var, np.float64) + eps) * scale + bias
    return np.maximum(y, 0.0) if relu else y


def _check_plain_batchnorms(variables, seen, train):
    bns = [p for p, r in seen.items() if "in" in r]
    for path in bns:
        module_vars = _get(variables["params"], path)
        stats = _get(variables["batch_stats"], path)
        # Top-level BNs (stem_bn, the SmallCNN's) and a block's bn0 are followed by a ReLU; a block's bn1 and
        # shortcut_bn are not (the ReLU follows the addition).
        relu = "/" not in path or path.endswith("/bn0")
        want = numpy_batchnorm(seen[path]["in"], module_vars["scale"], module_vars["bias"], stats["mean"],
                               stats["var"], relu, train)
        got = np.asarray(seen[path]["out"])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=path)
        assert len(np.unique(got)) > 4 * 2**BITS, f"{path}: its output looks quantized"
    return bns


def _expected_state(method, variables, path, raw, train):
    quantizer_params = _get(variables["params"], path).get("ConvQuantizer_0", {})
    state = dict(quantizer_params.get("activation", {}))
    if method.activation_stats:
        if train:
            state.update(method.activation_batch_stats(raw, BITS))
        else:
            state.update(_get(variables["batch_stats"], path)["ConvQuantizer_0"]["activation"])
    return state


# ----------------------------------------------------------------------------------------------------------------
# Conv-input methods


@pytest.mark.parametrize("model_name", MODEL_PARAMS)
@pytest.mark.parametrize("method_name", _registered(CONV_INPUT_NAMES))
def test_conv_input_methods_quantize_every_conv_input_but_the_first(model_name, method_name):
    method = get_method(method_name)
    model = get_model(model_name, config=QuantConfig(BITS, BITS, method=method_name), num_classes=10)
    x = _input(model_name)
    variables = random_variables(model, x, method)
    seen, written = run_recorded(model, variables, x, train=True)
    first = MODELS[model_name][1]
    convs = [p for p, r in seen.items() if "op" in r]
    assert len(convs) == MODELS[model_name][2]
    # The first conv sees the image itself.
    np.testing.assert_array_equal(seen[first]["op"], seen[first]["__call__"])
    np.testing.assert_array_equal(seen[first]["__call__"], x)
    for path in convs:
        if path == first:
            continue
        raw, used = np.asarray(seen[path]["__call__"]), np.asarray(seen[path]["op"])
        assert raw.min() >= 0.0, f"{path}: its input does not follow a ReLU"
        want = method.quantize_activation(_expected_state(method, variables, path, raw, True), jnp.asarray(raw), BITS)
        np.testing.assert_allclose(used, want, rtol=0, atol=1e-6, err_msg=path)
        assert len(np.unique(used)) <= 2**BITS, path
        assert np.abs(used - raw).max() > 1e-3, f"{path}: the input was not quantized"
    bns = _check_plain_batchnorms(variables, seen, train=True)
    assert len(bns) == len(convs)
    assert GAP_COLLECTION not in written


@pytest.mark.parametrize("method_name", _registered(CONV_INPUT_NAMES))
def test_conv_input_placement_in_evaluation_mode(method_name):
    """Evaluation mode: the same placement, BatchNorm with its running statistics, quantizer statistics (if the
    method keeps any) from the running values."""
    method = get_method(method_name)
    model = get_model("small_cnn", config=QuantConfig(BITS, BITS, method=method_name), num_classes=10)
    x = _input("small_cnn", seed=1)
    variables = random_variables(model, x, method, seed=1)
    seen, _ = run_recorded(model, variables, x, train=False)
    np.testing.assert_array_equal(seen["conv0"]["op"], x)
    for path in ("conv1", "conv2"):
        raw = seen[path]["__call__"]
        want = method.quantize_activation(_expected_state(method, variables, path, raw, False), raw, BITS)
        np.testing.assert_allclose(seen[path]["op"], want, rtol=0, atol=1e-6, err_msg=path)
    _check_plain_batchnorms(variables, seen, train=False)


@pytest.mark.parametrize("method_name", _registered(CONV_INPUT_NAMES))
def test_conv_input_methods_have_no_correlation_term(method_name):
    with pytest.raises(ValueError, match="correlation"):
        QuantConfig(BITS, BITS, method=method_name, correlation=True)
    with pytest.raises(ValueError, match="admm"):
        TrainConfig(model="small_cnn", quant=QuantConfig(BITS, BITS, method=method_name), admm=True)


def test_dorefa_inputs_against_numpy():
    """DoReFa's conv input in the SmallCNN, from its formula: round(15 * clip(x, 0, 1)) / 15."""
    model = get_model("small_cnn", config=QuantConfig(BITS, BITS, method="dorefa"), num_classes=10)
    x = _input("small_cnn", seed=2)
    variables = random_variables(model, x, get_method("dorefa"), seed=2)
    seen, _ = run_recorded(model, variables, x, train=True)
    for path in ("conv1", "conv2"):
        raw = np.asarray(seen[path]["__call__"], np.float64)
        assert raw.max() > 1.0  # the clip matters
        want = np.round(15 * np.clip(raw, 0, 1)) / 15
        np.testing.assert_allclose(seen[path]["op"], want, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# BN-output methods: the existing placement


@pytest.mark.parametrize("model_name", MODEL_PARAMS)
@pytest.mark.parametrize("method_name", ["alignq", "uniform"])
def test_bn_output_methods_leave_conv_inputs_alone(model_name, method_name):
    model = get_model(model_name, config=QuantConfig(BITS, BITS, method=method_name), num_classes=10)
    x = _input(model_name)
    variables = random_variables(model, x, get_method(method_name))
    assert not any("ConvQuantizer_0" in jax.tree_util.keystr(p)
                   for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0])
    seen, _ = run_recorded(model, variables, x, train=True)
    convs = [p for p, r in seen.items() if "op" in r]
    bns = [p for p, r in seen.items() if "in" in r]
    assert len(convs) == len(bns) == MODELS[model_name][2]
    for path in convs:
        np.testing.assert_array_equal(seen[path]["op"], seen[path]["__call__"], err_msg=path)
    for path in bns:
        assert len(np.unique(np.asarray(seen[path]["out"]))) <= 2**BITS, f"{path}: BN output not quantized"


@pytest.mark.slow
def test_rules_mix_placements_per_layer():
    """Stage 2 with APoT (conv inputs), the rest with AlignQ (BN outputs): each layer follows its own method."""
    rules = QuantRules((("stage2", QuantConfig(BITS, BITS, method="apot")),), default=QuantConfig(BITS, BITS))
    model = get_model("resnet20", config=rules, num_classes=10)
    x = _input("resnet20")
    variables = random_variables(model, x, get_method("apot"))
    owners = {
        "/".join(p.key for p in path[: [q.key for q in path].index("ConvQuantizer_0")])
        for path, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
        if "ConvQuantizer_0" in [q.key for q in path]
    }
    assert owners == {f"stage2_block{b}/conv{i}" for b in range(3) for i in range(2)} | {"stage2_block0/shortcut_conv"}
    seen, _ = run_recorded(model, variables, x, train=True)
    apot = get_method("apot")
    for path, rec in seen.items():
        if "op" in rec:
            if path.startswith("stage2"):
                alpha = _get(variables["params"], path)["ConvQuantizer_0"]["activation"]
                want = apot.quantize_activation(alpha, rec["__call__"], BITS)
                np.testing.assert_allclose(rec["op"], want, rtol=0, atol=1e-6, err_msg=path)
            else:
                np.testing.assert_array_equal(rec["op"], rec["__call__"], err_msg=path)
        else:
            distinct = len(np.unique(np.asarray(rec["out"])))
            if path.startswith("stage2"):
                assert distinct > 4 * 2**BITS, path
            else:
                assert distinct <= 2**BITS, path
