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

from alignq_jax import ADMM, ADMMState, quantize, quantizers
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


def test_clone_with_other_config_quantizes_with_the_new_config():
    conv = quantize.QuantConv(4, (1, 1), config=CFG)
    other = conv.clone(config=quantize.QuantConfig(w_bits=2))
    x = jax.random.normal(jax.random.key(21), (2, 3, 3, 2))
    v = other.init(jax.random.key(22), x)
    w2 = quantizers.alignq_weight(v["params"]["kernel"], 2)
    np.testing.assert_allclose(other.apply(v, x), nn.Conv(4, (1, 1)).apply({"params": {**v["params"], "kernel": w2}}, x),
                               atol=1e-6)
    # A clone to full precision is the plain convolution again, not the old quantizing hook.
    fp = conv.clone(config=quantize.QuantConfig())
    np.testing.assert_array_equal(fp.apply(v, x), nn.Conv(4, (1, 1)).apply(v, x))


def _recording_op(base, fn, seen):
    """A quantizer op subclass (the documented way to run another conv/dot) that records the kernel it gets."""

    class Recording(base):
        def op(self, lhs, rhs, *args, **kwargs):
            seen.append(rhs)
            return fn(lhs, rhs, *args, **kwargs)

    return Recording


@pytest.mark.parametrize("layer", ["conv", "dense"])
def test_injection_point_cls_receives_the_quantized_kernel(layer):
    """The quantizer is Flax's ``*_cls`` injection point: an op subclass runs on the quantized kernel, and any
    other class there is refused (it would bypass quantization)."""
    seen = []
    if layer == "conv":
        cls = _recording_op(quantize.ConvQuantizer, jax.lax.conv_general_dilated, seen)
        mod = quantize.QuantConv(3, (3, 3), config=CFG, conv_general_dilated_cls=cls)
        plain, x = nn.Conv(3, (3, 3)), X
        with pytest.raises(ValueError, match="conv_general_dilated_cls"):
            quantize.QuantConv(3, (3, 3), config=CFG, conv_general_dilated_cls=lambda: jax.lax.conv_general_dilated)
    else:
        cls = _recording_op(quantize.DotQuantizer, jax.lax.dot_general, seen)
        mod = quantize.QuantDense(3, config=CFG, dot_general_cls=cls)
        plain, x = nn.Dense(3), X.reshape(4, -1)
        with pytest.raises(ValueError, match="dot_general_cls"):
            quantize.QuantDense(3, config=CFG, dot_general_cls=lambda: jax.lax.dot_general)
    v = mod.init(jax.random.key(23), x)
    seen.clear()
    out = mod.apply(v, x)
    wq = quantizers.alignq_weight(v["params"]["kernel"], 4)
    np.testing.assert_array_equal(seen[-1], wq)
    np.testing.assert_allclose(out, plain.apply({"params": {**v["params"], "kernel": wq}}, x), atol=1e-5)


@pytest.mark.parametrize("layer", ["conv", "dense"])
def test_bfloat16_layer_quantizes_the_float32_kernel(layer):
    """The kernel is quantized from the float32 parameter, then cast: the bf16 layer convolves with exactly
    bf16(alignq_weight(w_f32)) (not a quantization of the bf16-rounded weights)."""
    seen = []

    def record(lhs, rhs, *args, **kwargs):
        seen.append(rhs)
        return (jax.lax.conv_general_dilated if layer == "conv" else jax.lax.dot_general)(lhs, rhs, *args, **kwargs)

    cfg = quantize.QuantConfig(w_bits=8)
    if layer == "conv":
        mod, x = quantize.QuantConv(6, (3, 3), config=cfg, dtype=jnp.bfloat16, conv_general_dilated=record), X
    else:
        mod, x = quantize.QuantDense(6, config=cfg, dtype=jnp.bfloat16, dot_general=record), X.reshape(4, -1)
    v = mod.init(jax.random.key(24), x)
    seen.clear()
    mod.apply(v, x)
    w = v["params"]["kernel"]
    assert w.dtype == jnp.float32 and seen[-1].dtype == jnp.bfloat16
    np.testing.assert_array_equal(seen[-1], quantizers.alignq_weight(w, 8).astype(jnp.bfloat16))


