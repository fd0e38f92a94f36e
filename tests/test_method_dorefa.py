"""DoReFa (Zhou et al., 2016): values against hand-computed numbers, level counts, gradients against float64 closed
forms, bfloat16 == float32-then-cast, jit == no-jit, bit validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax.methods.base import CONV_INPUT
from alignq_jax.methods.dorefa import DoReFa

M = DoReFa()
ALL_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def qw(w, bits):
    return M.quantize_weight({}, w, bits)


def qa(x, bits):
    return M.quantize_activation({}, x, bits)


def test_registry_attributes():
    assert (M.name, M.placement) == ("dorefa", CONV_INPUT)
    assert M.weight_params == M.activation_params == M.activation_stats == ()


# --------------------------------------------------------------------------------------------------------------
# Values by hand


W4 = jnp.array([-0.3, -0.05, 0.1, 0.4], jnp.float32)


def test_weight_values_by_hand():
    # tanh: -0.291313, -0.049958, 0.099668, 0.379949; M = 0.379949; u = tanh/(2M) + 1/2:
    # 0.116642, 0.434257, 0.631160, 1.
    # 2 bits (n = 3): n*u = 0.35, 1.30, 1.89, 3 -> codes 0, 1, 2, 3 -> 2*code/3 - 1.
    np.testing.assert_allclose(qw(W4, 2), [-1.0, -1.0 / 3.0, 1.0 / 3.0, 1.0], atol=1e-6)
    # 4 bits (n = 15): n*u = 1.750, 6.514, 9.467, 15 -> codes 2, 7, 9, 15 -> 2*code/15 - 1.
    np.testing.assert_allclose(qw(W4, 4), [-11.0 / 15.0, -1.0 / 15.0, 3.0 / 15.0, 1.0], atol=1e-6)


def test_weight_values_by_hand_saturating_kernel():
    # 10 * W4 = [-3, -0.5, 1, 4]: tanh = -0.995055, -0.462117, 0.761594, 0.999329 = M;
    # u = tanh/(2M) + 1/2 = 0.002139, 0.268786, 0.881053, 1.
    # 2 bits: 3u = 0.006, 0.806, 2.643, 3 -> codes 0, 1, 3, 3 (tanh squeezes the large weights together).
    np.testing.assert_allclose(qw(10.0 * W4, 2), [-1.0, -1.0 / 3.0, 1.0, 1.0], atol=1e-6)
    # 3 bits: 7u = 0.015, 1.882, 6.167, 7 -> codes 0, 2, 6, 7 -> 2*code/7 - 1.
    np.testing.assert_allclose(qw(10.0 * W4, 3), [-1.0, -3.0 / 7.0, 5.0 / 7.0, 1.0], atol=1e-6)


def test_binary_weight_by_hand():
    w = jnp.array([-0.3, -0.05, 0.1, 0.4, 0.0], jnp.float32)
    # E = mean|w| = 0.85 / 5 = 0.17; sign(0) = +1
    np.testing.assert_allclose(qw(w, 1), [-0.17, -0.17, 0.17, 0.17, 0.17], atol=1e-7)


def test_activation_values_by_hand():
    x = jnp.array([-0.5, 0.0, 0.2, 0.45, 0.7, 1.0, 1.3], jnp.float32)
    # clip -> [0, 0, .2, .45, .7, 1, 1]; 2 bits: 3x = 0, 0, .6, 1.35, 2.1, 3, 3 -> 0, 0, 1, 1, 2, 3, 3 (/3)
    np.testing.assert_allclose(qa(x, 2), np.array([0, 0, 1, 1, 2, 3, 3]) / 3.0, atol=1e-7)
    # 1 bit: round(clip) -> 0, 0, 0, 0, 1, 1, 1
    np.testing.assert_allclose(qa(x, 1), [0, 0, 0, 0, 1, 1, 1], atol=0)
    # 4 bits: 15x = 0, 0, 3, 6.75, 10.5 (tie, half to even -> 10), 15, 15
    np.testing.assert_allclose(qa(x, 4), np.array([0, 0, 3, 7, 10, 15, 15]) / 15.0, atol=1e-7)


def test_zero_kernel_is_finite_with_zero_gradient():
    w = jnp.zeros((3, 3, 2, 4), jnp.float32)
    for bits in (2, 3, 4):
        n = 2**bits - 1
        out = qw(w, bits)
        # ratio 0 -> u = 1/2 -> n/2 is a tie, rounds to the even code (n + 1)/2 -> value 1/n
        np.testing.assert_allclose(out, np.full(w.shape, 1.0 / n), atol=1e-6)
        grad = jax.grad(lambda v: jnp.sum(qw(v, bits) * jnp.arange(v.size).reshape(v.shape)))(w)
        assert np.all(np.asarray(grad) == 0)
    np.testing.assert_array_equal(qw(w, 1), np.zeros(w.shape))


def test_nan_propagates():
    w = jnp.array([0.1, jnp.nan, -0.2], jnp.float32)
    assert np.all(np.isnan(np.asarray(qw(w, 3))))
    assert np.isnan(np.asarray(qa(jnp.array([jnp.nan, 0.5]), 3))[0])


# --------------------------------------------------------------------------------------------------------------
# Level counts


def _weight_grid(bits):
    n = 2**bits - 1
    return 2.0 * np.arange(n + 1) / n - 1.0


@pytest.mark.parametrize("bits", (2, 3, 4, 5, 6, 7, 8))
def test_weight_levels_all_reached_and_no_others(bits):
    n = 2**bits - 1
    grid = _weight_grid(bits)
    # tanh(w) = 0.5 * (2j/n - 1) -> u = j/n exactly on each code
    targets = jnp.asarray(np.arctanh(0.5 * grid), jnp.float32)
    np.testing.assert_allclose(qw(targets, bits), grid, atol=1e-6)
    rng = np.random.default_rng(bits)
    dense = jnp.asarray(rng.normal(0.0, 0.5, 50_000), jnp.float32)
    got = np.unique(np.round(np.asarray(qw(dense, bits), np.float64) * n, 3))
    assert len(got) <= 2**bits
    np.testing.assert_array_equal(got, 2.0 * np.round((got + n) / 2.0) - n)  # integer odd/even pattern 2j - n
    assert got.min() >= -n and got.max() <= n


def test_binary_weight_levels():
    rng = np.random.default_rng(0)
    w = jnp.asarray(np.concatenate([rng.normal(size=1000), [0.0]]), jnp.float32)
    e = np.abs(np.asarray(w, np.float64)).mean()
    got = np.unique(np.asarray(qw(w, 1)))
    assert len(got) == 2
    np.testing.assert_allclose(got, [-e, e], rtol=1e-6)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_activation_levels_all_reached_and_no_others(bits):
    n = 2**bits - 1
    x = jnp.asarray(np.concatenate([np.linspace(-1.0, 2.0, 200_001), [np.inf, -np.inf]]), jnp.float32)
    got = np.unique(np.asarray(qa(x, bits), np.float64))
    assert len(got) == 2**bits
    np.testing.assert_allclose(got, np.arange(n + 1) / n, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------
# Gradients


def _dorefa_weight_grad_closed_form(w, c):
    """d/dw sum(c * w_q) in float64: rounding straight-through, so w_q = 2u - 1 + const = tanh(w)/M + const, with M
    = max|tanh(w)| (unique argmax) differentiated: dM/dw_j = sign(t_j) (1 - t_j^2) at the argmax only."""
    shape = np.shape(w)
    w, c = np.asarray(w, np.float64).ravel(), np.asarray(c, np.float64).ravel()
    t = np.tanh(w)
    j = np.argmax(np.abs(t))
    m = np.abs(t[j])
    grad = c * (1.0 - t**2) / m
    grad[j] -= np.sign(t[j]) * (1.0 - t[j] ** 2) * np.sum(c * t) / m**2
    return grad.reshape(shape)


@pytest.mark.parametrize("bits", (2, 4, 8))
def test_weight_gradient_closed_form_through_max(bits):
    rng = np.random.default_rng(10 + bits)
    w = rng.normal(0.0, 0.4, (3, 3, 2, 5))
    c = rng.normal(size=w.shape)
    grad = jax.grad(lambda v: jnp.sum(qw(v, bits) * jnp.asarray(c, jnp.float32)))(jnp.asarray(w, jnp.float32))
    expected = _dorefa_weight_grad_closed_form(w, c)
    np.testing.assert_allclose(grad, expected, rtol=2e-5, atol=2e-5)
    # The max is not a constant: its element gets a correction the others do not.
    j = np.unravel_index(np.argmax(np.abs(w)), w.shape)
    t = np.tanh(w)
    assert abs(float(grad[j]) - c[j] * (1 - t[j] ** 2) / np.abs(t).max()) > 1e-3


def test_weight_gradient_finite_difference_of_unrounded_map():
    # Central differences of 2u - 1 = tanh(w)/M (what straight-through rounding differentiates), float64.
    rng = np.random.default_rng(3)
    w = rng.normal(0.0, 0.4, 12)
    c = rng.normal(size=12)
    f = lambda v: np.sum(c * np.tanh(v) / np.abs(np.tanh(v)).max())  # noqa: E731
    h = 1e-6
    fd = np.array([(f(w + h * e) - f(w - h * e)) / (2 * h) for e in np.eye(12)])
    grad = jax.grad(lambda v: jnp.sum(qw(v, 3) * jnp.asarray(c, jnp.float32)))(jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-4)


def test_binary_weight_gradient_is_identity():
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.normal(0.0, 0.1, 20), jnp.float32)
    c = jnp.asarray(rng.normal(size=20), jnp.float32)
    grad = jax.grad(lambda v: jnp.sum(qw(v, 1) * c))(w)
    np.testing.assert_array_equal(grad, c)  # not scaled by E = mean|w|, and E gets no gradient


def test_activation_gradient_mask():
    x = jnp.array([-0.5, -1e-3, 0.0, 0.2, 0.55, 1.0, 1.0 + 1e-3, 3.0], jnp.float32)
    c = jnp.arange(1.0, 9.0)
    for bits in (1, 2, 4, 8):
        grad = jax.grad(lambda v: jnp.sum(qa(v, bits) * c))(x)
        np.testing.assert_array_equal(grad, [0, 0, 3, 4, 5, 6, 0, 0])


# --------------------------------------------------------------------------------------------------------------
# dtype, jit, validation


def test_bfloat16_equals_float32_then_cast():
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.normal(0.0, 0.3, (3, 3, 4, 8)), jnp.bfloat16)
    x = jnp.asarray(rng.uniform(-0.2, 1.2, (2, 5, 5, 4)), jnp.bfloat16)
    for bits in (1, 2, 4):
        out = qw(w, bits)
        assert out.dtype == jnp.bfloat16 and out.shape == w.shape
        np.testing.assert_array_equal(out, qw(w.astype(jnp.float32), bits).astype(jnp.bfloat16))
        out = qa(x, bits)
        assert out.dtype == jnp.bfloat16 and out.shape == x.shape
        np.testing.assert_array_equal(out, qa(x.astype(jnp.float32), bits).astype(jnp.bfloat16))


def test_jit_equals_no_jit():
    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.normal(0.0, 0.3, (3, 3, 4, 8)), jnp.float32)
    x = jnp.asarray(rng.uniform(-0.2, 1.2, (2, 5, 5, 4)), jnp.float32)
    jw = jax.jit(M.quantize_weight, static_argnames="bits")
    ja = jax.jit(M.quantize_activation, static_argnames="bits")
    for bits in (1, 3, 8):
        np.testing.assert_array_equal(jw({}, w, bits=bits), qw(w, bits))
        np.testing.assert_array_equal(ja({}, x, bits=bits), qa(x, bits))
        gw = jax.grad(lambda v: jnp.sum(qw(v, bits) ** 2))
        np.testing.assert_allclose(jax.jit(gw)(w), gw(w), rtol=1e-6, atol=1e-6)


def test_init_has_no_params():
    w = jnp.ones((3, 3, 2, 4))
    assert M.init_weight(w, 4) == {} and M.init_activation(w, 4) == {}


@pytest.mark.parametrize("bits", [0, 9, 32, -1, 2.0, True, "4", None])
def test_bad_bits_raise(bits):
    w = jnp.ones((4,))
    for call in (
        lambda: M.quantize_weight({}, w, bits),
        lambda: M.quantize_activation({}, w, bits),
        lambda: M.init_weight(w, bits),
        lambda: M.check_bits(bits),
    ):
        with pytest.raises(ValueError, match="bits"):
            call()


def test_unexpected_params_raise():
    with pytest.raises(ValueError, match="no parameters"):
        M.quantize_weight({"alpha": jnp.float32(1.0)}, jnp.ones(4), 2)


def test_integer_input_raises():
    with pytest.raises(ValueError, match="floating"):
        M.quantize_activation({}, jnp.arange(4), 2)
