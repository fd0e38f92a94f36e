"""Reference tests for alignq_jax.quantizers (docs/method.md §1-3, §9 and §13).

Expected values come from three places only:
  * the verified worked examples 1 and 2 of docs/method.md §1 and §2,
  * independent float64 numpy/scipy computations written here from the formulas,
  * invariants (level counts, idempotence, affine invariance, gradient identities).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtr, ndtri

from alignq_jax.quantizers import (
    alignq_activation,
    alignq_weight,
    cdf_align_activation,
    cdf_align_weight,
    uniform_activation,
    uniform_weight,
)

LEVELS = ("exact", "paper")
ALL_BITS = (1, 2, 3, 4, 5, 6, 7, 8)

# Worked example 1 (docs/method.md §1).
W1 = np.array([-0.30, -0.05, 0.10, 0.40], np.float32)
# Worked example 2 (docs/method.md §2), A = 2.
X2 = np.array([-1.5, -0.2, 0.0, 0.3, 2.5], np.float32)


# ----------------------------------------------------------------------------------------------
# independent numpy helpers (float64)
# ----------------------------------------------------------------------------------------------
def _pdf(z):
    return np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi)


def _stats(w):
    w = np.asarray(w, np.float64)
    m = w.mean()
    s = w.std(ddof=1)
    return m, s, (w - m) / s


def _sigmoid_prime(t):
    sg = 1.0 / (1.0 + np.exp(-t))
    return sg * (1.0 - sg)


def _np_weight_grad_full(w, g):
    """dL/dW with m, s differentiated (docs/method.md §1), upstream g = dL/dQ."""
    w = np.asarray(w, np.float64).ravel()
    g = np.asarray(g, np.float64).ravel()
    n_el = w.size
    _, s, z = _stats(w)
    ph = _pdf(z)
    return (2.0 / s) * (ph * g - np.sum(ph * g) / n_el - z / (n_el - 1) * np.sum(ph * z * g))


def _assert_quantized(got, v, to_value, *, tol=1e-5, amb=1e-3, max_amb_frac=0.05):
    """got must equal to_value(round_half_even(v)), except that entries whose float64 pre-rounding
    value v lies within `amb` of a rounding threshold may take either neighbouring level (float32 vs
    float64 may legitimately round those differently)."""
    got = np.asarray(got, np.float64).ravel()
    v = np.asarray(v, np.float64).ravel()
    expected = to_value(np.round(v))
    ok = np.abs(got - expected) <= tol
    near = np.abs(np.abs(v - np.floor(v)) - 0.5) < amb
    alt = (np.abs(got - to_value(np.floor(v))) <= tol) | (np.abs(got - to_value(np.ceil(v))) <= tol)
    bad = ~(ok | (near & alt))
    assert not bad.any(), (
        f"{bad.sum()} mismatches; first idx {np.flatnonzero(bad)[:5]}: got {got[bad][:5]}, "
        f"expected {expected[bad][:5]}"
    )
    assert near.mean() <= max_amb_frac  # the data must mostly avoid thresholds, or the test is vacuous


def _np_alignq_weight_v(w, bits, levels):
    """Pre-rounding value and code->value map of the AlignQ weight quantizer."""
    n = 2**bits - 1
    _, _, z = _stats(w)
    phi_cdf = ndtr(z)
    if levels == "exact":
        return n * phi_cdf, lambda j: 2.0 * j / n - 1.0
    return n * (2.0 * phi_cdf - 1.0), lambda j: j / n


def _np_alignq_act_v(x, bits, levels, a):
    n = 2**bits - 1
    phi_cdf = ndtr(np.asarray(x, np.float64))
    if levels == "exact":
        return n * phi_cdf, lambda j: a * (2.0 * j / n - 1.0)
    return n * a * (2.0 * phi_cdf - 1.0), lambda j: j / n


def _grad(f, x, g=None):
    x = jnp.asarray(x, jnp.float32)
    if g is None:
        g = jnp.ones_like(x)
    return np.asarray(jax.grad(lambda t: jnp.sum(f(t) * g))(x))


def _weight_data(n=20000, scale=0.013, shift=-2.5):
    """Weights whose standardised values span about [-4, 4] (normal quantiles), so that every
    CDF level up to 8 bits is reached; the affine scale/shift must not matter."""
    q = ndtri((np.arange(n) + 0.5) / n)
    return (shift + scale * q).astype(np.float32)


def _act_data(n=20000, lo=-6.0, hi=6.0):
    return np.linspace(lo, hi, n).astype(np.float32)  # even n: 0 is not hit exactly


# ----------------------------------------------------------------------------------------------
# worked example 1: weights
# ----------------------------------------------------------------------------------------------
def test_weight_example1_paper_levels():
    got = np.asarray(alignq_weight(jnp.asarray(W1), 4, levels="paper"))
    np.testing.assert_allclose(got, np.array([-11, -4, 3, 12]) / 15.0, atol=1e-5)
    np.testing.assert_allclose(got, [-0.733333, -0.266667, 0.2, 0.8], atol=1e-5)


def test_weight_example1_exact_levels():
    got = np.asarray(alignq_weight(jnp.asarray(W1), 4, levels="exact"))
    np.testing.assert_allclose(got, [-0.733333, -0.2, 0.2, 0.733333], atol=1e-5)


def test_weight_default_levels_is_exact():
    np.testing.assert_allclose(
        np.asarray(alignq_weight(jnp.asarray(W1), 4)), [-0.733333, -0.2, 0.2, 0.733333], atol=1e-5
    )
    x = jnp.asarray(X2)
    np.testing.assert_allclose(
        np.asarray(alignq_activation(x, 4)), [-1.733333, -0.4, 0.133333, 0.4, 2.0], atol=1e-5
    )


def test_cdf_align_weight_example1():
    got = np.asarray(cdf_align_weight(jnp.asarray(W1)))
    np.testing.assert_allclose(got, [-0.751247, -0.235079, 0.169133, 0.784587], atol=1e-5)


@pytest.mark.parametrize("levels", LEVELS)
def test_weight_example1_grad_full_stats(levels):
    """STE + exact derivative through m and s; same in both level modes (docs/method.md §1)."""
    grad = _grad(functools.partial(alignq_weight, bits=4, levels=levels), W1)
    np.testing.assert_allclose(grad, [-0.682815, 0.596475, 0.698524, -0.612184], atol=1e-5)
    assert abs(grad.sum()) < 1e-5


@pytest.mark.parametrize("levels", LEVELS)
def test_weight_example1_grad_stop_stats(levels):
    grad = _grad(functools.partial(alignq_weight, bits=4, levels=levels, stop_stats_grad=True), W1)
    np.testing.assert_allclose(grad, [1.402073, 2.607494, 2.665222, 1.265873], atol=1e-5)


def test_weight_example1_surrogate_paper():
    """Reference section 1: lam*sigma'(t) * pdf with lam=1, lam2=4."""
    f = functools.partial(alignq_weight, bits=4, levels="paper", stop_stats_grad=True, surrogate=(1.0, 4.0))
    grad = _grad(f, W1)
    np.testing.assert_allclose(grad, [0.164573, 0.001078, 0.651928, 0.118246], atol=1e-5)
    # the surrogate only changes the backward pass
    np.testing.assert_allclose(np.asarray(f(jnp.asarray(W1))), np.array([-11, -4, 3, 12]) / 15.0, atol=1e-5)


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("lam,lam2", [(1.0, 4.0), (2.5, 1.5)])
def test_weight_surrogate_vs_numpy(levels, lam, lam2):
    n = 15
    _, s, z = _stats(W1)
    phi_cdf = ndtr(z)
    v = n * phi_cdf if levels == "exact" else n * (2.0 * phi_cdf - 1.0)
    t = 2.0 * lam2 * np.mod(v + 0.5, 1.0)
    approx = lam * _sigmoid_prime(t)
    # stats stopped: grad = 2 phi(z)/s * approx * g
    g = np.array([0.3, -1.2, 0.7, 2.0])
    f = functools.partial(alignq_weight, bits=4, levels=levels, stop_stats_grad=True, surrogate=(lam, lam2))
    np.testing.assert_allclose(_grad(f, W1, jnp.asarray(g, jnp.float32)), 2 * _pdf(z) / s * approx * g, atol=1e-5)
    # stats not stopped: chain rule through Phi(z(m, s)) with upstream g * approx
    f = functools.partial(alignq_weight, bits=4, levels=levels, surrogate=(lam, lam2))
    np.testing.assert_allclose(
        _grad(f, W1, jnp.asarray(g, jnp.float32)), _np_weight_grad_full(W1, g * approx), atol=1e-5
    )