def test_nnx_layers_at_full_precision_equal_plain_nnx():
    """The default config (32 bits) gives the plain nnx layers (it used to call None)."""
    lin = quantize.NNXQuantLinear(8, 3, rngs=nnx.Rngs(0))
    ref = nnx.Linear(8, 3, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(25), (4, 8))
    np.testing.assert_array_equal(lin(h), ref(h))
    conv = quantize.NNXQuantConv(2, 5, (3, 3), rngs=nnx.Rngs(1))
    ref_c = nnx.Conv(2, 5, (3, 3), rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(conv(X), ref_c(X))
    # and quantized they use the quantized kernel
    q = quantize.NNXQuantLinear(8, 3, config=CFG, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(q(h), h @ quantizers.alignq_weight(ref.kernel[...], 4) + ref.bias[...], atol=1e-5)


def test_activation_records_gap_only_when_collection_mutable(tiny):
    model, variables = tiny
    logits, updates = model.apply(variables, X, mutable=["batch_stats", quantize.GAP_COLLECTION])
    gaps = updates[quantize.GAP_COLLECTION]
    assert set(gaps) == {"QuantActivation_0", "QuantActivation_1"}
    assert all(len(g["gap"]) == 1 and g["gap"][0].shape == (4, 4) for g in gaps.values())  # one call each
    # Recomputed independently from the BatchNorm output of the first block.
    conv = quantize.QuantConv(8, (3, 3), config=CFG).apply({"params": variables["params"]["QuantConv_0"]}, X)
    mean, var = conv.mean((0, 1, 2)), conv.var((0, 1, 2))
    bn = variables["params"]["BatchNorm_0"]
    h = (conv - mean) / jnp.sqrt(var + 1e-5) * bn["scale"] + bn["bias"]
    ref = correlation_gap(h, quantizers.cdf_align_activation(h, 2.0))
    np.testing.assert_allclose(gaps["QuantActivation_0"]["gap"][0], ref, atol=1e-5)
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
    np.testing.assert_allclose(gap_state["gap"].get_value(), upd[quantize.GAP_COLLECTION]["gap"][0], atol=1e-6)


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
    # The weight quantizer's gradient sums to zero per tensor (docs/method.md §1).
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
    # The ADMM step inside the jit used this step's gaps (from the weights before the optimizer step, as a
    # separate forward gives them): float64 numpy Z- and Gamma-steps (docs/method.md §5.3 and §5.6).
    mu, rho = admm.mu, admm.rho
    for d, z, g, z_new, g_new in zip(*(jax.tree.leaves(t) for t in (first[quantize.GAP_COLLECTION], admm_state.z,
                                                                      admm_state.gamma, new_admm.z, new_admm.gamma))):
        d, z, g = (np.asarray(t, np.float64) for t in (d, z, g))
        if mode == "textbook":
            v = d + g / rho
            z_ref = np.sign(v) * np.maximum(np.abs(v) - mu / rho, 0.0)
            g_ref = g + rho * (d - z_ref)
        else:
            dp = np.zeros_like(z)
            dp[: d.shape[0], : d.shape[0]] = d
            v = dp + g / rho
            norm = np.linalg.norm(v)
            z_ref = (1 - (mu / rho) / norm) * v if norm > mu / rho else np.zeros_like(v)
            g_ref = g + rho * (dp - z_ref)
        np.testing.assert_allclose(z_new, z_ref, atol=1e-5)
        np.testing.assert_allclose(g_new, g_ref, atol=1e-5)
    # The penalty's gradient reaches the conv weights: changing the ADMM state changes the gradient. (A constant
    # shift would not: every row of D sums to 0, so the sum of all entries has zero gradient.)
    shifted = jax.tree.map(lambda t: t + 0.3 * jax.random.normal(jax.random.key(10), t.shape), admm_state)
    grads_shifted = step(params, batch_stats, opt_state, shifted)[5]
    diff = np.abs(grads_shifted["QuantConv_0"]["kernel"] - grads["QuantConv_0"]["kernel"]).max()
    assert diff > 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Fused forms used by the models for speed and memory: same values and gradients as the plain composition.


@pytest.mark.parametrize("levels", ["exact", "paper"])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_fused_relu_forward_and_gradient(levels, bits):
    """relu=True: paper grid = ReLU of the quantizer; exact mode = the unsigned grid A*round(n*max(2Phi(x)-1, 0))/n
    (float64 reference). Gradient 2*A*phi(x) (STE) times the ReLU mask."""
    from scipy.special import erf

    x = jax.random.normal(jax.random.key(11), (4000,)) * 2
    up = jax.random.normal(jax.random.key(12), x.shape)
    fused = lambda x: quantizers.alignq_activation(x, bits, levels=levels, relu=True)  # noqa: E731
    g_fused = np.asarray(jax.grad(lambda x: jnp.sum(fused(x) * up))(x))
    if levels == "paper":
        plain = lambda x: jax.nn.relu(quantizers.alignq_activation(x, bits, levels=levels))  # noqa: E731
        np.testing.assert_array_equal(fused(x), plain(x))
        np.testing.assert_allclose(g_fused, jax.grad(lambda x: jnp.sum(plain(x) * up))(x), atol=1e-6)
    else:
        n, x64 = 2**bits - 1, np.asarray(x, np.float64)
        np.testing.assert_allclose(fused(x), 2.0 * np.round(n * np.maximum(erf(x64 / np.sqrt(2)), 0)) / n, atol=1e-6)
        pdf = np.exp(-0.5 * x64**2) / np.sqrt(2 * np.pi)
        np.testing.assert_allclose(g_fused, 4.0 * pdf * (x64 > 0) * np.asarray(up), rtol=1e-5, atol=1e-7)
    assert np.mean(g_fused == 0) > 0.3  # the ReLU mask is really exercised


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("levels", ["exact", "paper"])
def test_affine_quantizer_equals_composition(relu, levels):
    h = jax.random.normal(jax.random.key(13), (6, 5, 5, 3)) * 3 + 1
    scale, shift = jnp.array([0.5, 1.5, -2.0]), jnp.array([0.1, -0.3, 0.2])
    up = jax.random.normal(jax.random.key(14), h.shape)

    def fused(h, scale, shift):
        return jnp.sum(quantizers.alignq_activation_affine(h, scale, shift, 3, levels=levels, relu=relu) * up)

    def plain(h, scale, shift):
        return jnp.sum(quantizers.alignq_activation(h * scale + shift, 3, levels=levels, relu=relu) * up)

    assert float(fused(h, scale, shift)) == pytest.approx(float(plain(h, scale, shift)), abs=1e-4)
    for a, b in zip(jax.grad(fused, (0, 1, 2))(h, scale, shift), jax.grad(plain, (0, 1, 2))(h, scale, shift)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="shape"):
        quantizers.alignq_activation_affine(h, scale[:2], shift, 3)


def _bn_then_act(config, relu):
    class BNThenAct(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x)
            return quantize.QuantActivation(config, relu=relu, name="act")(x)

    return BNThenAct()


@pytest.mark.parametrize("a_bits", [4, 32])
@pytest.mark.parametrize("relu", [False, True])
def test_quant_batchnorm_equals_batchnorm_then_quantizer(a_bits, relu):
    cfg = quantize.QuantConfig(a_bits=a_bits, correlation=True)
    h = jax.random.normal(jax.random.key(15), (8, 5, 5, 3)) * 2 + 1
    fused = quantize.QuantBatchNorm(cfg, relu=relu)
    v = fused.init(jax.random.key(16), h, use_running_average=False)
    v = {"params": {"scale": jnp.array([1.0, -0.5, 2.0]), "bias": jnp.array([0.2, 0.0, -0.4])},
         "batch_stats": v["batch_stats"]}
    plain = _bn_then_act(cfg, relu)
    vp = {"params": {"bn": v["params"]}, "batch_stats": {"bn": v["batch_stats"]}}
    cols = ["batch_stats", quantize.GAP_COLLECTION]
    out_f, upd_f = fused.apply(v, h, use_running_average=False, mutable=cols)
    out_p, upd_p = plain.apply(vp, h, mutable=cols)
    np.testing.assert_allclose(out_f, out_p, atol=1e-5)
    if a_bits < 32:
        np.testing.assert_allclose(upd_f[quantize.GAP_COLLECTION]["gap"][0], upd_p[quantize.GAP_COLLECTION]["act"]["gap"][0],
                                   atol=1e-5)
    up = jax.random.normal(jax.random.key(17), h.shape)
    gf = jax.grad(lambda p, h: jnp.sum(fused.apply({**v, "params": p}, h, use_running_average=False,
                                                   mutable=["batch_stats"])[0] * up), (0, 1))(v["params"], h)
    gp = jax.grad(lambda p, h: jnp.sum(plain.apply({**vp, "params": {"bn": p}}, h,
                                                   mutable=["batch_stats"])[0] * up), (0, 1))(v["params"], h)
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gp)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # Running mean as nn.BatchNorm; running variance from the unbiased batch variance (PyTorch).
    n = h.size // 3
    np.testing.assert_allclose(upd_f["batch_stats"]["mean"], upd_p["batch_stats"]["bn"]["mean"], atol=1e-6)
    np.testing.assert_allclose(upd_f["batch_stats"]["var"] - 0.9, (upd_p["batch_stats"]["bn"]["var"] - 0.9) * n / (n - 1),
                               rtol=1e-5)
    # Evaluation uses the running statistics, as nn.BatchNorm does.
    ev_f = fused.apply({**v, "batch_stats": upd_f["batch_stats"]}, h, use_running_average=True)
    ev_p = plain.apply({**vp, "batch_stats": {"bn": upd_f["batch_stats"]}}, h, train=False)
    np.testing.assert_allclose(ev_f, ev_p, atol=1e-5)


def test_sampled_gap_validation():
    with pytest.raises(ValueError, match="correlation_features"):
        quantize.QuantConfig(a_bits=4, correlation_features=1)
    cfg = quantize.QuantConfig(a_bits=4, correlation=True, correlation_features=8)
    with pytest.raises(ValueError, match="key"):
        cfg.correlation_gap(jnp.ones((4, 32)))


@pytest.mark.parametrize("target", ["aligned", "quantized"])
def test_sampled_gap_affine_matches_sampled_gap_of_normalised(target):
    """The BN-folded path samples columns of h and normalises them with their own channel's scale/shift."""
    cfg = quantize.QuantConfig(a_bits=3, correlation=True, correlation_features=20, correlation_target=target)
    h = jax.random.normal(jax.random.key(18), (6, 4, 5, 3)) * jnp.array([1.0, 3.0, 0.5]) + jnp.array([0.0, 2.0, -1.0])
    scale, shift = jnp.array([1.0, 0.4, 2.0]), jnp.array([0.0, -0.8, 2.0])
    key = jax.random.key(19)
    a = cfg.correlation_gap_affine(h, scale, shift, key)
    b = cfg.correlation_gap(h * scale + shift, key)
    np.testing.assert_allclose(a, b, atol=1e-5)
    exact = dataclasses.replace(cfg, correlation_features=None).correlation_gap(h * scale + shift)
    assert np.abs(np.asarray(a) - np.asarray(exact)).max() > 1e-4  # it really sampled (20 of 60 features)
    ga = jax.grad(lambda h: jnp.sum(cfg.correlation_gap_affine(h, scale, shift, key) ** 2))(h)
    gb = jax.grad(lambda h: jnp.sum(cfg.correlation_gap(h * scale + shift, key) ** 2))(h)
    np.testing.assert_allclose(ga, gb, atol=1e-5)


def test_models_record_sampled_gaps_with_rng_stream():
    cfg = quantize.QuantConfig(4, 4, correlation=True, correlation_features=16)
    from alignq_jax.models import get_model

    model = get_model("small_cnn", config=cfg)
    x = jax.random.normal(jax.random.key(20), (4, 8, 8, 1))
    rngs = {"params": jax.random.key(0), quantize.CORRELATION_RNG: jax.random.key(1)}
    v = model.init(rngs, x)
    run = lambda k: model.apply(v, x, mutable=["batch_stats", quantize.GAP_COLLECTION],  # noqa: E731
                                rngs={quantize.CORRELATION_RNG: jax.random.key(k)})[1][quantize.GAP_COLLECTION]
    g1, g2 = run(1), run(2)
    assert all(a.shape == (4, 4) for a in jax.tree.leaves(g1))
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2))) > 0


