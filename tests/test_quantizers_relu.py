"""Activation quantizers followed by a ReLU (relu=True).

exact mode: the unsigned grid on the CDF's upper half, A*round(n*u)/n with u = 2*Phi(x) - 1 for x > 0 and 0 for
x <= 0, i.e. all 2^k levels A*j/n (j = 0..n) are non-negative; the uniform baseline uses A*round(n*clip(x,0,A)/A)/n.
paper mode: the official grid, then ReLU. Expected values are independent float64 numpy/scipy computations.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtr, ndtri

from alignq_jax import quantizers as q

ALL_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
X_DENSE = np.linspace(-6.0, 6.0, 120_001).astype(np.float32)  # includes 0 exactly
X2 = np.array([-1.5, -0.2, 0.0, 0.3, 2.5], np.float32)  # docs/method.md §2, worked example 2


def _pdf(x):
    return np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)


def _np_unsigned(x, bits, a):
    """(pre-rounding value v = n*u, quantized A*round(v)/n), float64."""
    n = 2**bits - 1
    x = np.asarray(x, np.float64)
    u = np.where(x > 0, 2.0 * ndtr(x) - 1.0, 0.0)
    return n * u, a * np.round(n * u) / n


def _np_unsigned_thresholds(bits):
    """x where n*(2*Phi(x) - 1) crosses j + 1/2, j = 0..n-1."""
    n = 2**bits - 1
    return ndtri(0.5 + (np.arange(n) + 0.5) / (2.0 * n))


def _uses_erf(f, x):
    return "erf" in str(jax.make_jaxpr(f)(x))


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("a", [2.0, 1.5, 0.75])
def test_alignq_exact_relu_grid_vs_numpy(bits, a):
    f = functools.partial(q.alignq_activation, bits=bits, act_range=a, levels="exact", relu=True)
    got = np.asarray(f(jnp.asarray(X_DENSE)), np.float64)
    v, ref = _np_unsigned(X_DENSE, bits, a)
    if bits <= 6:
        # The fused forward counts float64 thresholds on x (no erf): it must agree with the float64 grid on every
        # input except within 2 float32 spacings of a threshold (where the threshold itself was rounded).
        assert not _uses_erf(f, jnp.asarray(X_DENSE))
        t = _np_unsigned_thresholds(bits)
        dist = np.min(np.abs(X_DENSE[:, None].astype(np.float64) - t[None, :]), axis=1)
        skip = dist <= 2 * np.spacing(np.abs(X_DENSE))
        assert skip.mean() < 1e-3
    else:
        # 127 or 255 thresholds: the float32 erf formula, exact up to its rounding error next to a tie.
        skip = np.abs(v - np.floor(v) - 0.5) < 1e-3
        assert skip.mean() < 0.01
    np.testing.assert_allclose(got[~skip], ref[~skip], rtol=0, atol=1e-6)
    # every level A*j/n reached, nothing else, and nothing negative
    n = 2**bits - 1
    np.testing.assert_allclose(np.unique(got), a * np.arange(n + 1) / n, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_exact_relu_level_count_is_two_to_the_bits(bits):
    """2^k distinct non-negative values (the signed grid followed by a ReLU kept only 2^(k-1) + 1)."""
    x = jnp.asarray(X_DENSE)
    for fn in (q.alignq_activation, q.uniform_activation):
        got = np.asarray(fn(x, bits, levels="exact", relu=True))
        assert len(np.unique(got)) == 2**bits, fn.__name__
        assert got.min() == 0.0 and got.max() == pytest.approx(2.0)
        signed_then_relu = np.asarray(jax.nn.relu(fn(x, bits, levels="exact")))
        assert len(np.unique(signed_then_relu)) == 2 ** (bits - 1) + 1, fn.__name__


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("a", [2.0, 1.5])
def test_paper_relu_is_relu_of_official_grid(bits, a):
    x = jnp.asarray(X_DENSE)
    for fn in (q.alignq_activation, q.uniform_activation):
        fused = np.asarray(fn(x, bits, act_range=a, levels="paper", relu=True))
        plain = np.asarray(fn(x, bits, act_range=a, levels="paper"))
        np.testing.assert_array_equal(fused, np.maximum(plain, 0.0))
    # the official grid's level count after ReLU: 2n+1 for A = 2 (codes 0..2n), {0, 1} at one bit
    n = 2**bits - 1
    got = np.asarray(q.alignq_activation(x, bits, act_range=2.0, levels="paper", relu=True))
    expected = np.array([0.0, 1.0]) if bits == 1 else np.arange(2 * n + 1) / n
    np.testing.assert_allclose(np.unique(got), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits,expected", [(2, [0, 0, 0, 2 / 3, 2.0]), (4, [0, 0, 0, 8 / 15, 2.0])])
def test_exact_relu_worked_example(bits, expected):
    """Worked example 2's inputs on the unsigned grid, A = 2: x = 0.3 -> u = 0.235823, n*u = 0.71 (k=2) or 3.54
    (k=4); x = 2.5 -> u = 0.987581, the top code. Non-positive x -> 0."""
    got = np.asarray(q.alignq_activation(jnp.asarray(X2), bits, levels="exact", relu=True))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(got, _np_unsigned(X2, bits, 2.0)[1], atol=1e-6)


@pytest.mark.parametrize("bits,expected", [(2, [0, 0, 0, 1 / 3, 2.0]), (4, [0, 0, 0, 7 / 15, 2.0])])
def test_paper_relu_worked_example(bits, expected):
    """Worked example 2 (paper grid, then ReLU) of docs/method.md §2."""
    got = np.asarray(q.alignq_activation(jnp.asarray(X2), bits, levels="paper", relu=True))
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 3, 6, 8])
@pytest.mark.parametrize("a", [2.0, 0.75])
def test_alignq_exact_relu_gradient(bits, a):
    """STE through the rounding, exact derivative of A*(2*Phi(x) - 1) on x > 0, zero for x <= 0."""
    rng = np.random.default_rng(bits)
    x = np.concatenate([1.5 * rng.standard_normal(500), [0.0, -0.0]]).astype(np.float32)
    g = rng.standard_normal(x.size).astype(np.float32)
    xd = x.astype(np.float64)
    expected = np.where(xd > 0, 2 * a * _pdf(xd), 0.0) * g
    f = functools.partial(q.alignq_activation, bits=bits, act_range=a, levels="exact", relu=True)
    got = np.asarray(jax.grad(lambda t: jnp.sum(f(t) * g))(jnp.asarray(x)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # the folded-affine form: same values; its h-gradient is the x-gradient times the channel scale
    h = x.reshape(-1, 2)
    scale, shift = np.float32([1.5, 0.5]), np.float32([0.0, 0.0])
    fa = functools.partial(q.alignq_activation_affine, bits=bits, act_range=a, levels="exact", relu=True)
    xa = (h * scale + shift).astype(np.float64)
    expected_q = _np_unsigned(xa, bits, a)[1].reshape(h.shape)
    np.testing.assert_allclose(np.asarray(fa(jnp.asarray(h), scale, shift)), expected_q, atol=1e-6)
    gh = np.asarray(jax.grad(lambda t: jnp.sum(fa(t, scale, shift) * g.reshape(h.shape)))(jnp.asarray(h)))
    np.testing.assert_allclose(gh, np.where(xa > 0, 2 * a * _pdf(xa), 0.0) * g.reshape(h.shape) * scale,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("a", [2.0, 1.25])
def test_uniform_exact_relu_grid_vs_numpy(bits, a):
    n = 2**bits - 1
    x = X_DENSE
    got = np.asarray(q.uniform_activation(jnp.asarray(x), bits, act_range=a, levels="exact", relu=True), np.float64)
    v = n * np.clip(x.astype(np.float64), 0.0, a) / a
    skip = np.abs(v - np.floor(v) - 0.5) < 1e-4
    assert skip.mean() < 0.01
    np.testing.assert_allclose(got[~skip], (a * np.round(v) / n)[~skip], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.unique(got), a * np.arange(n + 1) / n, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_uniform_exact_relu_gradient(bits):
    x = jnp.asarray([-3.0, -1.0, -0.1, 0.05, 0.7, 1.9, 2.1, 5.0], jnp.float32)
    g = jax.grad(lambda t: jnp.sum(q.uniform_activation(t, bits, act_range=2.0, levels="exact", relu=True)))(x)
    np.testing.assert_array_equal(np.asarray(g), [0, 0, 0, 1, 1, 1, 0, 0])


@pytest.mark.parametrize("levels", ["exact", "paper"])
def test_relu_nan_propagates(levels):
    x = jnp.asarray([0.3, np.nan, -1.0, 2.0, np.inf, -np.inf], jnp.float32)
    for fn in (q.alignq_activation, q.uniform_activation):
        for bits in (1, 2, 4, 8):
            got = np.asarray(fn(x, bits, levels=levels, relu=True))
            assert np.isnan(got[1]), (fn.__name__, bits, got)
            others = got[[0, 2, 3, 4, 5]]
            assert np.all(np.isfinite(others)) and np.all(others >= 0), (fn.__name__, bits, got)