# ----------------------------------------------------------------------------------------------
# weights: numpy comparisons and invariants
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_weight_forward_vs_numpy_per_tensor(levels, bits):
    """Per-tensor statistics on a conv kernel (H, W, Cin, Cout); shape and dtype preserved."""
    rng = np.random.default_rng(bits)
    w = (0.05 * rng.standard_normal((3, 3, 4, 8)) + 0.01 * rng.standard_normal((1, 1, 1, 8))).astype(np.float32)
    got = alignq_weight(jnp.asarray(w), bits, levels=levels)
    assert got.shape == w.shape and got.dtype == jnp.float32
    v, to_value = _np_alignq_weight_v(w, bits, levels)
    _assert_quantized(np.asarray(got), v, to_value)


def test_cdf_align_weight_vs_numpy():
    rng = np.random.default_rng(1)
    w = (0.1 * rng.standard_normal((3, 3, 2, 5)) + 0.3).astype(np.float32)
    _, _, z = _stats(w)
    got = np.asarray(cdf_align_weight(jnp.asarray(w)))
    assert got.shape == w.shape
    np.testing.assert_allclose(got, 2 * ndtr(z) - 1, atol=1e-5)


@pytest.mark.parametrize("levels", LEVELS)
def test_weight_one_bit_is_sign_like(levels):
    rng = np.random.default_rng(3)
    w = rng.standard_normal(101).astype(np.float32) + 0.4
    got = np.asarray(alignq_weight(jnp.asarray(w), 1, levels=levels))
    # exact: 2*R(Phi) - 1 = sign(z) (Phi never exactly 0.5 here); paper: sign(2Phi - 1) = sign(w - m)
    np.testing.assert_array_equal(got, np.sign(w.astype(np.float64) - w.astype(np.float64).mean()))


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_weight_level_count_and_grid(levels, bits):
    n = 2**bits - 1
    got = np.asarray(alignq_weight(jnp.asarray(_weight_data()), bits, levels=levels), np.float64)
    uniq = np.unique(got)
    if bits == 1:
        grid = np.array([-1.0, 1.0])
    elif levels == "exact":
        grid = 2.0 * np.arange(n + 1) / n - 1.0  # 2^bits levels
    else:
        grid = np.arange(-n, n + 1) / n  # 2^(bits+1) - 1 levels
    expected_count = 2**bits if (levels == "exact" or bits == 1) else 2 ** (bits + 1) - 1
    assert len(uniq) == expected_count
    np.testing.assert_allclose(uniq, grid, atol=1e-6)  # every level reached, nothing else


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_weight_affine_invariance(levels, bits):
    """Q(a*w + b) == Q(w) for a > 0 and its gradient scales by 1/a (docs/method.md §1)."""
    rng = np.random.default_rng(10 + bits)
    w = (0.07 * rng.standard_normal(64)).astype(np.float32)
    a, b = np.float32(3.5), np.float32(-0.8)
    w2 = a * w + b
    q1 = np.asarray(alignq_weight(jnp.asarray(w), bits, levels=levels))
    q2 = np.asarray(alignq_weight(jnp.asarray(w2), bits, levels=levels))
    if bits == 1:  # sign(w - m) in both modes
        wd = w.astype(np.float64)
        np.testing.assert_array_equal(q1, np.sign(wd - wd.mean()))
        np.testing.assert_array_equal(q2, q1)
    else:
        v, to_value = _np_alignq_weight_v(w, bits, levels)
        _assert_quantized(q1, v, to_value)
        _assert_quantized(q2, v, to_value)
    np.testing.assert_allclose(
        np.asarray(cdf_align_weight(jnp.asarray(w2))), np.asarray(cdf_align_weight(jnp.asarray(w))), atol=1e-5
    )
    if bits > 1:
        g = jnp.asarray(rng.standard_normal(64), jnp.float32)
        f = functools.partial(alignq_weight, bits=bits, levels=levels)
        np.testing.assert_allclose(_grad(f, w2, g), _grad(f, w, g) / a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("levels", LEVELS)
def test_weight_grad_vs_numpy_random_upstream(levels):
    rng = np.random.default_rng(5)
    w = (0.05 * rng.standard_normal((3, 3, 2, 4))).astype(np.float32)
    g = rng.standard_normal(w.shape).astype(np.float32)
    grad = _grad(functools.partial(alignq_weight, bits=3, levels=levels), w, jnp.asarray(g))
    assert grad.shape == w.shape
    np.testing.assert_allclose(grad.ravel(), _np_weight_grad_full(w, g), rtol=1e-4, atol=1e-3)
    # invariants: sums to 0, orthogonal to (w - mean)
    scale = np.abs(grad).sum()
    assert abs(grad.sum()) < 1e-5 * scale
    wc = w.astype(np.float64) - w.mean(dtype=np.float64)
    assert abs(np.sum(grad * wc)) < 1e-5 * scale * np.abs(wc).max()
    # stats stopped: purely diagonal 2 phi(z)/s * g
    grad_s = _grad(
        functools.partial(alignq_weight, bits=3, levels=levels, stop_stats_grad=True), w, jnp.asarray(g)
    )
    _, s, z = _stats(w)
    np.testing.assert_allclose(grad_s, 2 * _pdf(z) / s * g, rtol=1e-4, atol=1e-3)


def test_weight_stop_stats_does_not_change_forward():
    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.standard_normal(50), jnp.float32)
    for levels in LEVELS:
        np.testing.assert_array_equal(
            np.asarray(alignq_weight(w, 4, levels=levels)),
            np.asarray(alignq_weight(w, 4, levels=levels, stop_stats_grad=True)),
        )