def _float64_activation_rule(x, bits, levels, a, relu):
    """The activation quantizer's rule evaluated in float64 (scipy), and the x where its code changes."""
    from scipy.special import ndtr, ndtri

    n = 2**bits - 1
    u = ndtr(x)
    if levels == "exact" and relu:  # unsigned grid on the CDF's upper half
        ref = a * np.round(n * np.maximum(2 * u - 1, 0)) / n
        ties = 0.5 + (np.arange(n) + 0.5) / (2 * n)
    elif levels == "exact":
        ref = a * (2 * np.round(n * u) / n - 1)
        ties = (np.arange(n) + 0.5) / n
    elif bits == 1:
        ref = np.sign(a * (2 * u - 1))
        ties = np.array([0.5])
    else:
        ref = np.round(n * a * (2 * u - 1)) / n
        halves = np.arange(-np.ceil(n * a) - 1, np.ceil(n * a) + 1) + 0.5
        ties = 0.5 + halves[np.abs(halves) < n * a] / (2 * n * a)
    if relu:
        ref = np.maximum(ref, 0.0)
    return ref, ndtri(ties)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("levels, bits", [("exact", b) for b in range(1, 9)] + [("paper", b) for b in range(1, 9)])
@pytest.mark.parametrize("act_range", [2.0, 1.5])
def test_activation_forward_equals_float64_rule(levels, bits, act_range, relu):
    """The forward (threshold counting at low bit-widths, the float32 CDF formula above) equals the float64 rule
    (round half to even of n*Phi, the unsigned grid with relu in exact mode, the official grid in paper mode) at
    every point except those within float32 rounding of a code boundary: one ulp of the threshold for counting,
    the float32 CDF's error for the formula. At most a handful of points per boundary are excused."""
    x = np.linspace(-5, 5, 100_001).astype(np.float32)
    out = np.asarray(quantizers.alignq_activation(jnp.asarray(x), bits, act_range=act_range, levels=levels,
                                                  relu=relu))
    ref, boundaries = _float64_activation_rule(x.astype(np.float64), bits, levels, act_range, relu)
    counting = len(boundaries) <= quantizers._MAX_THRESHOLDS
    phi = np.exp(-0.5 * boundaries**2) / np.sqrt(2 * np.pi)
    tol = 2 * np.spacing(np.abs(boundaries).astype(np.float32)).astype(np.float64)
    if not counting:
        tol = tol + 16 * 2.0**-24 / phi  # float32 erf: |error of Phi| < 16 * 2^-24 (x-space through 1/phi)
    dist = np.abs(x.astype(np.float64)[:, None] - boundaries[None, :])
    excused = np.any(dist <= tol[None, :], axis=1)
    assert excused.sum() <= 3 * len(boundaries) if not counting else excused.sum() <= len(boundaries)
    np.testing.assert_allclose(out[~excused], ref[~excused], rtol=0, atol=2e-6)
    # Infinities land on the extreme levels and NaN stays NaN (no silent fallback).
    special = np.asarray(quantizers.alignq_activation(jnp.array([-np.inf, np.inf, np.nan]), bits, act_range=act_range,
                                                      levels=levels, relu=relu))
    np.testing.assert_allclose(special[:2], [ref.min(), ref.max()], atol=1e-6)
    assert np.isnan(special[2])


