"""alignq_activation against the float64 grid on dense inputs, strictly: every bit-width, every grid (exact,
paper, and the unsigned grid of exact mode + ReLU).

Up to 64 rounding thresholds the forward counts float64 thresholds on x (no erf): it must then match the float64
computation everywhere except within 2 float32 spacings of a threshold (where the threshold itself is rounded to
float32). Above that it evaluates the float32 CDF: it must match except next to an interior rounding tie."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtr, ndtri

from alignq_jax import quantizers as q

X = np.linspace(-6.0, 6.0, 120_001).astype(np.float32)
GRIDS = [("exact", False), ("exact", True), ("paper", False), ("paper", True)]


def _reference(x, bits, levels, relu, a):
    """(values, thresholds on x, interior half-integer ties of the pre-rounding value v) in float64."""
    n = 2**bits - 1
    x = np.asarray(x, np.float64)
    phi = ndtr(x)
    if levels == "exact" and relu:  # unsigned grid on the CDF's upper half
        v = n * np.where(x > 0, 2 * phi - 1, 0.0)
        halves = np.arange(n) + 0.5
        return a * np.round(v) / n, ndtri(0.5 + halves / (2 * n)), v, halves
    if levels == "exact":
        v = n * phi
        halves = np.arange(n) + 0.5
        return a * (2 * np.round(v) / n - 1), ndtri(halves / n), v, halves
    if bits == 1:
        out = np.sign(x)
        return (np.maximum(out, 0) if relu else out), np.array([0.0]), None, None
    v = n * a * (2 * phi - 1)
    m = np.arange(-np.ceil(n * a) - 1, np.ceil(n * a) + 1)
    halves = (m + 0.5)[np.abs(m + 0.5) < n * a]
    out = np.round(v) / n
    return (np.maximum(out, 0) if relu else out), ndtri(0.5 + halves / (2 * n * a)), v, halves


def _distance_to_nearest(values, sorted_points):
    i = np.clip(np.searchsorted(sorted_points, values), 1, len(sorted_points) - 1) if len(sorted_points) > 1 else None
    if i is None:
        return np.abs(values - sorted_points[0])
    return np.minimum(np.abs(values - sorted_points[i - 1]), np.abs(values - sorted_points[i]))


@pytest.mark.parametrize("levels,relu", GRIDS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("a", [2.0, 1.5])
def test_forward_matches_float64_grid(levels, relu, bits, a):
    f = lambda t: q.alignq_activation(t, bits, act_range=a, levels=levels, relu=relu)  # noqa: E731
    got = np.asarray(f(jnp.asarray(X)), np.float64)
    ref, thresholds, v, halves = _reference(X, bits, levels, relu, a)
    if levels == "paper" and bits == 1:
        # sign(A*(2*Phi(x) - 1)) = sign(x), from the float32 CDF: 0 where Phi(x) rounds to 1/2 (|x| < ~1e-7)
        skip = np.abs(X) < 1e-6
    elif len(thresholds) <= 64:
        assert "erf" not in str(jax.make_jaxpr(f)(jnp.asarray(X)))  # the fused threshold-count forward
        skip = _distance_to_nearest(X.astype(np.float64), np.sort(thresholds)) <= 2 * np.spacing(np.abs(X))
        assert skip.mean() < 1e-3
    else:
        skip = _distance_to_nearest(v, halves) < 1e-3
        assert skip.mean() < 0.02
    bad = (np.abs(got - ref) > 1e-6) & ~skip
    assert not bad.any(), f"{bad.sum()} differ, e.g. x={X[bad][:4]}: got {got[bad][:4]}, float64 {ref[bad][:4]}"