def test_weight_nan_propagates():
    w = jnp.asarray([0.1, -0.2, np.nan, 0.3, 0.05], jnp.float32)
    for levels in LEVELS:
        for bits in (1, 4, 8):
            got = np.asarray(alignq_weight(w, bits, levels=levels))
            assert np.all(np.isnan(got)), (levels, bits, got)


# ----------------------------------------------------------------------------------------------
# worked example 2: activations
# ----------------------------------------------------------------------------------------------
ACT_EXAMPLE = {
    ("paper", 2): [-1.666667, -0.333333, 0.0, 0.333333, 2.0],
    ("exact", 2): [-2.0, -0.666667, 0.666667, 0.666667, 2.0],
    ("paper", 4): [-1.733333, -0.333333, 0.0, 0.466667, 2.0],
    ("exact", 4): [-1.733333, -0.4, 0.133333, 0.4, 2.0],
}


@pytest.mark.parametrize("levels,bits", sorted(ACT_EXAMPLE))
def test_activation_example2(levels, bits):
    got = np.asarray(alignq_activation(jnp.asarray(X2), bits, act_range=2.0, levels=levels))
    np.testing.assert_allclose(got, ACT_EXAMPLE[(levels, bits)], atol=1e-5)
    if levels == "paper":
        # The library's fused ReLU on the official grid gives the example's "-> ReLU" row (docs/method.md §2).
        # (Exact mode with relu=True uses the unsigned grid instead: tests/test_quantizers_relu.py.)
        fused = np.asarray(alignq_activation(jnp.asarray(X2), bits, act_range=2.0, levels=levels, relu=True))
        np.testing.assert_allclose(fused, np.maximum(ACT_EXAMPLE[(levels, bits)], 0), atol=1e-5)