# ----------------------------------------------------------------------------------------------------------------
# bfloat16 compute: the quantizer numerics and the correlation gap run in float32, only results are cast.


@pytest.mark.parametrize("features", [None, 20])
@pytest.mark.parametrize("target", ["aligned", "quantized"])
def test_config_gap_of_bfloat16_equals_float32(target, features):
    cfg = quantize.QuantConfig(a_bits=4, correlation=True, correlation_target=target, correlation_features=features)
    h = (jax.random.normal(jax.random.key(40), (6, 4, 5, 3)) * 3 + 1).astype(jnp.bfloat16)
    scale, shift = jnp.array([1.3, 0.4, 2.0]), jnp.array([0.1, -0.8, 2.0])
    key = jax.random.key(41) if features else None
    a = cfg.correlation_gap_affine(h, scale, shift, key)
    b = cfg.correlation_gap_affine(h.astype(jnp.float32), scale, shift, key)
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    x = h * jnp.bfloat16(0.7)
    np.testing.assert_array_equal(cfg.correlation_gap(x, key), cfg.correlation_gap(x.astype(jnp.float32), key))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_quant_batchnorm_bfloat16_equals_float32_then_cast(bits, relu):
    """A bf16 QuantBatchNorm gives exactly the float32 computation on the same (bf16) input, cast to bf16: the
    statistics, the normalisation and the quantizer's compares run in float32 (they used to run in bf16)."""
    cfg = quantize.QuantConfig(a_bits=bits, correlation=True)
    h = (jax.random.normal(jax.random.key(42), (8, 6, 6, 4)) * 2.5 + 0.7).astype(jnp.bfloat16)
    bn = quantize.QuantBatchNorm(cfg, relu=relu)
    v = bn.init(jax.random.key(43), h, use_running_average=False)
    v = {**v, "params": {"scale": jnp.array([1.0, -0.5, 2.0, 0.3]), "bias": jnp.array([0.2, 0.0, -0.4, 1.0])}}
    cols = ["batch_stats", quantize.GAP_COLLECTION]
    out16, upd16 = bn.apply(v, h, use_running_average=False, mutable=cols)
    out32, upd32 = bn.apply(v, h.astype(jnp.float32), use_running_average=False, mutable=cols)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out16, out32.astype(jnp.bfloat16))
    for a, b in zip(jax.tree.leaves(upd16), jax.tree.leaves(upd32)):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)
    ev16 = bn.apply({**v, "batch_stats": upd16["batch_stats"]}, h, use_running_average=True)
    ev32 = bn.apply({**v, "batch_stats": upd16["batch_stats"]}, h.astype(jnp.float32), use_running_average=True)
    np.testing.assert_array_equal(ev16, ev32.astype(jnp.bfloat16))


