"""PACT (Choi et al., 2018): clipped activation values and levels, the straight-through gradients of x and alpha,
alpha's init, DoReFa weights (values, levels, gradient through tanh and the max), dtypes, jit, bits. Expected
values are hand-computed or float64 numpy written independently of the library."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax.methods.base import CONV_INPUT
from alignq_jax.methods.pact import PACT, dorefa_weight

M = PACT()
ALL_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
BF16, F32 = jnp.bfloat16, jnp.float32


def test_method_attributes_and_param_keys():
    x = jnp.ones((2, 3), F32)
    assert M.name == "pact" and M.placement == CONV_INPUT
    assert M.init_weight(x, 4) == {} and M.weight_params == ()
    assert tuple(M.init_activation(x, 4)) == M.activation_params == ("alpha",)


def test_activation_values_hand_computed():
    # alpha = 2, 2 bits (n = 3): y*n/alpha = 1.5*clip(x, 0, 2) = [0, 0, 0.45, 0.6, 1.65, 2.85, 3, 3]
    # -> round [0, 0, 0, 1, 2, 3, 3, 3] -> * 2/3
    x = jnp.asarray([-1.0, 0.0, 0.3, 0.4, 1.1, 1.9, 2.0, 5.0], F32)
    got = M.quantize_activation({"alpha": jnp.float32(2.0)}, x, 2)
    np.testing.assert_allclose(np.asarray(got), [0, 0, 0, 2 / 3, 4 / 3, 2, 2, 2], atol=1e-6)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_activation_matches_float64_formula(bits):
    n = 2**bits - 1
    alpha = 1.7
    rng = np.random.default_rng(bits)
    x = rng.normal(0.5, 1.5, 5000)
    t = np.clip(x, 0, alpha) * n / alpha
    x = x[np.abs(t - np.floor(t) - 0.5) > 1e-4]  # off the rounding ties
    got = M.quantize_activation({"alpha": jnp.float32(alpha)}, jnp.asarray(x, F32), bits)
    ref = np.round(np.clip(x, 0, alpha) * n / alpha) * alpha / n
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_activation_levels_all_reachable(bits):
    n = 2**bits - 1
    alpha = 3.3
    x = jnp.asarray(np.linspace(-1.0, alpha + 1.0, 50 * 2**bits), F32)
    values = np.unique(np.asarray(M.quantize_activation({"alpha": jnp.float32(alpha)}, x, bits)))
    assert len(values) == 2**bits
    np.testing.assert_allclose(values, alpha * np.arange(n + 1) / n, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", (1, 2, 4, 8))
def test_activation_gradients_closed_form(bits):
    alpha = 1.5
    # Ends included: x = 0 (gradient 1) and x = alpha exactly (x: 0, alpha: 1).
    x = np.array([-2.0, -0.1, 0.0, 0.2, 0.9, 1.4999, 1.5, 1.6, 7.0], np.float32)
    c = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], np.float32)
    fn = lambda p, v: jnp.sum(jnp.asarray(c) * M.quantize_activation(p, v, bits))
    gp, gx = jax.grad(fn, argnums=(0, 1))({"alpha": jnp.float32(alpha)}, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(gx), [0, 0, 3, 4, 5, 6, 0, 0, 0])
    assert float(gp["alpha"]) == 7.0 + 8.0 + 9.0


@pytest.mark.parametrize("bits", (2, 4))
def test_activation_gradients_random_vs_numpy(bits):
    rng = np.random.default_rng(bits)
    x = rng.normal(0.3, 1.2, (4, 5, 5, 3)).astype(np.float32)
    c = rng.normal(size=x.shape).astype(np.float32)
    alpha = 1.1
    fn = lambda p, v: jnp.sum(jnp.asarray(c) * M.quantize_activation(p, v, bits))
    gp, gx = jax.grad(fn, argnums=(0, 1))({"alpha": jnp.float32(alpha)}, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(gx), np.where((x >= 0) & (x < np.float32(alpha)), c, 0))
    np.testing.assert_allclose(float(gp["alpha"]), np.sum(np.where(x >= np.float32(alpha), c, 0.0)), rtol=1e-5)


def test_alpha_init_ignores_data():
    x1 = jnp.asarray(np.linspace(0, 100, 30).reshape(3, 10), F32)
    x2 = jnp.zeros((7, 2), BF16)
    for m, expected in ((PACT(), 10.0), (PACT(alpha_init=3.5), 3.5), (PACT(alpha_init=2), 2.0)):
        for x in (x1, x2):
            a = m.init_activation(x, 4)["alpha"]
            assert a.shape == () and a.dtype == F32 and float(a) == expected


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "10", None])
def test_bad_alpha_init_raises(bad):
    with pytest.raises(ValueError, match="alpha_init must be a positive finite number"):
        PACT(alpha_init=bad)


def test_non_positive_alpha_stays_finite_and_gradient_passes():
    # Weight decay can push alpha to or below 0: the forward uses the floor (outputs ~0), and alpha's gradient
    # (1 where x >= alpha, i.e. every x >= the floor) reaches alpha, so training can move it back up.
    x = jnp.asarray([-1.0, 0.0, 0.5, 2.0], F32)
    for alpha in (0.0, -0.3):
        out = M.quantize_activation({"alpha": jnp.float32(alpha)}, x, 4)
        assert np.all(np.isfinite(np.asarray(out))) and np.all(np.abs(np.asarray(out)) < 1e-9)
        gp = jax.grad(lambda p: jnp.sum(M.quantize_activation(p, x, 4)))({"alpha": jnp.float32(alpha)})
        assert float(gp["alpha"]) == 2.0  # x = 0.5 and 2.0


# DoReFa weights: hand-computed, w = [-2, -0.5, 0, 0.3, 1]:
# tanh(w) = [-0.96403, -0.46212, 0, 0.29131, 0.76159], max|tanh| = 0.96403,
# r = tanh/(2*0.96403) + 0.5 = [0, 0.26032, 0.5, 0.65109, 0.89501]
W_HAND = np.array([-2.0, -0.5, 0.0, 0.3, 1.0], np.float32)


def test_dorefa_weight_hand_computed():
    # 2 bits: 3r = [0, 0.781, 1.5 (half to even: 2), 1.953, 2.685] -> [0, 1, 2, 2, 3] -> 2j/3 - 1
    got = M.quantize_weight({}, jnp.asarray(W_HAND), 2)
    np.testing.assert_allclose(np.asarray(got), [-1, -1 / 3, 1 / 3, 1 / 3, 1], atol=1e-6)
    # 3 bits: 7r = [0, 1.822, 3.5 (-> 4), 4.558, 6.265] -> [0, 2, 4, 5, 6] -> 2j/7 - 1
    got = M.quantize_weight({}, jnp.asarray(W_HAND), 3)
    np.testing.assert_allclose(np.asarray(got), [-1, -3 / 7, 1 / 7, 3 / 7, 5 / 7], atol=1e-6)
    # 1 bit: mean|w| * sign(w), mean|w| = 3.8/5 = 0.76, w = 0 -> +0.76
    got = M.quantize_weight({}, jnp.asarray(W_HAND), 1)
    np.testing.assert_allclose(np.asarray(got), [-0.76, -0.76, 0.76, 0.76, 0.76], atol=1e-6)


def _np_dorefa_r(w):
    t = np.tanh(np.asarray(w, np.float64))
    return t / (2 * np.max(np.abs(t))) + 0.5


@pytest.mark.parametrize("bits", ALL_BITS[1:])
def test_dorefa_weight_matches_float64_and_levels(bits):
    n = 2**bits - 1
    rng = np.random.default_rng(bits)
    w = rng.normal(0, 0.8, (3, 3, 8, 16))
    got = np.asarray(M.quantize_weight({}, jnp.asarray(w, F32), bits))
    t = n * _np_dorefa_r(w)
    ok = np.abs(t - np.floor(t) - 0.5) > 1e-4
    np.testing.assert_allclose(got[ok], (2 * np.round(t) / n - 1)[ok], atol=1e-6)
    dense = jnp.asarray(np.linspace(-3, 3, 40 * 2**bits), F32)
    values = np.unique(np.asarray(M.quantize_weight({}, dense, bits)))
    assert len(values) == 2**bits
    np.testing.assert_allclose(values, 2 * np.arange(n + 1) / n - 1, atol=1e-6)


def test_dorefa_one_bit_levels():
    # An exact zero included: it maps to +mean|w|, so there are exactly 2 levels, +-mean|w|.
    w = np.concatenate([np.linspace(-1, 2, 101), [0.0]])
    values = np.unique(np.asarray(M.quantize_weight({}, jnp.asarray(w, F32), 1)))
    np.testing.assert_allclose(values, [-np.abs(w).mean(), np.abs(w).mean()], rtol=1e-6)


@pytest.mark.parametrize("bits", ALL_BITS[1:])
def test_dorefa_weight_gradient_closed_form(bits):
    # Straight-through rounding: d w_q / d w = 2 dr/dw, r = tanh(w)/(2M) + 1/2, M = max|tanh w| (unique max at i*):
    # dL/dw_j = c_j sech^2(w_j)/M - [j = i*] sign(t_i*) sech^2(w_i*) sum_i c_i t_i / M^2
    rng = np.random.default_rng(bits)
    w = rng.normal(0, 0.5, (5, 7))
    w.flat[11] = 2.5  # the unique max
    c = rng.normal(size=w.shape)
    g = jax.grad(lambda v: jnp.sum(jnp.asarray(c, F32) * M.quantize_weight({}, v, bits)))(jnp.asarray(w, F32))
    g = np.asarray(g)
    t = np.tanh(w)
    sech2 = 1 - t**2
    m = np.max(np.abs(t))
    ref = c * sech2 / m
    i = np.argmax(np.abs(t))
    ref.flat[i] -= np.sign(t.flat[i]) * sech2.flat[i] * np.sum(c * t) / m**2
    np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-4, atol=1e-6)
    # The same against central finite differences of the unrounded 2r(w) - 1 (float64).
    h = 1e-6
    for j in (0, 11, 20):
        wp, wm = w.copy(), w.copy()
        wp.flat[j] += h
        wm.flat[j] -= h
        fd = np.sum(c * (2 * _np_dorefa_r(wp) - 1) - c * (2 * _np_dorefa_r(wm) - 1)) / (2 * h)
        np.testing.assert_allclose(float(g.flat[j]), fd, rtol=1e-4, atol=1e-6)


def test_dorefa_one_bit_gradient_is_straight_through():
    w = jnp.asarray([-0.7, 0.1, 0.4], F32)
    c = jnp.asarray([1.0, -2.0, 3.0], F32)
    g = jax.grad(lambda v: jnp.sum(c * M.quantize_weight({}, v, 1)))(w)
    # DoReFa's binary backward dc/dw = dc/dw_q: the identity, not scaled by mean|w| (0.4 here).
    np.testing.assert_array_equal(np.asarray(g), np.asarray(c))


@pytest.mark.parametrize("bits", (1, 2, 4))
def test_dorefa_all_zero_kernel_is_finite(bits):
    w = jnp.zeros((3, 4), F32)
    c = jnp.asarray(np.arange(12.0).reshape(3, 4), F32)
    g = jax.grad(lambda v: jnp.sum(c * M.quantize_weight({}, v, bits)))(w)
    q = np.asarray(M.quantize_weight({}, w, bits))
    # ratio taken as 0: r = 1/2, the grid point nearest 0 (half to even: code (n+1)/2, i.e. +1/n) with zero
    # gradient; at 1 bit mean|w| = 0, output 0, identity gradient.
    expected = 0.0 if bits == 1 else 1.0 / (2**bits - 1)
    np.testing.assert_allclose(q, expected, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(c) if bits == 1 else 0.0)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_pact_weights_are_dorefa_methods_weights(bits):
    # PACT quantizes weights with DoReFa's scheme: same values and gradients as the DoReFa method's weights.
    from alignq_jax.methods.dorefa import DoReFa

    rng = np.random.default_rng(bits)
    c = jnp.asarray(rng.normal(size=(3, 3, 4, 8)), F32)
    for w in (jnp.asarray(rng.normal(0, 0.6, (3, 3, 4, 8)), F32), jnp.zeros((3, 3, 4, 8), F32)):
        ours = jax.value_and_grad(lambda v: jnp.sum(c * M.quantize_weight({}, v, bits)))(w)
        theirs = jax.value_and_grad(lambda v: jnp.sum(c * DoReFa().quantize_weight({}, v, bits)))(w)
        np.testing.assert_array_equal(
            np.asarray(M.quantize_weight({}, w, bits)), np.asarray(DoReFa().quantize_weight({}, w, bits))
        )
        np.testing.assert_allclose(np.asarray(ours[1]), np.asarray(theirs[1]), rtol=1e-6, atol=1e-7)


def test_dorefa_weight_public_function_equals_method():
    w = jnp.asarray(np.random.default_rng(0).normal(0, 0.3, (3, 3, 2, 4)), F32)
    np.testing.assert_array_equal(np.asarray(dorefa_weight(w, 3)), np.asarray(M.quantize_weight({}, w, 3)))


@pytest.mark.parametrize("bits", (1, 2, 4, 8))
def test_bfloat16_equals_float32_then_cast(bits):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(0, 0.5, (3, 3, 4, 8)), BF16)
    x = jnp.asarray(rng.normal(0.5, 1.5, (2, 4, 4, 4)), BF16)
    pa = {"alpha": jnp.float32(2.3)}
    for fn, p, v in ((M.quantize_weight, {}, w), (M.quantize_activation, pa, x)):
        got = fn(p, v, bits)
        assert got.dtype == BF16
        ref = fn(p, v.astype(F32), bits).astype(BF16)
        np.testing.assert_array_equal(np.asarray(got.astype(F32)), np.asarray(ref.astype(F32)))
        c = jnp.asarray(rng.normal(size=v.shape), BF16).astype(F32)  # same cotangent at both output dtypes
        g16 = jax.grad(lambda p, v: jnp.sum(c * fn(p, v, bits).astype(F32)), argnums=(0, 1))(p, v)
        g32 = jax.grad(lambda p, v: jnp.sum(c * fn(p, v, bits)), argnums=(0, 1))(p, v.astype(F32))
        assert g16[1].dtype == BF16
        np.testing.assert_array_equal(np.asarray(g16[1].astype(F32)), np.asarray(g32[1].astype(BF16).astype(F32)))
        if p:
            np.testing.assert_allclose(float(g16[0]["alpha"]), float(g32[0]["alpha"]), rtol=1e-6)


def test_jit_equals_no_jit():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(0, 0.5, (3, 3, 4, 8)), F32)
    x = jnp.asarray(rng.normal(0.5, 1.5, (2, 4, 4, 4)), F32)
    for bits in (1, 2, 4):
        pa = M.init_activation(x, bits)
        for fn, p, v in ((M.quantize_weight, {}, w), (M.quantize_activation, {"alpha": jnp.float32(2.3)}, x)):
            loss = lambda p, v: jnp.sum(jnp.sin(fn(p, v, bits)))
            np.testing.assert_array_equal(
                np.asarray(jax.jit(lambda p, v: fn(p, v, bits))(p, v)), np.asarray(fn(p, v, bits))
            )
            g_jit, g = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, v), jax.grad(loss, argnums=(0, 1))(p, v)
            # Fused tanh' / sin' arithmetic may differ in the last float32 bit.
            np.testing.assert_allclose(np.asarray(g_jit[1]), np.asarray(g[1]), rtol=1e-6, atol=1e-7)
            if p:
                np.testing.assert_allclose(float(g_jit[0]["alpha"]), float(g[0]["alpha"]), rtol=1e-6)
        assert float(jax.jit(lambda v: M.init_activation(v, bits))(x)["alpha"]) == float(pa["alpha"])


@pytest.mark.parametrize("bits", [0, 9, 32, 2.0, True, "4", None])
def test_bad_bits_raise(bits):
    v = jnp.ones((2, 2), F32)
    with pytest.raises(ValueError, match="bits must be an int in 1..8"):
        M.check_bits(bits)
    for call in (
        lambda: M.quantize_weight({}, v, bits),
        lambda: M.init_activation(v, bits),
        lambda: M.quantize_activation({"alpha": jnp.float32(1.0)}, v, bits),
        lambda: dorefa_weight(v, bits),
    ):
        with pytest.raises(ValueError, match="bits"):
            call()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="scalar"):
        M.quantize_activation({"alpha": jnp.ones((2,), F32)}, jnp.ones((2, 2), F32), 4)
    with pytest.raises(ValueError, match="floating"):
        M.quantize_weight({}, jnp.ones((2, 2), jnp.int32), 4)
