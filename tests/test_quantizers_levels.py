"""weight_levels / activation_levels against brute force: the distinct outputs of the quantizers on dense inputs
(with the special points that reach the rare values: 0, +-inf, a weight exactly at its tensor's mean)."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtri

from alignq_jax import quantizers as q

ALL_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
LEVELS = ("exact", "paper")
X = jnp.asarray(np.concatenate([np.linspace(-8.0, 8.0, 400_001), [0.0, np.inf, -np.inf]]), jnp.float32)


def _weight_tensors(method):
    """Tensors whose outputs together reach every level: a spread over about +-4 standard deviations (alignq) or
    over [-1.5, 1.5] (uniform, raw values), one with an element exactly at its mean / at 0, and a constant one."""
    if method == "alignq":
        spread = ndtri((np.arange(20_000) + 0.5) / 20_000) * 0.05
    else:
        spread = np.linspace(-1.5, 1.5, 20_001)  # includes 0
    return [jnp.asarray(t, jnp.float32) for t in (spread, [-1.0, 0.0, 1.0], np.full(8, 0.3))]


def _distinct(arrays):
    return np.unique(np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays]))


@pytest.mark.parametrize("method", ["alignq", "uniform"])
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_weight_levels_brute_force(method, levels, bits):
    fn = q.get_quantizers(method).weight
    outs = []
    for w in _weight_tensors(method):
        out = np.asarray(fn(w, bits, levels=levels), np.float64)
        if method == "uniform" and bits == 1:
            scale = np.abs(np.asarray(w, np.float32)).mean(dtype=np.float64)
            out = np.round(out / scale, 5)  # listed in units of mean|w| (float32 scale: round off its error)
        outs.append(out)
    got = _distinct(outs)
    if method == "uniform" and levels == "paper" and bits > 1:
        with pytest.raises(ValueError, match="not clipped"):
            q.weight_levels(method, bits, levels)
        return
    expected = q.weight_levels(method, bits, levels)
    assert expected.dtype == np.float64 and np.all(np.diff(expected) > 0)
    assert len(got) == len(expected), (got, expected)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["alignq", "uniform"])
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("a", [2.0, 1.5, 0.75, 0.5])
def test_activation_levels_brute_force(method, levels, relu, bits, a):
    got = _distinct([q.get_quantizers(method).activation(X, bits, act_range=a, levels=levels, relu=relu)])
    # Nothing beyond the range, even at +-inf: A (exact); the paper grid rounds n*A itself, so up to A + 1/(2n),
    # and its 1-bit sign is +-1 for any A.
    n = 2**bits - 1
    bound = a if levels == "exact" else (1.0 if bits == 1 else a + 0.5 / n)
    assert np.abs(got).max() <= bound + 1e-6
    expected = q.activation_levels(method, bits, levels, act_range=a, relu=relu)
    assert expected.dtype == np.float64 and np.all(np.diff(expected) > 0)
    assert len(got) == len(expected), (got, expected)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_level_counts(bits):
    """The counts results report: k bits -> 2^k values in exact mode (with or without ReLU); the paper grid's
    2^(k+1) - 1 weights and 4n+1 activations (2n+1 after ReLU) for A = 2."""
    n = 2**bits - 1
    for method in ("alignq", "uniform"):
        for relu in (False, True):
            assert len(q.activation_levels(method, bits, "exact", relu=relu)) == 2**bits
        if bits > 1:
            assert len(q.activation_levels(method, bits, "paper")) == 4 * n + 1
            assert len(q.activation_levels(method, bits, "paper", relu=True)) == 2 * n + 1
    assert len(q.weight_levels("alignq", bits, "exact")) == 2**bits
    if bits > 1:
        assert len(q.weight_levels("alignq", bits, "paper")) == 2 ** (bits + 1) - 1


def test_level_helpers_validate():
    with pytest.raises(ValueError, match="method"):
        q.weight_levels("lsq", 4, "exact")
    with pytest.raises(ValueError, match="bits"):
        q.activation_levels("alignq", 9, "exact")
    with pytest.raises(ValueError, match="full precision"):
        q.activation_levels("alignq", 32, "exact")
    with pytest.raises(ValueError, match="levels"):
        q.weight_levels("alignq", 4, "paper2022")
    with pytest.raises(ValueError, match="act_range"):
        q.activation_levels("uniform", 4, "exact", act_range=0.0)