# ----------------------------------------------------------------------------------------------------------------
# init with any batch


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("layer", ["activation", "batchnorm", "resnet20"])
def test_init_works_with_a_batch_of_one(layer, train):
    """init records no gaps (as Flax's init returns no intermediates), so it works with a batch of one, which has
    no batch correlation (it used to raise "needs a batch of at least 2"); gap_shapes sizes the ADMM state."""
    from alignq_jax.models import get_model

    cfg = quantize.QuantConfig(4, 4, correlation=True, correlation_features=8)
    if layer == "activation":
        model, kwargs, n_gaps = quantize.QuantActivation(cfg), {}, 1
    elif layer == "batchnorm":
        model, kwargs, n_gaps = quantize.QuantBatchNorm(cfg), {"use_running_average": not train}, 1
    else:
        model, kwargs, n_gaps = get_model("resnet20", config=cfg), {"train": train}, 21
    x1 = jax.random.normal(jax.random.key(50), (1, 8, 8, 3))
    v = model.init(jax.random.key(51), x1, **kwargs)  # no 'correlation' RNG stream needed either
    assert quantize.GAP_COLLECTION not in v
    x = jax.random.normal(jax.random.key(52), (3, 8, 8, 3))
    shapes = quantize.gap_shapes(model, v, x, **kwargs)
    assert len(jax.tree.leaves(shapes)) == n_gaps
    assert all(g.shape == (3, 3) and g.dtype == jnp.float32 for g in jax.tree.leaves(shapes))
    state = ADMM().init(shapes)
    # Recording a gap outside init still needs two samples, and says so.
    cols = [quantize.GAP_COLLECTION, "batch_stats"]
    with pytest.raises(ValueError, match="at least 2"):
        model.apply(v, x1, mutable=cols, rngs={"correlation": jax.random.key(0)}, **kwargs)
    # The variables from init go straight into apply: one gap per call, the pytree ADMM was sized for.
    _, upd = model.apply(v, x, mutable=cols, rngs={"correlation": jax.random.key(0)}, **kwargs)
    gaps = upd[quantize.GAP_COLLECTION]
    assert jax.tree.structure(gaps) == jax.tree.structure(state.z)
    assert all(np.any(g) for g in jax.tree.leaves(gaps))
    assert np.isfinite(float(ADMM().penalty(gaps, state)))


