"""AbsMax (symmetric max / percentile calibration, Wu et al., 2020): per-tensor and per-channel weight values and
levels, the activation range statistic and grid, straight-through gradients and no gradient to the range, zero
guards, dtypes, jit, bits. Expected values are hand-computed or float64 numpy written independently."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax.methods.absmax import AbsMax
from alignq_jax.methods.base import CONV_INPUT

BITS = (2, 3, 4, 5, 6, 7, 8)
BF16, F32 = jnp.bfloat16, jnp.float32

# A (3 in, 2 out) dense kernel, output channel last.
W_HAND = np.array([[0.7, -0.1], [-0.3, 0.22], [0.05, -0.4]], np.float32)


def test_method_attributes_and_keys():
    m = AbsMax()
    x = jnp.ones((2, 3), F32)
    assert m.name == "absmax" and m.placement == CONV_INPUT
    assert m.weight_params == () and m.activation_params == () and m.init_weight(x, 4) == {}
    assert tuple(m.activation_batch_stats(x, 4)) == m.activation_stats == ("range",)


def test_weight_per_tensor_hand_computed():
    # 3 bits: Q_P = 3, r = 0.7, codes round(3w/0.7):
    # [[3, -0.43 -> 0], [-1.29 -> -1, 0.94 -> 1], [0.21 -> 0, -1.71 -> -2]]
    got = AbsMax().quantize_weight({}, jnp.asarray(W_HAND), 3)
    np.testing.assert_allclose(np.asarray(got), np.array([[3, 0], [-1, 1], [0, -2]]) * 0.7 / 3, atol=1e-6)


def test_weight_per_channel_hand_computed():
    # r = [0.7, 0.4]. Column 0 as per tensor: [3, -1, 0] * 0.7/3. Column 1: 3w/0.4 = [-0.75, 1.65, -3] -> [-1, 2, -3].
    got = AbsMax(per_channel=True).quantize_weight({}, jnp.asarray(W_HAND), 3)
    expected = np.array([[3 * 0.7, -1 * 0.4], [-1 * 0.7, 2 * 0.4], [0 * 0.7, -3 * 0.4]]) / 3
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)


def test_weight_percentile_hand_computed_and_gradient():
    # |w| sorted = [0.05, 0.1, 0.22, 0.3, 0.4, 0.7]: median r = (0.22 + 0.3)/2 = 0.26, 3 bits (Q_P = 3).
    # 3w/0.26 = [8.08, -1.15, -3.46, 2.54, 0.58, -4.62] -> clip [-3, 3] -> round [3, -1, -3, 3, 1, -3]
    m = AbsMax(percentile=50.0)
    w = jnp.asarray(W_HAND.reshape(-1))
    got = m.quantize_weight({}, w, 3)
    np.testing.assert_allclose(np.asarray(got), np.array([3, -1, -3, 3, 1, -3]) * 0.26 / 3, atol=1e-6)
    g = jax.grad(lambda v: jnp.sum(jnp.arange(1.0, 7.0) * m.quantize_weight({}, v, 3)))(w)
    # Straight-through where |w| <= 0.26, 0 where the percentile clipped it.
    np.testing.assert_array_equal(np.asarray(g), [0, 2, 0, 4, 5, 0])


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("percentile", [None, 99.0, 37.5, 100.0])
def test_weight_matches_float64_numpy(per_channel, percentile):
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.05, (3, 3, 4, 6)) * np.linspace(0.5, 3, 6)  # channels of different scale
    axes = (0, 1, 2) if per_channel else None
    a = np.abs(w)
    r = a.max(axis=axes) if percentile is None else np.percentile(a, percentile, axis=axes)
    for bits in BITS:
        qp = 2 ** (bits - 1) - 1
        t = np.clip(w / r * qp, -qp, qp)
        ok = np.abs(np.abs(t - np.floor(t)) - 0.5) > 1e-4
        ref = np.round(t) * r / qp
        got = np.asarray(AbsMax(per_channel, percentile).quantize_weight({}, jnp.asarray(w, F32), bits))
        np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-5, atol=1e-7)
        # Straight-through inside [-r, r] (the max itself included), 0 outside.
        c = rng.normal(size=w.shape)
        m = AbsMax(per_channel, percentile)
        g = jax.grad(lambda v: jnp.sum(jnp.asarray(c, F32) * m.quantize_weight({}, v, bits)))(jnp.asarray(w, F32))
        inside = np.abs(w.astype(np.float32)) <= np.asarray(r, np.float32)
        np.testing.assert_array_equal(np.asarray(g), np.where(inside, c.astype(np.float32), 0.0))
        if percentile is None:
            assert inside.all()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_levels_narrow_symmetric(bits, per_channel):
    qp = 2 ** (bits - 1) - 1
    w = np.linspace(-1.0, 1.0, 40 * 2**bits)
    w2 = np.stack([w, 0.5 * w], axis=-1)  # two channels, ranges 1 and 0.5
    out = np.asarray(AbsMax(per_channel=per_channel).quantize_weight({}, jnp.asarray(w2, F32), bits))
    for ch, scale in ((0, 1.0), (1, 0.5 if per_channel else 1.0)):
        values = np.unique(out[:, ch])
        if ch == 0 or per_channel:  # the full range of levels: 2^k - 1 values, zero included
            assert len(values) == 2**bits - 1
            np.testing.assert_allclose(values, scale * np.arange(-qp, qp + 1) / qp, atol=1e-6)
        assert len(values) <= 2**bits


def test_activation_stats_and_values_hand_computed():
    x = jnp.asarray([[-1.0, 0.0, 0.3, 0.4], [1.1, 1.9, 2.0, 0.25]], F32)
    st = AbsMax().activation_batch_stats(x, 2)
    assert st["range"].shape == () and st["range"].dtype == F32 and float(st["range"]) == 2.0
    # r = 2, 2 bits (n = 3): 1.5*clip(x, 0, 2) = [0, 0, 0.45, 0.6, 1.65, 2.85, 3, 0.375] -> [0, 0, 0, 1, 2, 3, 3, 0]
    got = AbsMax().quantize_activation(st, x, 2)
    np.testing.assert_allclose(np.asarray(got), np.array([[0, 0, 0, 1], [2, 3, 3, 0]]) * 2 / 3, atol=1e-6)
    # A running range bigger than the batch's max: x > r clips, x = 5 -> r.
    got = AbsMax().quantize_activation({"range": jnp.float32(1.0)}, jnp.asarray([0.2, 0.5, 5.0], F32), 2)
    np.testing.assert_allclose(np.asarray(got), [1 / 3, 2 / 3, 1.0], atol=1e-6)


@pytest.mark.parametrize("percentile", [99.0, 99.99, 50.0, 100.0, 0.01])
def test_activation_percentile_statistic(percentile):
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(0.2, 1.0, (8, 5, 5, 3)), 0).astype(np.float32)
    r = AbsMax(percentile=percentile).activation_batch_stats(jnp.asarray(x), 4)["range"]
    np.testing.assert_allclose(float(r), np.percentile(x.astype(np.float64), percentile), rtol=3e-7)


@pytest.mark.parametrize("bits", BITS)
def test_activation_levels_all_reachable(bits):
    n = 2**bits - 1
    r = 2.6
    x = jnp.asarray(np.linspace(-0.5, r + 1.0, 40 * 2**bits), F32)
    values = np.unique(np.asarray(AbsMax().quantize_activation({"range": jnp.float32(r)}, x, bits)))
    assert len(values) == 2**bits
    np.testing.assert_allclose(values, r * np.arange(n + 1) / n, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", (2, 4, 8))
def test_activation_gradients_and_no_gradient_to_range(bits):
    m = AbsMax()
    x = np.array([-0.5, 0.0, 0.3, 1.2, 2.0, 2.5], np.float32)
    c = np.arange(1.0, 7.0).astype(np.float32)
    fn = lambda p, v: jnp.sum(jnp.asarray(c) * m.quantize_activation(p, v, bits))
    gp, gx = jax.grad(fn, argnums=(0, 1))({"range": jnp.float32(2.0)}, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(gx), [0, 2, 3, 4, 5, 0])  # [0, r], ends included
    assert float(gp["range"]) == 0.0
    # The batch statistic passes no gradient to x either (the layer's running average is not trained).
    g_stat = jax.grad(lambda v: m.activation_batch_stats(v, bits)["range"])(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(g_stat), 0.0)
    g_pct = jax.grad(lambda v: AbsMax(percentile=90.0).activation_batch_stats(v, bits)["range"])(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(g_pct), 0.0)


def test_zero_guards():
    m = AbsMax(per_channel=True)
    # A kernel whose second output channel is all zero: that channel quantizes to 0, the first is untouched.
    w = jnp.asarray(np.stack([np.linspace(-1, 1, 7), np.zeros(7)], axis=-1), F32)
    out, g = jax.value_and_grad(lambda v: jnp.sum(m.quantize_weight({}, v, 4)))(w)
    q = np.asarray(m.quantize_weight({}, w, 4))
    np.testing.assert_array_equal(q[:, 1], 0.0)
    np.testing.assert_allclose(q[:, 0], np.round(np.linspace(-1, 1, 7) * 7) / 7, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g) == 1.0)  # zero weights: range [0, 0]
    # An all-zero kernel per tensor.
    g0 = jax.grad(lambda v: jnp.sum(AbsMax().quantize_weight({}, v, 4)))(jnp.zeros((3, 2), F32))
    np.testing.assert_array_equal(np.asarray(AbsMax().quantize_weight({}, jnp.zeros((3, 2), F32), 4)), 0.0)
    assert np.all(np.isfinite(np.asarray(g0)))
    # Activation range 0 (a batch of zeros) or negative (no non-negative value): zeros, finite gradients.
    for x in (jnp.zeros((2, 3), F32), jnp.full((2, 3), -1.0, F32)):
        st = AbsMax().activation_batch_stats(x, 4)
        vals, gx = jax.value_and_grad(lambda v: jnp.sum(AbsMax().quantize_activation(st, v, 4)))(x)
        np.testing.assert_array_equal(np.asarray(AbsMax().quantize_activation(st, x, 4)), 0.0)
        assert np.all(np.isfinite(np.asarray(gx)))
    # A range of 0 with positive inputs (e.g. a median over mostly-zero activations): everything clips to 0.
    x = jnp.asarray([0.0, 0.0, 0.0, 0.5, 2.0], F32)
    st = AbsMax(percentile=50.0).activation_batch_stats(x, 4)
    assert float(st["range"]) == 0.0
    np.testing.assert_array_equal(np.asarray(AbsMax().quantize_activation(st, x, 4)), 0.0)


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("per_channel, percentile", [(False, None), (True, None), (True, 99.0)])
def test_bfloat16_equals_float32_then_cast(bits, per_channel, percentile):
    m = AbsMax(per_channel, percentile)
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(0, 0.1, (3, 3, 4, 8)), BF16)
    x = jnp.asarray(np.maximum(rng.normal(0.2, 1, (2, 4, 4, 4)), 0), BF16)
    st = m.activation_batch_stats(x, bits)
    assert float(st["range"]) == float(m.activation_batch_stats(x.astype(F32), bits)["range"])
    for fn, p, v in ((m.quantize_weight, {}, w), (m.quantize_activation, st, x)):
        got = fn(p, v, bits)
        assert got.dtype == BF16
        ref = fn(p, v.astype(F32), bits).astype(BF16)
        np.testing.assert_array_equal(np.asarray(got.astype(F32)), np.asarray(ref.astype(F32)))
        c = jnp.asarray(rng.normal(size=v.shape), BF16).astype(F32)
        g16 = jax.grad(lambda v: jnp.sum(c * fn(p, v, bits).astype(F32)))(v)
        g32 = jax.grad(lambda v: jnp.sum(c * fn(p, v, bits)))(v.astype(F32))
        assert g16.dtype == BF16
        np.testing.assert_array_equal(np.asarray(g16.astype(F32)), np.asarray(g32.astype(BF16).astype(F32)))


@pytest.mark.parametrize("per_channel, percentile", [(False, None), (True, 99.0)])
def test_jit_equals_no_jit(per_channel, percentile):
    m = AbsMax(per_channel, percentile)
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(0, 0.1, (3, 3, 4, 8)), F32)
    x = jnp.asarray(np.maximum(rng.normal(0.2, 1, (2, 4, 4, 4)), 0), F32)
    for bits in (2, 4):
        st = m.activation_batch_stats(x, bits)
        st_jit = jax.jit(lambda v: m.activation_batch_stats(v, bits))(x)
        # The percentile's interpolation may round differently once fused (1 ulp); the max is exact.
        np.testing.assert_allclose(float(st_jit["range"]), float(st["range"]), rtol=0 if percentile is None else 2e-7)
        for fn, p, v in ((m.quantize_weight, {}, w), (m.quantize_activation, st, x)):
            loss = lambda v: jnp.sum(jnp.sin(fn(p, v, bits)))
            jitted = jax.jit(lambda v: fn(p, v, bits))(v)
            if percentile is None or fn == m.quantize_activation:  # same range: the same bits
                np.testing.assert_array_equal(np.asarray(jitted), np.asarray(fn(p, v, bits)))
            else:  # the weight percentile is computed inside: its range may be 1 ulp apart
                np.testing.assert_allclose(np.asarray(jitted), np.asarray(fn(p, v, bits)), rtol=3e-7, atol=1e-8)
            g_jit, g = jax.jit(jax.grad(loss))(v), jax.grad(loss)(v)
            np.testing.assert_allclose(np.asarray(g_jit), np.asarray(g), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [0, 1, 9, 32, 2.0, True, "4", None])
def test_bad_bits_raise(bits):
    m = AbsMax()
    v = jnp.ones((2, 2), F32)
    with pytest.raises(ValueError, match="absmax: bits must be an int in 2..8"):
        m.check_bits(bits)
    for call in (
        lambda: m.quantize_weight({}, v, bits),
        lambda: m.activation_batch_stats(v, bits),
        lambda: m.quantize_activation({"range": jnp.float32(1.0)}, v, bits),
    ):
        with pytest.raises(ValueError, match="bits"):
            call()


@pytest.mark.parametrize("percentile", [0, 0.0, -1.0, 100.5, float("nan"), float("inf"), True, "99"])
def test_bad_percentile_raises(percentile):
    with pytest.raises(ValueError, match="percentile must be None or a number in"):
        AbsMax(percentile=percentile)


def test_bad_fields_and_inputs_raise():
    with pytest.raises(ValueError, match="per_channel must be True or False"):
        AbsMax(per_channel=1)
    with pytest.raises(ValueError, match="scalar"):
        AbsMax().quantize_activation({"range": jnp.ones((3,), F32)}, jnp.ones((2, 3), F32), 4)
    with pytest.raises(ValueError, match="floating"):
        AbsMax().quantize_weight({}, jnp.ones((2, 2), jnp.int32), 4)
    with pytest.raises(ValueError, match="output-channel axis"):
        AbsMax(per_channel=True).quantize_weight({}, jnp.float32(0.5), 4)
