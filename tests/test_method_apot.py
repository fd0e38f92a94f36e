"""APoT (Li, Dong, Wang, 2020): level sets against the paper's formula and hand-written sets, quantized values by
hand, level counts, RCF gradients against float64 closed forms, the init rule, bfloat16, jit, validation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax.methods.apot import APoT, apot_levels
from alignq_jax.methods.base import CONV_INPUT

M = APoT()
BITS = (2, 3, 4, 5, 6)


def qw(w, alpha, bits):
    return M.quantize_weight({"alpha": jnp.float32(alpha)}, w, bits)


def qa(x, alpha, bits):
    return M.quantize_activation({"alpha": jnp.float32(alpha)}, x, bits)


def test_registry_attributes():
    assert (M.name, M.placement) == ("apot", CONV_INPUT)
    assert M.weight_params == M.activation_params == ("alpha",)
    assert M.activation_stats == ()


# --------------------------------------------------------------------------------------------------------------
# Level sets


def _paper_even_set(b):
    """The paper's additive set for even b with base bit-width 2: n = b/2 terms, p_i in {0, 2^-i, 2^-(i+n),
    2^-(i+2n)}, normalised to a maximum of 1."""
    n = b // 2
    terms = [[0.0] + [2.0 ** -(i + j * n) for j in range(3)] for i in range(n)]
    sums = np.unique([sum(c) for c in itertools.product(*terms)])
    return sums / sums.max()


def _sums(*terms):
    sums = np.unique([sum(c) for c in itertools.product(*[[0.0, *t] for t in terms])])
    return sums / sums.max()


def test_unsigned_levels_by_hand():
    np.testing.assert_allclose(apot_levels(1, False), [0.0, 1.0])
    np.testing.assert_allclose(apot_levels(2, False), [0.0, 0.25, 0.5, 1.0])
    # 3 bits: {0, 1/2, 1/4, 1/16} + {0, 1/8}, max 5/8
    np.testing.assert_allclose(apot_levels(3, False), [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0], atol=1e-15)
    # 4 bits, in units of 1/64: {0, 32, 8, 2} + {0, 16, 4, 1}, max 48
    sixty_fourths = [0, 1, 2, 3, 4, 6, 8, 9, 12, 16, 18, 24, 32, 33, 36, 48]
    np.testing.assert_allclose(apot_levels(4, False), np.array(sixty_fourths) / 48.0, atol=1e-15)


@pytest.mark.parametrize("b", [2, 4, 6])
def test_even_sets_are_the_papers_formula(b):
    np.testing.assert_allclose(apot_levels(b, False), _paper_even_set(b), rtol=0, atol=1e-15)


def test_odd_sets_are_the_authors_construction():
    # 3 bits: terms {2^-1, 2^-2, 2^-4} and {2^-3}; 5 bits: {2^-1, 2^-3, 2^-6}, {2^-2, 2^-4, 2^-7}, {2^-5}.
    np.testing.assert_allclose(apot_levels(3, False), _sums([2**-1, 2**-2, 2**-4], [2**-3]), atol=1e-15)
    expected = _sums([2**-1, 2**-3, 2**-6], [2**-2, 2**-4, 2**-7], [2**-5])
    np.testing.assert_allclose(apot_levels(5, False), expected, atol=1e-15)


@pytest.mark.parametrize("b", [1, 2, 3, 4, 5, 6])
def test_unsigned_count_is_2_to_the_b(b):
    levels = apot_levels(b, False)
    assert len(levels) == 2**b and levels[0] == 0.0 and levels[-1] == 1.0 and np.all(np.diff(levels) > 0)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6, 7])
def test_signed_set_is_symmetric_with_2_to_the_k_minus_1_levels(k):
    levels = apot_levels(k, True)
    assert len(levels) == 2**k - 1  # the shared zero: one fewer than 2^k
    np.testing.assert_array_equal(levels, -levels[::-1])
    np.testing.assert_array_equal(levels[levels >= 0], apot_levels(k - 1, False))


def test_signed_two_bits_is_ternary():
    np.testing.assert_array_equal(apot_levels(2, True), [-1.0, 0.0, 1.0])


@pytest.mark.parametrize("bits,signed", [(0, False), (7, False), (1, True), (8, True), (2.0, False), (True, True)])
def test_apot_levels_bad_bits(bits, signed):
    with pytest.raises(ValueError, match="bits"):
        apot_levels(bits, signed)


# --------------------------------------------------------------------------------------------------------------
# Values by hand


W5 = jnp.array([-2.0, -1.0, 0.0, 1.0, 2.0], jnp.float32)  # mean 0, unbiased std sqrt(10/4) = 1.581139


def test_weight_values_by_hand():
    # z = W5 / 1.581139 = [-1.264911, -0.632456, 0, 0.632456, 1.264911]
    # 2 bits (ternary), alpha 1: v clipped to +-1; |0.632| -> 1 (nearer than 0) -> [-1, -1, 0, 1, 1]
    np.testing.assert_allclose(qw(W5, 1.0, 2), [-1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-7)
    # 2 bits, alpha 2: v = +-0.632, +-0.316 -> +-1, 0 -> times 2
    np.testing.assert_allclose(qw(W5, 2.0, 2), [-2.0, 0.0, 0.0, 0.0, 2.0], atol=1e-7)
    # 3 bits (magnitudes {0, 1/4, 1/2, 1}), alpha 1: 0.632 -> 0.5
    np.testing.assert_allclose(qw(W5, 1.0, 3), [-1.0, -0.5, 0.0, 0.5, 1.0], atol=1e-7)
    # 4 bits (magnitudes {0, .1, .2, .3, .4, .6, .8, 1}), alpha 1.5: v = 0.843274 -> 0.8, 0.421637 -> 0.4
    np.testing.assert_allclose(qw(W5, 1.5, 4), [-1.2, -0.6, 0.0, 0.6, 1.2], atol=1e-6)


def test_weight_standardisation_removes_shift_and_scale():
    np.testing.assert_allclose(qw(3.0 * W5 + 7.0, 1.5, 4), [-1.2, -0.6, 0.0, 0.6, 1.2], atol=1e-6)


def test_weight_quantizer_is_odd():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(0.0, 0.1, (3, 3, 4, 8)), jnp.float32)
    w = w - jnp.mean(w)  # exactly symmetric standardisation of w and -w
    for bits in BITS:
        np.testing.assert_array_equal(qw(-w, 2.5, bits), -qw(w, 2.5, bits))


def test_activation_values_by_hand():
    x = jnp.array([-1.0, 0.0, 0.3, 0.9, 1.6, 2.5], jnp.float32)
    # alpha 2, 2 bits {0, 1/4, 1/2, 1}: v = -.5, 0, .15, .45, .8, 1.25 -> clip -> 0, 0, .25, .5, 1, 1 -> times 2
    np.testing.assert_allclose(qa(x, 2.0, 2), [0.0, 0.0, 0.5, 1.0, 2.0, 2.0], atol=1e-7)
    # alpha 2.5, 3 bits {0, .1, .2, .3, .4, .6, .8, 1}: v = -.4, 0, .12, .36, .64, 1 -> 0, 0, .1, .4, .6, 1
    np.testing.assert_allclose(qa(x, 2.5, 3), [0.0, 0.0, 0.25, 1.0, 1.5, 2.5], atol=1e-6)


def test_activation_tie_goes_to_the_lower_level():
    # alpha 2, 2 bits: x = 0.75 -> v = 0.375, the midpoint of 1/4 and 1/2 -> 1/4 -> 0.5
    np.testing.assert_allclose(qa(jnp.array([0.75, 0.7500001]), 2.0, 2), [0.5, 1.0])


def test_constant_kernel_gives_zero_with_zero_gradient():
    w = jnp.full((3, 3, 2, 4), 0.25, jnp.float32)
    np.testing.assert_array_equal(qw(w, 3.0, 4), np.zeros(w.shape))
    gw, ga = jax.grad(lambda v, a: jnp.sum(qw(v, a, 4) * 1.5), argnums=(0, 1))(w, jnp.float32(3.0))
    assert np.all(np.asarray(gw) == 0) and float(ga) == 0.0


def test_nonpositive_alpha_is_floored_and_finite():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(0.0, 2.0, 50), jnp.float32)
    for alpha in (0.0, -1.0):
        out, ga = jax.value_and_grad(lambda a: jnp.sum(qa(x, a, 3)))(jnp.float32(alpha))
        assert np.isfinite(float(out)) and np.isfinite(float(ga))
        assert float(ga) == 50.0  # every v = x / 1e-12 is above the range: d/dalpha = 1 each


def test_nan_propagates():
    out = qa(jnp.array([jnp.nan, 0.5]), 2.0, 3)
    assert np.isnan(np.asarray(out)[0]) and not np.isnan(np.asarray(out)[1])


def test_one_element_kernel_raises():
    with pytest.raises(ValueError, match="at least 2 elements"):
        qw(jnp.ones((1,)), 3.0, 4)


# --------------------------------------------------------------------------------------------------------------
# Level counts


@pytest.mark.parametrize("bits", BITS)
def test_activation_levels_all_reached_and_no_others(bits):
    alpha = 1.75
    expected = alpha * apot_levels(bits, False)
    np.testing.assert_allclose(qa(jnp.asarray(expected, jnp.float32), alpha, bits), expected, rtol=1e-6)
    x = jnp.asarray(np.concatenate([np.linspace(-1.0, 2 * alpha, 100_001), [np.inf, -np.inf]]), jnp.float32)
    got = np.unique(np.asarray(qa(x, alpha, bits), np.float64))
    assert len(got) == 2**bits
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_weight_levels_all_reached_and_no_others(bits):
    levels = apot_levels(bits, True)
    # w = the signed set (mean 0): z = levels / std, so alpha = 1 / std puts z / alpha on the levels.
    alpha = 1.0 / np.std(levels, ddof=1)
    got = np.asarray(qw(jnp.asarray(levels, jnp.float32), alpha, bits), np.float64)
    np.testing.assert_allclose(got, alpha * levels, rtol=1e-5, atol=1e-6)
    rng = np.random.default_rng(bits)
    dense = jnp.asarray(rng.normal(0.0, 0.05, 100_000), jnp.float32)
    got = np.unique(np.asarray(qw(dense, 2.5, bits), np.float64))
    assert len(got) == 2**bits - 1  # 2^k - 1 <= 2^k; every level reached
    np.testing.assert_allclose(got, 2.5 * levels, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------
# Gradients (the paper's RCF) against float64 closed forms


def _project(c, levels):
    """Nearest level by brute force (float64 argmin of distances)."""
    return levels[np.argmin(np.abs(c[..., None] - levels), axis=-1)]


def _away_from_midpoints(v, levels, tol=1e-4):
    mids = 0.5 * (levels[:-1] + levels[1:])
    return np.min(np.abs(np.abs(v)[..., None] - mids), axis=-1) > tol


@pytest.mark.parametrize("bits", BITS)
def test_activation_gradients_closed_form(bits):
    rng = np.random.default_rng(20 + bits)
    alpha = 1.3
    levels = apot_levels(bits, False)
    x = rng.uniform(-0.5, 2.0, 400)
    x = x[_away_from_midpoints(x / alpha, levels)]
    c = rng.normal(size=x.shape)
    v = x / alpha
    inside = (v >= 0) & (v <= 1)
    q = _project(np.clip(v, 0.0, 1.0), levels)
    d_alpha = np.sum(c * np.where(inside, q - v, np.where(v > 1, 1.0, 0.0)))
    d_x = c * inside
    gx, ga = jax.grad(lambda x_, a: jnp.sum(qa(x_, a, bits) * jnp.asarray(c, jnp.float32)), argnums=(0, 1))(
        jnp.asarray(x, jnp.float32), jnp.float32(alpha)
    )
    np.testing.assert_array_equal(gx, d_x.astype(np.float32))
    np.testing.assert_allclose(float(ga), d_alpha, rtol=1e-5, atol=1e-5)
    assert np.any(v > 1) and np.any(v < 0) and np.any(inside)  # all three branches exercised


@pytest.mark.parametrize("bits", BITS)
def test_weight_gradients_closed_form(bits):
    rng = np.random.default_rng(30 + bits)
    alpha = 1.7
    mags = apot_levels(bits - 1, False)
    w = rng.normal(0.2, 0.3, (3, 3, 4, 6))
    mean, std = w.mean(), w.std(ddof=1)
    v = (w - mean) / std / alpha
    keep = _away_from_midpoints(v, mags)
    c = rng.normal(size=w.shape) * keep  # elements near a rounding boundary carry no weight in the check
    inside = np.abs(v) <= 1
    q = np.sign(v) * _project(np.minimum(np.abs(v), 1.0), mags)
    d_alpha = np.sum(c * np.where(inside, q - v, np.sign(v)))
    d_w = c * inside / std  # mean and std are constants
    gw, ga = jax.grad(lambda w_, a: jnp.sum(qw(w_, a, bits) * jnp.asarray(c, jnp.float32)), argnums=(0, 1))(
        jnp.asarray(w, jnp.float32), jnp.float32(alpha)
    )
    np.testing.assert_allclose(gw, d_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(ga), d_alpha, rtol=1e-5, atol=1e-5)
    assert np.any(~inside) and np.any(inside)


def test_alpha_gradient_matches_finite_differences_of_the_straight_through_surrogate():
    # The RCF gradient is the exact derivative of alpha * (q0 - c0 + clip(x / alpha)), with q0 - c0 frozen at
    # alpha0 (straight-through projection); central differences of that in float64.
    rng = np.random.default_rng(7)
    bits, alpha0 = 4, 1.1
    levels = apot_levels(bits, False)
    x = rng.uniform(-0.3, 1.6, 300)
    x = x[_away_from_midpoints(x / alpha0, levels)]
    c = rng.normal(size=x.shape)
    c0 = np.clip(x / alpha0, 0, 1)
    frozen = _project(c0, levels) - c0
    f = lambda a: np.sum(c * a * (frozen + np.clip(x / a, 0, 1)))  # noqa: E731
    h = 1e-7
    fd = (f(alpha0 + h) - f(alpha0 - h)) / (2 * h)
    ga = jax.grad(lambda a: jnp.sum(qa(jnp.asarray(x, jnp.float32), a, bits) * jnp.asarray(c, jnp.float32)))(
        jnp.float32(alpha0)
    )
    np.testing.assert_allclose(float(ga), fd, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Init rule


def test_init_rule_is_the_configured_constant():
    rng = np.random.default_rng(2)
    for w in (jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32), jnp.full((5, 7), 40.0)):
        for method, wa, aa in ((M, 3.0, 8.0), (APoT(weight_alpha_init=2.0, activation_alpha_init=6.0), 2.0, 6.0)):
            p = method.init_weight(w, 4)
            assert set(p) == {"alpha"} and p["alpha"].shape == () and p["alpha"].dtype == jnp.float32
            assert float(p["alpha"]) == wa
            p = method.init_activation(w, 4)
            assert set(p) == {"alpha"} and p["alpha"].shape == () and p["alpha"].dtype == jnp.float32
            assert float(p["alpha"]) == aa


@pytest.mark.parametrize("field", ["weight_alpha_init", "activation_alpha_init"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan"), "3", True])
def test_bad_alpha_init_raises(field, value):
    with pytest.raises(ValueError, match=field):
        APoT(**{field: value})


# --------------------------------------------------------------------------------------------------------------
# dtype, jit, validation


def test_bfloat16_equals_float32_then_cast():
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.normal(0.0, 0.3, (3, 3, 4, 8)), jnp.bfloat16)
    x = jnp.asarray(rng.uniform(-0.5, 4.0, (2, 5, 5, 4)), jnp.bfloat16)
    for bits in BITS:
        out = qw(w, 2.5, bits)
        assert out.dtype == jnp.bfloat16 and out.shape == w.shape
        np.testing.assert_array_equal(out, qw(w.astype(jnp.float32), 2.5, bits).astype(jnp.bfloat16))
        out = qa(x, 3.0, bits)
        assert out.dtype == jnp.bfloat16 and out.shape == x.shape
        np.testing.assert_array_equal(out, qa(x.astype(jnp.float32), 3.0, bits).astype(jnp.bfloat16))


def test_jit_equals_no_jit():
    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.normal(0.0, 0.3, (3, 3, 4, 8)), jnp.float32)
    x = jnp.asarray(rng.uniform(-0.5, 4.0, (2, 5, 5, 4)), jnp.float32)
    pw, pa = {"alpha": jnp.float32(2.5)}, {"alpha": jnp.float32(3.0)}
    jw = jax.jit(M.quantize_weight, static_argnames="bits")
    ja = jax.jit(M.quantize_activation, static_argnames="bits")
    for bits in BITS:
        np.testing.assert_array_equal(jw(pw, w, bits=bits), M.quantize_weight(pw, w, bits))
        np.testing.assert_array_equal(ja(pa, x, bits=bits), M.quantize_activation(pa, x, bits))
        g = jax.grad(lambda p, v: jnp.sum(M.quantize_activation(p, v, bits) ** 2), argnums=(0, 1))
        for a, b in zip(jax.tree.leaves(jax.jit(g)(pa, x)), jax.tree.leaves(g(pa, x))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 7, 8, 0, 9, 32, 2.0, True, None])
def test_bad_bits_raise(bits):
    w = jnp.ones((4,))
    p = {"alpha": jnp.float32(1.0)}
    for call in (
        lambda: M.quantize_weight(p, w, bits),
        lambda: M.quantize_activation(p, w, bits),
        lambda: M.init_weight(w, bits),
        lambda: M.init_activation(w, bits),
        lambda: M.check_bits(bits),
    ):
        with pytest.raises(ValueError, match="bits"):
            call()


@pytest.mark.parametrize(
    "params", [{}, {"alpha": jnp.float32(1.0), "step": jnp.float32(1.0)}, {"alpha": jnp.ones(3)}]
)
def test_bad_params_raise(params):
    with pytest.raises(ValueError, match="alpha"):
        M.quantize_activation(params, jnp.ones((2, 3)), 3)
