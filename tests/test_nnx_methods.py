"""NNX layers with the methods that learn parameters or keep statistics: the same values and gradients as the
Linen layers and as the method's functions composed by hand, parameters that are nnx.Param (an nnx.Optimizer
trains them), and the layers work under nnx.jit and nnx.grad (NNXQuantConv swaps its ``promote_dtype`` during a
call)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignq_jax.methods import METHODS, get_method
from alignq_jax.quantize import NNXQuantConv, NNXQuantLinear, QuantConfig, QuantConv, QuantDense

BITS = 4
CONV_INPUT_METHODS = ("apot", "lsq", "pact", "dorefa", "absmax")
# Values for the learned parameters, away from their inits so that a layer ignoring them would be caught.
SET_VALUES = {("apot", "weight", "alpha"): 2.0, ("apot", "activation", "alpha"): 1.5,
              ("lsq", "weight", "step"): 0.11, ("lsq", "activation", "step"): 0.23,
              ("pact", "activation", "alpha"): 1.3}
X = jnp.abs(jax.random.normal(jax.random.key(0), (2, 6, 6, 3))) * 1.5  # a post-ReLU conv input


def _registered(names):
    return [
        pytest.param(n, marks=pytest.mark.skipif(n not in METHODS, reason=f"method {n!r} is not registered yet"))
        for n in names
    ]


def _conv(method_name, seed=0, **kw):
    return NNXQuantConv(3, 4, (3, 3), config=QuantConfig(BITS, BITS, method=method_name), rngs=nnx.Rngs(seed), **kw)


def _quantizer_vars(layer, method):
    """The NNX layer's quantizer state as Linen's ConvQuantizer_0 collections (params, batch_stats)."""
    params, stats = {}, {}
    for name in method.weight_params:
        params.setdefault("weight", {})[name] = getattr(layer, f"weight_{name}").get_value()
    for name in method.activation_params:
        params.setdefault("activation", {})[name] = getattr(layer, f"activation_{name}").get_value()
    for name in method.activation_stats:
        stats.setdefault("activation", {})[name] = getattr(layer, f"activation_{name}").get_value()
    return params, stats


def _set_learned(layer, method_name):
    for (name, kind, key), value in SET_VALUES.items():
        if name == method_name:
            getattr(layer, f"{kind}_{key}").set_value(jnp.asarray(value, jnp.float32))


def _linen_variables(layer, method):
    q_params, q_stats = _quantizer_vars(layer, method)
    params = {"kernel": layer.kernel.get_value(), "bias": layer.bias.get_value()}
    if q_params:
        params["ConvQuantizer_0" if isinstance(layer, NNXQuantConv) else "DotQuantizer_0"] = q_params
    variables = {"params": params}
    if q_stats:
        key = "ConvQuantizer_0" if isinstance(layer, NNXQuantConv) else "DotQuantizer_0"
        variables["batch_stats"] = {key: q_stats}
    return variables


def _by_hand_conv(method, params, kernel, bias, x):
    """The method's functions composed here: conv(Q_a(x), Q_w(kernel)) + bias (train mode: batch statistics)."""
    act = dict(params.get("activation", {}))
    act.update(method.activation_batch_stats(x, BITS))
    xq = method.quantize_activation(act, x, BITS)
    wq = method.quantize_weight(params.get("weight", {}), kernel, BITS)
    y = jax.lax.conv_general_dilated(xq, wq, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


# ----------------------------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("method_name", _registered(CONV_INPUT_METHODS))
def test_nnx_conv_equals_linen_and_the_composed_method(method_name):
    method = get_method(method_name)
    layer = _conv(method_name)
    layer.bias.set_value(jnp.linspace(-0.1, 0.1, 4))
    # Init rules: weight parameters from the kernel at construction, activation ones from the first input.
    for k, v in method.init_weight(layer.kernel.get_value(), BITS).items():
        np.testing.assert_allclose(getattr(layer, f"weight_{k}").get_value(), v, rtol=1e-6)
    layer(X)
    for k, v in method.init_activation(X, BITS).items():
        np.testing.assert_allclose(getattr(layer, f"activation_{k}").get_value(), v, rtol=1e-6)
    _set_learned(layer, method_name)
    params, _ = _quantizer_vars(layer, method)
    y = jax.random.normal(jax.random.key(1), X.shape) * 1.5  # with negative values too
    got = layer(y)
    want = _by_hand_conv(method, params, layer.kernel.get_value(), layer.bias.get_value(), y)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    linen = QuantConv(4, (3, 3), config=QuantConfig(BITS, BITS, method=method_name))
    ref, _ = linen.apply(_linen_variables(layer, method), y, mutable=["batch_stats"])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # The input was quantized: the conv of y itself with the quantized kernel differs.
    wq = method.quantize_weight(params.get("weight", {}), layer.kernel.get_value(), BITS)
    plain = jax.lax.conv_general_dilated(y, wq, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert float(jnp.max(jnp.abs(plain + layer.bias.get_value() - got))) > 1e-2


@pytest.mark.parametrize("method_name", _registered(("apot", "lsq", "pact")))
def test_nnx_gradients_equal_linen(method_name):
    method = get_method(method_name)
    layer = _conv(method_name, seed=2)
    layer(X)
    _set_learned(layer, method_name)
    linen = QuantConv(4, (3, 3), config=QuantConfig(BITS, BITS, method=method_name))
    variables = _linen_variables(layer, method)
    target = jax.random.normal(jax.random.key(3), (2, 6, 6, 4))

    def nnx_loss(m):
        return jnp.mean((m(X) - target) ** 2)

    def linen_loss(params):
        return jnp.mean((linen.apply({**variables, "params": params}, X) - target) ** 2)

    g_nnx = nnx.grad(nnx_loss)(layer)
    g_linen = jax.grad(linen_loss)(variables["params"])
    np.testing.assert_allclose(g_nnx["kernel"].get_value(), g_linen["kernel"], rtol=1e-4, atol=1e-7)
    q = g_linen["ConvQuantizer_0"]
    nonzero = 0
    for kind in ("weight", "activation"):
        for name, g in q.get(kind, {}).items():
            np.testing.assert_allclose(g_nnx[f"{kind}_{name}"].get_value(), g, rtol=1e-4, atol=1e-7)
            nonzero += float(g) != 0.0
    assert nonzero == len(method.weight_params) + len(method.activation_params)


@pytest.mark.parametrize("method_name", _registered(("apot", "lsq", "dorefa")))
def test_nnx_linear_equals_linen_dense(method_name):
    method = get_method(method_name)
    h = jnp.abs(jax.random.normal(jax.random.key(4), (5, 8)))
    layer = NNXQuantLinear(8, 3, config=QuantConfig(BITS, BITS, method=method_name), rngs=nnx.Rngs(5))
    layer(h)
    _set_learned(layer, method_name)
    params, _ = _quantizer_vars(layer, method)
    got = layer(h)
    xq = method.quantize_activation(params.get("activation", {}), h, BITS)
    wq = method.quantize_weight(params.get("weight", {}), layer.kernel.get_value(), BITS)
    np.testing.assert_allclose(got, xq @ wq + layer.bias.get_value(), rtol=1e-5, atol=1e-6)
    ref = QuantDense(3, config=QuantConfig(BITS, BITS, method=method_name)).apply(_linen_variables(layer, method), h)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_quantize_input_false_keeps_the_input():
    layer = _conv("dorefa", quantize_input=False)
    got = layer(X)
    wq = get_method("dorefa").quantize_weight({}, layer.kernel.get_value(), BITS)
    want = jax.lax.conv_general_dilated(X, wq, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(got, want + layer.bias.get_value(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Training with NNX transforms


@pytest.mark.parametrize("method_name", _registered(("apot", "lsq")))
def test_params_are_nnx_params_and_an_optimizer_step_moves_them(method_name):
    method = get_method(method_name)
    layer = _conv(method_name, seed=6)
    layer(X)
    names = {f"weight_{n}" for n in method.weight_params} | {f"activation_{n}" for n in method.activation_params}
    assert names and names <= set(nnx.state(layer, nnx.Param).keys())
    target = jax.random.normal(jax.random.key(7), (2, 6, 6, 4))

    def loss(m):
        return jnp.mean((m(X) - target) ** 2)

    grads = nnx.grad(loss)(layer)
    before = {n: float(getattr(layer, n).get_value()) for n in names}
    optimizer = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        optimizer.update(model, nnx.grad(loss)(model))

    step(layer, optimizer)
    for n in names:
        g = float(grads[n].get_value())
        assert g != 0.0, n
        assert float(getattr(layer, n).get_value()) == pytest.approx(before[n] - 0.1 * g, rel=1e-4, abs=1e-7), n


@pytest.mark.parametrize("method_name", _registered(("apot", "lsq", "alignq")))
def test_nnx_conv_under_jit_and_grad(method_name):
    """The layer swaps its promote_dtype attribute during a call: under nnx.jit and nnx.grad the values and
    gradients equal the eager ones, and the attribute is restored after every call."""
    layer = _conv(method_name, seed=8)
    original = layer.promote_dtype
    eager = layer(X)
    target = jax.random.normal(jax.random.key(9), (2, 6, 6, 4))

    def loss(m, x):
        return jnp.mean((m(x) - target) ** 2)

    g_eager = nnx.grad(loss)(layer, X)
    graph = nnx.graphdef(layer)
    jitted = nnx.jit(lambda m, x: m(x))(layer, X)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
    g_jit = nnx.jit(nnx.grad(loss))(layer, X)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(g_eager)), nnx.to_flat_state(nnx.state(g_jit)),
                                 strict=True):
        # jit reorders float sums: a few ulp of the largest gradient
        np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), rtol=1e-4, atol=1e-5,
                                   err_msg=str(path))
    assert layer.promote_dtype is original
    assert nnx.graphdef(layer) == graph

    class Net(nnx.Module):
        def __init__(self):
            self.conv = _conv(method_name, seed=8)

        def __call__(self, x):
            return jnp.mean(self.conv(jax.nn.relu(x)))

    net = Net()
    net(X)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(net, X), net(X), rtol=1e-6)


def test_nnx_running_statistics_under_jit():
    """absmax in NNX: a jitted training call updates the running range by the momentum; evaluation (model.eval())
    then quantizes with it."""
    if "absmax" not in METHODS:
        pytest.skip("method 'absmax' is not registered yet")
    method = get_method("absmax")
    layer = _conv("absmax", seed=10, stats_momentum=0.5)
    layer(X)
    first = float(layer.activation_range.get_value())
    assert first == pytest.approx(float(jnp.max(X)))
    y = X * 2.0
    nnx.jit(lambda m, x: m(x))(layer, y)
    running = float(layer.activation_range.get_value())
    assert running == pytest.approx(0.5 * first + 0.5 * float(jnp.max(y)), rel=1e-6)
    layer.eval()
    z = X * 3.0
    got = nnx.jit(lambda m, x: m(x))(layer, z)
    assert float(layer.activation_range.get_value()) == running  # evaluation leaves it alone
    xq = method.quantize_activation({"range": jnp.asarray(running)}, z, BITS)
    wq = method.quantize_weight({}, layer.kernel.get_value(), BITS)
    want = jax.lax.conv_general_dilated(xq, wq, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(got, want + layer.bias.get_value(), rtol=1e-5, atol=1e-5)