def test_layer_called_twice_keeps_both_gaps():
    """A layer applied to two batches in one apply (source and target domains) records both gaps, each equal to
    that call's own gap, and the ADMM penalty sums over both."""
    cfg = quantize.QuantConfig(4, 4, correlation=True)

    class TwoDomains(nn.Module):
        @nn.compact
        def __call__(self, xs, xt):
            act = quantize.QuantActivation(cfg, name="act")
            return act(xs), act(xt)

    xs = jax.random.normal(jax.random.key(53), (4, 3, 3, 2))
    xt = jax.random.normal(jax.random.key(54), (4, 3, 3, 2)) * 2 + 0.5
    model = TwoDomains()
    v = model.init(jax.random.key(55), xs, xt)
    _, upd = model.apply(v, xs, xt, mutable=[quantize.GAP_COLLECTION])
    gs, gt = upd[quantize.GAP_COLLECTION]["act"]["gap"]
    np.testing.assert_allclose(gs, correlation_gap(xs, quantizers.cdf_align_activation(xs)), atol=1e-6)
    np.testing.assert_allclose(gt, correlation_gap(xt, quantizers.cdf_align_activation(xt)), atol=1e-6)
    assert np.abs(np.asarray(gs) - np.asarray(gt)).max() > 1e-3
    admm = ADMM()
    state = admm.init(quantize.gap_shapes(model, v, xs, xt))
    state = ADMMState(z=jax.tree.map(lambda z: z + 0.01, state.z), gamma=jax.tree.map(lambda g: g - 0.02, state.gamma))
    gaps = upd[quantize.GAP_COLLECTION]
    one = lambda d: admm.penalty(d, ADMMState(state.z["act"]["gap"][0], state.gamma["act"]["gap"][0]))  # noqa: E731
    np.testing.assert_allclose(admm.penalty(gaps, state), one(gs) + one(gt), rtol=1e-6)
    new = admm.update(gaps, state)
    np.testing.assert_allclose(new.gamma["act"]["gap"][1], admm.update(gt, ADMMState(state.z["act"]["gap"][1],
                                                                                      state.gamma["act"]["gap"][1])).gamma)


