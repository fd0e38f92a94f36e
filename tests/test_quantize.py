"""Flax integration: QuantConfig validation, Linen layers vs the pure functions, Linen == NNX, interception,
and a tiny model whose forward, ADMM-penalised loss, gradient and ADMM update run under one jax.jit."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignq_jax import ADMM, quantize, quantizers
from alignq_jax.correlation import correlation_gap

CFG = quantize.QuantConfig(w_bits=4, a_bits=4, correlation=True)
X = jax.random.normal(jax.random.key(0), (4, 6, 6, 2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(w_bits=0), "bits"),
        (dict(a_bits=16), "bits"),
        (dict(method="lsq-typo"), "method"),
        (dict(levels="v22"), "levels"),
        (dict(act_range=0.0), "act_range"),
        (dict(correlation_target="rounded"), "correlation_target"),
        (dict(surrogate=(1.0,)), "surrogate"),
        (dict(correlation="yes"), "correlation"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize.QuantConfig(**kwargs)


def test_config_is_frozen_and_hashable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CFG.w_bits = 2
    assert hash(CFG) == hash(quantize.QuantConfig(w_bits=4, a_bits=4, correlation=True))


class _TinyNet(nn.Module):
    config: quantize.QuantConfig

    @nn.compact
    def __call__(self, x, train=True):
        x = quantize.QuantConv(8, (3, 3), config=self.config)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
        x = quantize.QuantActivation(self.config)(x)
        x = nn.relu(x)
        x = quantize.QuantConv(8, (3, 3), strides=2, config=self.config)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
        x = quantize.QuantActivation(self.config)(x)
        return nn.Dense(3)(nn.relu(x).mean((1, 2)))


@pytest.fixture(scope="module")
def tiny():
    model = _TinyNet(CFG)
    variables = model.init(jax.random.key(1), X)
    return model, variables


def test_quant_conv_uses_quantized_kernel(tiny):
    model, variables = tiny
    p = variables["params"]["QuantConv_0"]
    out = quantize.QuantConv(8, (3, 3), config=CFG).apply({"params": p}, X)
    wq = quantizers.alignq_weight(p["kernel"], 4)
    ref = jax.lax.conv_general_dilated(X, wq, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # The stored parameter stays full precision; the FP conv gives a different output.
    fp = nn.Conv(8, (3, 3)).apply({"params": p}, X)
    assert np.abs(fp - out).max() > 1e-2
    assert len(np.unique(np.asarray(p["kernel"]))) > 16


def test_quant_dense_uses_quantized_kernel():
    dense = quantize.QuantDense(5, config=CFG)
    x = jax.random.normal(jax.random.key(2), (3, 7))
    v = dense.init(jax.random.key(3), x)
    ref = x @ quantizers.alignq_weight(v["params"]["kernel"], 4) + v["params"]["bias"]
    np.testing.assert_allclose(dense.apply(v, x), ref, atol=1e-5)


def test_clone_with_other_config_does_not_wrap_twice():
    conv = quantize.QuantConv(4, (1, 1), config=CFG)
    other = conv.clone(config=quantize.QuantConfig(w_bits=2))
    assert other.conv_general_dilated.config.w_bits == 2
    assert other.conv_general_dilated.base is jax.lax.conv_general_dilated


def test_activation_records_gap_only_when_collection_mutable(tiny):
    model, variables = tiny
    logits, updates = model.apply(variables, X, mutable=["batch_stats", quantize.GAP_COLLECTION])
    gaps = updates[quantize.GAP_COLLECTION]
    assert set(gaps) == {"QuantActivation_0", "QuantActivation_1"}
    assert all(g["gap"].shape == (4, 4) for g in gaps.values())
    # Recomputed independently from the BatchNorm output of the first block.
    conv = quantize.QuantConv(8, (3, 3), config=CFG).apply({"params": variables["params"]["QuantConv_0"]}, X)
    mean, var = conv.mean((0, 1, 2)), conv.var((0, 1, 2))
    bn = variables["params"]["BatchNorm_0"]
    h = (conv - mean) / jnp.sqrt(var + 1e-5) * bn["scale"] + bn["bias"]
    ref = correlation_gap(h, quantizers.cdf_align_activation(h, 2.0))
    np.testing.assert_allclose(gaps["QuantActivation_0"]["gap"], ref, atol=1e-5)
    _, updates_eval = model.apply(variables, X, train=False, mutable=["batch_stats"])
    assert quantize.GAP_COLLECTION not in updates_eval


def test_correlation_target_quantized_differs():
    x = jax.random.normal(jax.random.key(4), (6, 10))
    cfg_q = dataclasses.replace(CFG, correlation_target="quantized")
    q = cfg_q.quantize_activation(x)
    np.testing.assert_allclose(cfg_q.correlation_gap(x, q), correlation_gap(x, q), atol=1e-6)
    assert np.abs(cfg_q.correlation_gap(x, q) - CFG.correlation_gap(x, q)).max() > 1e-4


def test_uniform_method_is_one_argument_change():
    cfg_u = dataclasses.replace(CFG, method="uniform")
    w = jax.random.normal(jax.random.key(5), (3, 3, 2, 4)) * 0.5
    np.testing.assert_array_equal(cfg_u.quantize_weight(w), quantizers.uniform_weight(w, 4))
    np.testing.assert_array_equal(cfg_u.quantize_activation(X), quantizers.uniform_activation(X, 4))


def test_full_precision_config_is_plain_flax():
    fp = quantize.QuantConfig()
    conv = quantize.QuantConv(8, (3, 3), config=fp)
    v = conv.init(jax.random.key(6), X)
    np.testing.assert_array_equal(conv.apply(v, X), nn.Conv(8, (3, 3)).apply(v, X))
    np.testing.assert_array_equal(quantize.QuantActivation(fp).apply({}, X), X)


def test_linen_and_nnx_identical(tiny):
    model, variables = tiny
    p = variables["params"]
    cfg_q = dataclasses.replace(CFG, surrogate=(1.0, 4.0), levels="paper")
    linen_conv = quantize.QuantConv(8, (3, 3), config=cfg_q)
    nnx_conv = quantize.NNXQuantConv(2, 8, (3, 3), config=cfg_q, rngs=nnx.Rngs(0))
    nnx_conv.kernel.set_value(p["QuantConv_0"]["kernel"])
    nnx_conv.bias.set_value(p["QuantConv_0"]["bias"])
    np.testing.assert_allclose(nnx_conv(X), linen_conv.apply({"params": p["QuantConv_0"]}, X), atol=1e-6)

    dense_l = quantize.QuantDense(3, config=cfg_q)
    dense_n = quantize.NNXQuantLinear(8, 3, config=cfg_q, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(7), (4, 8))
    dense_n.kernel.set_value(p["Dense_0"]["kernel"])
    dense_n.bias.set_value(p["Dense_0"]["bias"])
    np.testing.assert_allclose(dense_n(h), dense_l.apply({"params": p["Dense_0"]}, h), atol=1e-6)

    act_l = quantize.QuantActivation(cfg_q)
    act_n = quantize.NNXQuantActivation(cfg_q)
    out_l, upd = act_l.apply({}, X, mutable=[quantize.GAP_COLLECTION])
    out_n = act_n(X)
    np.testing.assert_array_equal(out_n, out_l)
    gap_state = nnx.state(act_n, quantize.CorrelationGap)
    np.testing.assert_allclose(gap_state["gap"].get_value(), upd[quantize.GAP_COLLECTION]["gap"], atol=1e-6)


class _PlainNet(nn.Module):
    """A model written with plain nn.Conv, as a user's existing code would be."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.Conv(4, (1, 1), use_bias=False)(x)
        return nn.Dense(2)(x.mean((1, 2)))


