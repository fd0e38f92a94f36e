"""Weight tensors with no spread (constant, e.g. kernel_init=zeros).

Definition: a constant tensor standardises to z = 0, so Phi(z) = 1/2 and the quantized value is the grid value at
the middle, 2*round(n/2)/n - 1 (exact; round half to even) or round(0)/n = 0 (paper; sign(0) = 0 at 1 bit); the
unrounded alignment is 0; the gradient is zero. Any other tensor is standardised exactly as before.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax import quantizers as q

ALL_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
LEVELS = ("exact", "paper")
# 0.1 and -3.7: jnp.mean of these float32 tensors is off by rounding, so their computed std is not 0 either.
CONSTANTS = [(0.0, (3, 3, 4, 8)), (0.1, (3, 3, 16, 16)), (-3.7, (5, 7)), (2.5, (2,))]


def _middle_value(bits, levels):
    """The quantized value of z = 0 from the formulas, float64: Phi(0) = 1/2."""
    n = 2**bits - 1
    if levels == "exact":
        return 2.0 * np.round(n * 0.5) / n - 1.0  # np.round: half to even, as the quantizer
    return np.sign(0.0) if bits == 1 else np.round(n * 0.0) / n


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("const,shape", CONSTANTS)
def test_constant_weight_value(const, shape, levels, bits):
    w = jnp.full(shape, const, jnp.float32)
    got = np.asarray(q.alignq_weight(w, bits, levels=levels))
    assert got.shape == shape
    np.testing.assert_allclose(got, _middle_value(bits, levels), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(q.cdf_align_weight(w)), 0.0)


def test_constant_weight_middle_values_spelled_out():
    """Exact grid: 1/n (the upper of the two middle levels; the grid has no 0), -1 at 1 bit. Paper grid: 0."""
    w = jnp.zeros((4, 4), jnp.float32)
    for bits in (2, 4, 8):
        n = 2**bits - 1
        np.testing.assert_allclose(np.asarray(q.alignq_weight(w, bits)), 1.0 / n, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(q.alignq_weight(w, bits, levels="paper")), 0.0)
    np.testing.assert_array_equal(np.asarray(q.alignq_weight(w, 1)), -1.0)
    np.testing.assert_array_equal(np.asarray(q.alignq_weight(w, 1, levels="paper")), 0.0)


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("kwargs", [{}, {"stop_stats_grad": True}, {"surrogate": (1.0, 4.0)}])
def test_constant_weight_gradient_is_zero(levels, kwargs):
    rng = np.random.default_rng(1)
    for bits in (1, 2, 8):
        for const, shape in CONSTANTS[:2]:
            w = jnp.full(shape, const, jnp.float32)
            up = jnp.asarray(rng.standard_normal(shape), jnp.float32)
            f = functools.partial(q.alignq_weight, bits=bits, levels=levels, **kwargs)
            np.testing.assert_array_equal(np.asarray(jax.grad(lambda t: jnp.sum(f(t) * up))(w)), 0.0)
    stop = kwargs.get("stop_stats_grad", False)
    g_align = jax.jit(jax.grad(lambda t: jnp.sum(q.cdf_align_weight(t, stop_stats_grad=stop) * up)))(w)
    np.testing.assert_array_equal(np.asarray(g_align), 0.0)


def test_constant_weight_bf16_and_uniform_finite():
    w = jnp.zeros((3, 3, 2, 4), jnp.bfloat16)
    got = q.alignq_weight(w, 4)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.float32(jnp.bfloat16(2 * 8 / 15 - 1)))
    for levels in LEVELS:
        for bits in (1, 2, 4):
            f = functools.partial(q.uniform_weight, bits=bits, levels=levels)
            wz = jnp.zeros((8,), jnp.float32)
            assert np.all(np.isfinite(np.asarray(f(wz))))
            assert np.all(np.isfinite(np.asarray(jax.grad(lambda t: jnp.sum(f(t)))(wz))))


def _old_formula(w, bits, levels, stop_stats_grad=False):
    """The quantizer as specified (docs/method.md §1), written out with the plain mean/std, for tensors that
    have a spread: z = (w - m)/s, Phi(z) = (1 + erf(z/sqrt 2))/2, STE rounding."""
    m, s = jnp.mean(w), jnp.std(w, ddof=1)
    if stop_stats_grad:
        m, s = jax.lax.stop_gradient(m), jax.lax.stop_gradient(s)
    u = 0.5 * (1.0 + jax.lax.erf((w - m) / s * (1.0 / np.sqrt(2.0))))
    n = 2.0**bits - 1.0
    ste = lambda v: v + jax.lax.stop_gradient(jnp.round(v) - v)  # noqa: E731
    if levels == "exact":
        return 2.0 * ste(n * u) / n - 1.0
    c = 2.0 * u - 1.0
    if bits == 1:
        return c + jax.lax.stop_gradient(jnp.sign(c) - c)
    return ste(n * c) / n


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_tensors_with_spread_unchanged(levels, bits):
    """Tensors with a spread, down to one tiny outlier, are standardised as before (values bit for bit; gradients
    up to the STE form's rounding)."""
    rng = np.random.default_rng(40 + bits)
    nearly = np.zeros(64, np.float32)
    nearly[5] = 1e-12
    tensors = [0.05 * rng.standard_normal((3, 3, 4, 8)), nearly, np.array([0.0, 0.0, 0.0, 1e-3])]
    for w in tensors:
        w = jnp.asarray(w, jnp.float32)
        up = jnp.asarray(rng.standard_normal(w.shape), jnp.float32)
        for stop in (False, True):
            got = q.alignq_weight(w, bits, levels=levels, stop_stats_grad=stop)
            ref = _old_formula(w, bits, levels, stop)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
            g = jax.grad(lambda t: jnp.sum(q.alignq_weight(t, bits, levels=levels, stop_stats_grad=stop) * up))(w)
            gr = jax.grad(lambda t: jnp.sum(_old_formula(t, bits, levels, stop) * up))(w)
            np.testing.assert_allclose(np.asarray(g), np.asarray(gr), rtol=1e-5, atol=1e-5 * np.abs(gr).max())
    # the tiny outlier is not treated as constant: it sits (N-1)/sqrt(N) standard deviations above the rest
    out = np.asarray(q.cdf_align_weight(jnp.asarray(nearly)))
    assert out[5] > 0.99 and np.all(out[np.arange(64) != 5] < 0)