def test_without_quantizer_state_drops_only_quantizer_subtrees_and_calibrate_recreates_them():
    """Stripping then calibrating gives quantizer state initialised from the current kernel by the method's own
    rule (LSQ: 2 mean|w| / sqrt(Q_P)), and leaves every other variable as it was."""
    from alignq_jax.methods import LSQ

    cfg = quantize.QuantConfig(4, 4, method="lsq")
    model = quantize.QuantConv(3, (3, 3), config=cfg)
    x = jax.nn.relu(X)
    v = model.init(jax.random.key(40), x)
    stale = jax.tree.map(lambda a: a * 7.0, v["params"]["ConvQuantizer_0"])
    v = {"params": {**v["params"], "ConvQuantizer_0": stale}}
    stripped = quantize.without_quantizer_state(v)
    assert set(stripped["params"]) == {"kernel", "bias"}
    np.testing.assert_array_equal(stripped["params"]["kernel"], v["params"]["kernel"])
    full = quantize.calibrate(model, stripped, x)
    step = full["params"]["ConvQuantizer_0"]["weight"]["step"]
    np.testing.assert_allclose(step, LSQ().init_weight(v["params"]["kernel"], 4)["step"], rtol=1e-6)
    qp = 2**3 - 1
    np.testing.assert_allclose(step, 2 * np.abs(np.asarray(v["params"]["kernel"])).mean() / np.sqrt(qp), rtol=1e-5)