def test_intercept_quantizes_existing_model_convs():
    model = _PlainNet()
    variables = model.init(jax.random.key(8), X)
    with quantize.intercept_convs(CFG):
        variables_i = model.init(jax.random.key(8), X)
    assert jax.tree.structure(variables_i) == jax.tree.structure(variables)  # same parameter names

    out = jax.jit(quantize.quantized_apply(model, CFG))(variables, X)
    p = variables["params"]
    h = nn.relu(quantize.QuantConv(8, (3, 3), config=CFG).apply({"params": p["Conv_0"]}, X))
    h = quantize.QuantConv(4, (1, 1), use_bias=False, config=CFG).apply({"params": p["Conv_1"]}, h)
    ref = nn.Dense(2).apply({"params": p["Dense_0"]}, h.mean((1, 2)))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert np.abs(out - model.apply(variables, X)).max() > 1e-3

    # include_dense also quantizes the classifier.
    out_d = quantize.quantized_apply(model, CFG, include_dense=True)(variables, X)
    ref_d = quantize.QuantDense(2, config=CFG).apply({"params": p["Dense_0"]}, h.mean((1, 2)))
    np.testing.assert_allclose(out_d, ref_d, atol=1e-5)

    grads = jax.grad(lambda v: quantize.quantized_apply(model, CFG)(v, X).sum())(variables)
    kernel_grad = grads["params"]["Conv_0"]["kernel"]
    assert np.all(np.isfinite(kernel_grad))
    # The weight quantizer's gradient sums to zero per tensor (reference section 1).
    assert abs(float(kernel_grad.sum())) < 1e-3 * float(jnp.abs(kernel_grad).sum())