def test_cdf_align_activation_example2():
    got = np.asarray(cdf_align_activation(jnp.asarray(X2)))
    np.testing.assert_allclose(got, [-1.732771, -0.317039, 0.0, 0.471646, 1.975161], atol=1e-5)
    got2 = np.asarray(cdf_align_activation(jnp.asarray(X2), act_range=0.5))
    np.testing.assert_allclose(got2, 0.5 * (2 * ndtr(X2.astype(np.float64)) - 1), atol=1e-6)


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("bits", [2, 4])
def test_activation_example2_grad(levels, bits):
    grad = _grad(functools.partial(alignq_activation, bits=bits, levels=levels), X2)
    np.testing.assert_allclose(grad, [0.518070, 1.564171, 1.595769, 1.525551, 0.070113], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# activations: numpy comparisons and invariants
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("bits", [2, 3, 5, 8])
@pytest.mark.parametrize("a", [2.0, 1.5])
def test_activation_forward_vs_numpy(levels, bits, a):
    rng = np.random.default_rng(bits)
    x = (1.3 * rng.standard_normal((4, 5, 5, 3))).astype(np.float32)
    got = alignq_activation(jnp.asarray(x), bits, act_range=a, levels=levels)
    assert got.shape == x.shape and got.dtype == jnp.float32
    v, to_value = _np_alignq_act_v(x, bits, levels, a)
    _assert_quantized(np.asarray(got), v, to_value)


@pytest.mark.parametrize("levels", LEVELS)
def test_activation_grad_vs_numpy(levels):
    rng = np.random.default_rng(7)
    x = (1.5 * rng.standard_normal(40)).astype(np.float32)
    g = rng.standard_normal(40).astype(np.float32)
    for a in (2.0, 0.75):
        grad = _grad(functools.partial(alignq_activation, bits=3, act_range=a, levels=levels), x, jnp.asarray(g))
        np.testing.assert_allclose(grad, 2 * a * _pdf(x.astype(np.float64)) * g, rtol=1e-5, atol=1e-6)


def test_activation_one_bit():
    x = jnp.asarray(_act_data())
    xs = np.asarray(x, np.float64)
    # paper: sign(c) = sign(x), values +-1
    np.testing.assert_array_equal(np.asarray(alignq_activation(x, 1, levels="paper")), np.sign(xs))
    # exact: A * (2 R(Phi) - 1) = +-A
    np.testing.assert_allclose(np.asarray(alignq_activation(x, 1, act_range=2.0, levels="exact")), 2.0 * np.sign(xs))


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_activation_level_count_and_grid(levels, bits):
    n = 2**bits - 1
    got = np.asarray(alignq_activation(jnp.asarray(_act_data()), bits, act_range=2.0, levels=levels), np.float64)
    uniq = np.unique(got)
    if levels == "exact":
        grid = 2.0 * (2.0 * np.arange(n + 1) / n - 1.0)
        count = 2**bits
    elif bits == 1:
        grid = np.array([-1.0, 1.0])
        count = 2
    else:
        grid = np.arange(-2 * n, 2 * n + 1) / n
        count = 4 * n + 1
    assert len(uniq) == count
    np.testing.assert_allclose(uniq, grid, atol=1e-5)


def test_activation_nan_propagates_positionwise():
    x = jnp.asarray([0.3, np.nan, -1.0, 2.0], jnp.float32)
    for levels in LEVELS:
        for bits in (1, 2, 4, 8):
            for f in (alignq_activation, uniform_activation):
                got = np.asarray(f(x, bits, levels=levels))
                assert np.isnan(got[1]), (f.__name__, levels, bits, got)
                assert np.all(np.isfinite(got[[0, 2, 3]])), (f.__name__, levels, bits, got)


# ----------------------------------------------------------------------------------------------
# uniform baselines
# ----------------------------------------------------------------------------------------------
def _np_uniform_weight_v(w, bits, levels):
    n = 2**bits - 1
    w = np.asarray(w, np.float64)
    if levels == "paper":
        return n * w, lambda j: j / n
    return n * (np.clip(w, -1, 1) + 1) / 2, lambda j: 2.0 * j / n - 1.0


def _np_uniform_act_v(x, bits, levels, a):
    n = 2**bits - 1
    xc = np.clip(np.asarray(x, np.float64), -a, a)
    if levels == "paper":
        return n * xc, lambda j: j / n
    return n * (xc / a + 1) / 2, lambda j: a * (2.0 * j / n - 1.0)


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_uniform_weight_vs_numpy(levels, bits):
    rng = np.random.default_rng(20 + bits)
    w = (0.8 * rng.standard_normal((3, 3, 4, 4))).astype(np.float32)
    w[0, 0, 0, :2] = [1.7, -2.3]  # weights beyond +-1 exercise the clipping (exact) or its absence (paper)
    got = uniform_weight(jnp.asarray(w), bits, levels=levels)
    assert got.shape == w.shape
    v, to_value = _np_uniform_weight_v(w, bits, levels)
    _assert_quantized(np.asarray(got), v, to_value)
    outside = np.abs(w) > 1.0
    if levels == "paper":  # no clipping: values beyond +-1 survive
        assert np.abs(np.asarray(got)).max() > 2.0 and np.all(np.abs(np.asarray(got)[outside]) >= 1.0 - 1e-6)
    else:  # clipped to the end levels +-1
        np.testing.assert_array_equal(np.asarray(got)[outside], np.sign(w[outside]))


@pytest.mark.parametrize("levels", LEVELS)
def test_uniform_weight_one_bit(levels):
    rng = np.random.default_rng(30)
    w = (0.3 * rng.standard_normal(37) + 0.1).astype(np.float32)
    e = np.abs(w.astype(np.float64)).mean()
    got = np.asarray(uniform_weight(jnp.asarray(w), 1, levels=levels))
    np.testing.assert_allclose(got, e * np.sign(w), rtol=1e-5)
    # E = mean|w| is a constant in the gradient: the Jacobian is diagonal and finite
    jac = np.asarray(jax.jacobian(functools.partial(uniform_weight, bits=1, levels=levels))(jnp.asarray(w)))
    assert np.all(np.isfinite(jac))
    np.testing.assert_array_equal(jac - np.diag(np.diag(jac)), 0.0)


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("bits", [2, 3, 5, 8])
@pytest.mark.parametrize("a", [2.0, 1.25])  # (1.5 would put the clipped values exactly on a rounding tie)
def test_uniform_activation_vs_numpy(levels, bits, a):
    rng = np.random.default_rng(40 + bits)
    x = (1.5 * rng.standard_normal((4, 3, 3, 5))).astype(np.float32)
    got = uniform_activation(jnp.asarray(x), bits, act_range=a, levels=levels)
    assert got.shape == x.shape
    v, to_value = _np_uniform_act_v(x, bits, levels, a)
    _assert_quantized(np.asarray(got), v, to_value)


def test_uniform_activation_one_bit():
    x = jnp.asarray(_act_data(2000, -3.0, 3.0))
    # exact: the general 2-level formula, A*(2*R((clip(x)/A + 1)/2) - 1) = +-A
    got = np.asarray(uniform_activation(x, 1, act_range=2.0, levels="exact"))
    v, to_value = _np_uniform_act_v(np.asarray(x), 1, "exact", 2.0)
    _assert_quantized(got, v, to_value)
    np.testing.assert_array_equal(got, 2.0 * np.sign(np.asarray(x)))
    # paper: sign(clip(x)) = +-1 at one bit, like alignq_activation's paper mode (2 levels)
    got = np.asarray(uniform_activation(x, 1, act_range=2.0, levels="paper"))
    np.testing.assert_array_equal(got, np.sign(np.asarray(x)))


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_uniform_level_counts(levels, bits):
    n = 2**bits - 1
    if levels == "exact":
        wq = np.asarray(uniform_weight(jnp.asarray(_act_data(20000, -1.5, 1.5)), bits, levels="exact"))
        expected_w = 2**bits
    else:
        wq = np.asarray(uniform_weight(jnp.asarray(_act_data(20000, -1.0, 1.0)), bits, levels="paper"))
        expected_w = 2 if bits == 1 else 2 * n + 1
    assert len(np.unique(wq)) == expected_w
    aq = np.asarray(uniform_activation(jnp.asarray(_act_data(20000, -3.0, 3.0)), bits, act_range=2.0, levels=levels))
    expected_a = 2**bits if levels == "exact" else (2 if bits == 1 else 4 * n + 1)
    assert len(np.unique(aq)) == expected_a
    if levels == "exact":
        np.testing.assert_allclose(np.unique(aq), 2.0 * (2.0 * np.arange(n + 1) / n - 1.0), atol=1e-5)
        if bits > 1:
            np.testing.assert_allclose(np.unique(wq), 2.0 * np.arange(n + 1) / n - 1.0, atol=1e-6)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_uniform_exact_idempotent(bits):
    rng = np.random.default_rng(50 + bits)
    w = jnp.asarray(rng.uniform(-1.3, 1.3, 500), jnp.float32)
    q = uniform_weight(w, bits, levels="exact")
    np.testing.assert_allclose(np.asarray(uniform_weight(q, bits, levels="exact")), np.asarray(q), atol=1e-6)
    x = jnp.asarray(rng.uniform(-2.6, 2.6, 500), jnp.float32)
    for a in (2.0, 1.5):
        q = uniform_activation(x, bits, act_range=a, levels="exact")
        q2 = uniform_activation(q, bits, act_range=a, levels="exact")
        np.testing.assert_allclose(np.asarray(q2), np.asarray(q), atol=1e-6)


def test_uniform_weight_ste_grad():
    w = jnp.asarray([-1.7, -0.9, -0.3, 0.0, 0.45, 0.95, 1.2, 3.0], jnp.float32)
    inside = np.abs(np.asarray(w)) < 1.0
    for bits in (2, 4, 8):
        np.testing.assert_allclose(
            _grad(functools.partial(uniform_weight, bits=bits, levels="exact"), w), inside.astype(np.float32)
        )
        np.testing.assert_allclose(_grad(functools.partial(uniform_weight, bits=bits, levels="paper"), w), 1.0)


@pytest.mark.parametrize("levels", LEVELS)
def test_uniform_activation_ste_grad(levels):
    x = jnp.asarray([-3.0, -2.1, -1.9, -0.5, 0.0, 0.7, 1.99, 2.01, 5.0], jnp.float32)
    for a in (2.0, 1.0):
        expected = (np.abs(np.asarray(x)) < a).astype(np.float32)
        for bits in (1, 3, 8):
            g = _grad(functools.partial(uniform_activation, bits=bits, act_range=a, levels=levels), x)
            np.testing.assert_allclose(g, expected, err_msg=f"a={a} bits={bits}")


# ----------------------------------------------------------------------------------------------
# all quantizers: bits = 32, jit, gradients finite, errors
# ----------------------------------------------------------------------------------------------
QUANTIZERS = {
    "alignq_weight": alignq_weight,
    "alignq_activation": alignq_activation,
    "uniform_weight": uniform_weight,
    "uniform_activation": uniform_activation,
}
ACT_NAMES = ("alignq_activation", "uniform_activation")


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("levels", LEVELS)
def test_bits32_identity(name, levels):
    rng = np.random.default_rng(60)
    x = jnp.asarray(3.0 * rng.standard_normal((2, 3, 4)), jnp.float32)
    f = functools.partial(QUANTIZERS[name], bits=32, levels=levels)
    np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(x))
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    np.testing.assert_allclose(_grad(f, x, g), np.asarray(g), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("levels", LEVELS)
def test_jit_matches_eager_and_grads_finite(name, levels):
    rng = np.random.default_rng(70)
    x = jnp.asarray(0.9 * rng.standard_normal(32), jnp.float32)
    g = jnp.asarray(rng.standard_normal(32), jnp.float32)
    for bits in (1, 3, 8):
        f = functools.partial(QUANTIZERS[name], bits=bits, levels=levels)
        np.testing.assert_allclose(np.asarray(jax.jit(f)(x)), np.asarray(f(x)), atol=1e-6)
        loss = lambda t: jnp.sum(f(t) * g)  # noqa: E731
        ge = np.asarray(jax.grad(loss)(x))
        gj = np.asarray(jax.jit(jax.grad(loss))(x))
        assert np.all(np.isfinite(ge))
        np.testing.assert_allclose(gj, ge, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("bits", [0, -1, 9, 16, 33, 2.5])
def test_invalid_bits_raise(name, bits):
    x = jnp.asarray([0.1, -0.4, 0.7, 0.2], jnp.float32)
    with pytest.raises(ValueError, match=r"(?s)(bits.*32|32.*bits)"):
        QUANTIZERS[name](x, bits)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("bad", ["paper2022", "V22", "", "round"])
def test_invalid_levels_raise(name, bad):
    x = jnp.asarray([0.1, -0.4, 0.7, 0.2], jnp.float32)
    with pytest.raises(ValueError, match=r"(?s)(exact.*paper|paper.*exact)"):
        QUANTIZERS[name](x, 4, levels=bad)


@pytest.mark.parametrize("name", ACT_NAMES)
@pytest.mark.parametrize("a", [0.0, -1.0])
def test_invalid_act_range_raise(name, a):
    x = jnp.asarray([0.1, -0.4, 0.7], jnp.float32)
    with pytest.raises(ValueError):
        QUANTIZERS[name](x, 4, act_range=a)


@pytest.mark.parametrize("a", [0.0, -2.0])
def test_cdf_align_activation_invalid_act_range(a):
    with pytest.raises(ValueError):
        cdf_align_activation(jnp.asarray([0.1, 0.2], jnp.float32), act_range=a)


@pytest.mark.parametrize("name", ["alignq_weight", "uniform_weight"])
@pytest.mark.parametrize("shape", [(1,), (1, 1, 1, 1), (0,)])
def test_weight_too_few_elements_raise(name, shape):
    with pytest.raises(ValueError):
        QUANTIZERS[name](jnp.ones(shape, jnp.float32), 4)


def test_round_half_to_even_on_exact_ties():
    """jnp.round / np.round round ties to even (docs/method.md, quirk 21); check cases where that differs from
    rounding half up. The worked examples' ties (R(1.5)=2, R(7.5)=8) do not tell the two apart."""
    zero = jnp.zeros((3,), jnp.float32)
    # exact grid, 1 bit, Phi(0) = 0.5: R(0.5) = 0 -> -A
    np.testing.assert_array_equal(np.asarray(alignq_activation(zero, 1, act_range=2.0, levels="exact")), -2.0)
    np.testing.assert_array_equal(np.asarray(uniform_activation(zero, 1, act_range=2.0, levels="exact")), -2.0)
    # unsigned grid (exact mode + ReLU), 1 bit: x = A/2 -> R(0.5) = 0 -> 0, not A
    half = jnp.full((2,), 1.0, jnp.float32)
    np.testing.assert_array_equal(np.asarray(uniform_activation(half, 1, act_range=2.0, relu=True)), 0.0)
    # a weight exactly at the mean: z = 0
    w = jnp.asarray([-1.0, 0.0, 1.0], jnp.float32)
    np.testing.assert_array_equal(np.asarray(alignq_weight(w, 1, levels="exact")), [-1.0, -1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(alignq_weight(w, 1, levels="paper")), [-1.0, 0.0, 1.0])  # sign(0)
    # paper grid, 2 bits: R(3 * 1.5) = R(4.5) = 4 -> 4/3
    x = jnp.asarray([1.5, -1.5], jnp.float32)
    np.testing.assert_allclose(np.asarray(uniform_activation(x, 2, act_range=2.0, levels="paper")), [4 / 3, -4 / 3])
    np.testing.assert_allclose(
        np.asarray(uniform_weight(jnp.asarray([1.5, -1.5, 0.1], jnp.float32), 2, levels="paper")),
        [4 / 3, -4 / 3, 0.0],
    )