@pytest.mark.parametrize("mode", ["textbook", "paper"])
def test_tiny_model_loss_grad_and_admm_update_in_one_jit(tiny, mode):
    model, variables = tiny
    admm = ADMM(mode=mode)
    _, first = model.apply(variables, X, mutable=["batch_stats", quantize.GAP_COLLECTION])
    admm_state = admm.init(first[quantize.GAP_COLLECTION], key=jax.random.key(9), dim=4)
    tx = optax.sgd(0.05, momentum=0.9)
    params = variables["params"]
    opt_state = tx.init(params)
    labels = jnp.array([0, 1, 2, 1])

    def loss_fn(params, batch_stats, admm_state):
        logits, upd = model.apply(
            {"params": params, "batch_stats": batch_stats}, X, mutable=["batch_stats", quantize.GAP_COLLECTION]
        )
        gaps = upd[quantize.GAP_COLLECTION]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return ce + admm.penalty(gaps, admm_state), (upd["batch_stats"], gaps)

    @jax.jit
    def step(params, batch_stats, opt_state, admm_state):
        (loss, (batch_stats, gaps)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, admm_state)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, batch_stats, opt_state, admm.update(gaps, admm_state), loss, grads, gaps

    batch_stats = variables["batch_stats"]
    out = step(params, batch_stats, opt_state, admm_state)
    _, _, _, new_admm, loss, grads, gaps = out
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # The update inside the jit equals a separate update on the same gaps.
    expected = admm.update(gaps, admm_state)
    for a, b in zip(jax.tree.leaves(new_admm), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # The penalty's gradient reaches the conv weights: changing the ADMM state changes the gradient. (A constant
    # shift would not: every row of D sums to 0, so the sum of all entries has zero gradient.)
    shifted = jax.tree.map(lambda t: t + 0.3 * jax.random.normal(jax.random.key(10), t.shape), admm_state)
    grads_shifted = step(params, batch_stats, opt_state, shifted)[5]
    diff = np.abs(grads_shifted["QuantConv_0"]["kernel"] - grads["QuantConv_0"]["kernel"]).max()
    assert diff > 1e-6
