"""Reference tests for alignq_jax.correlation (docs/method.md §4, §5.4 and quirk 9)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtr

from alignq_jax.correlation import batch_correlation, correlation_gap
from alignq_jax.quantizers import cdf_align_activation

# Worked example 3 (docs/method.md §5.4): B = 3, F = 4, A = 2.
X3 = np.array([[0.5, -1.0, 1.2, 0.0], [-0.3, 0.4, 2.0, -1.5], [1.1, 0.9, -0.7, 0.6]], np.float32)
CORR_X3 = [[0.3508, -0.1311, -0.2197], [-0.1311, 0.7803, -0.6492], [-0.2197, -0.6492, 0.8689]]
CORR_Y3 = [[0.3869, -0.1193, -0.2676], [-0.1193, 0.7324, -0.6131], [-0.2676, -0.6131, 0.8807]]
D3 = [[0.0361, 0.0119, -0.0479], [0.0119, -0.0479, 0.0361], [-0.0479, 0.0361, 0.0119]]


def np_corr(x, eps=1e-5):
    """Independent float64 implementation of the spec: per-feature standardisation over the batch
    with sqrt(var_unbiased + eps^2), then Xs Xs^T / F."""
    x = np.asarray(x, np.float64)
    b = x.shape[0]
    m = x.reshape(b, -1)
    ms = (m - m.mean(0)) / np.sqrt(m.var(0, ddof=1) + eps**2)
    return ms @ ms.T / m.shape[1]


def np_cdf(x, a=2.0):
    return a * (2.0 * ndtr(np.asarray(x, np.float64)) - 1.0)


def test_example3_corr_x_and_y():
    cx = np.asarray(batch_correlation(jnp.asarray(X3)))
    assert cx.shape == (3, 3)
    np.testing.assert_allclose(cx, CORR_X3, atol=1e-4)
    y = cdf_align_activation(jnp.asarray(X3), 2.0)
    np.testing.assert_allclose(np.asarray(batch_correlation(y)), CORR_Y3, atol=1e-4)


def test_example3_gap():
    x = jnp.asarray(X3)
    d = np.asarray(correlation_gap(x, cdf_align_activation(x, 2.0)))
    np.testing.assert_allclose(d, D3, atol=1e-4)
    # and against the float64 re-computation to float32 precision
    np.testing.assert_allclose(d, np_corr(np_cdf(X3)) - np_corr(X3), atol=2e-6)


@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 3, 2), (8, 16)])
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_batch_correlation_vs_numpy(shape, eps):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 3.0, shape[1:]) + rng.normal(size=shape[1:])).astype(np.float32)
    got = np.asarray(batch_correlation(jnp.asarray(x), eps=eps))
    assert got.shape == (shape[0], shape[0])
    # eps = 0.5 distinguishes sqrt(var + eps^2) from std + eps
    np.testing.assert_allclose(got, np_corr(x, eps), atol=1e-5)


def test_eps_formula_is_sqrt_var_plus_eps_squared():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    eps = 0.7
    got = np.asarray(batch_correlation(jnp.asarray(x), eps=eps))
    m = x.astype(np.float64)
    wrong = (m - m.mean(0)) / (m.std(0, ddof=1) + eps)
    wrong = wrong @ wrong.T / m.shape[1]
    assert np.abs(got - wrong).max() > 1e-2
    np.testing.assert_allclose(got, np_corr(x, eps), atol=1e-5)


def test_batch_correlation_invariants():
    rng = np.random.default_rng(3)
    b, f = 8, 12
    x = rng.standard_normal((b, f)).astype(np.float32)
    # constant features (dead channel, zero padding); values whose batch mean is exact in float32
    x[:, 2] = 0.0
    x[:, 5] = 4.0
    x[:, 9] = -0.5
    c = np.asarray(batch_correlation(jnp.asarray(x)), np.float64)
    np.testing.assert_allclose(c, c.T, atol=1e-6)  # symmetric
    np.testing.assert_allclose(c.sum(axis=1), 0.0, atol=1e-5)  # column means removed -> rows sum to 0
    assert np.linalg.eigvalsh(c).min() > -1e-5  # Gram matrix: PSD
    # trace = sum_f (B-1) var_f / (var_f + eps^2) / F  ->  (B-1) * (non-constant fraction)
    np.testing.assert_allclose(np.trace(c), (b - 1) * (f - 3) / f, rtol=1e-4)
    assert np.all(np.isfinite(c))
    np.testing.assert_allclose(c, np_corr(x), atol=1e-5)


def test_scale_and_shift_invariance():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 3, 3, 2)).astype(np.float32)
    base = np.asarray(batch_correlation(jnp.asarray(x)))
    for a, b in [(3.7, -1.2), (0.05, 4.0), (250.0, 0.0)]:
        got = np.asarray(batch_correlation(jnp.asarray(a * x + b)))
        np.testing.assert_allclose(got, base, atol=1e-4, err_msg=f"a={a} b={b}")
    # per-feature positive affine maps too (each column is standardised on its own)
    a_f = rng.uniform(0.2, 5.0, x.shape[1:]).astype(np.float32)
    b_f = rng.normal(size=x.shape[1:]).astype(np.float32)
    np.testing.assert_allclose(np.asarray(batch_correlation(jnp.asarray(a_f * x + b_f))), base, atol=1e-4)


def test_correlation_gap_definition():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    y = np.tanh(2 * x + 0.3 * rng.standard_normal((5, 8))).astype(np.float32)
    d = np.asarray(correlation_gap(jnp.asarray(x), jnp.asarray(y)))
    assert d.shape == (5, 5)
    np.testing.assert_allclose(d, np_corr(y) - np_corr(x), atol=1e-5)
    np.testing.assert_allclose(np.asarray(correlation_gap(jnp.asarray(x), jnp.asarray(x))), 0.0, atol=1e-7)
    # an affine y has no gap (A drops out, docs/method.md §4)
    np.testing.assert_allclose(np.asarray(correlation_gap(jnp.asarray(x), jnp.asarray(3 * x - 1))), 0.0, atol=1e-5)
    d_eps = np.asarray(correlation_gap(jnp.asarray(x), jnp.asarray(y), eps=0.4))
    np.testing.assert_allclose(d_eps, np_corr(y, 0.4) - np_corr(x, 0.4), atol=1e-5)


def _gap_loss(x):
    return jnp.sum(correlation_gap(x, cdf_align_activation(x, 2.0)) ** 2)


def test_gradient_finite_with_constant_features():
    """docs/method.md, quirk 9: a feature constant over the batch must not give NaN/inf gradients."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    x[:, 0, 0, :] = 0.0  # zero-padded border
    x[:, 1, 2, 1] = 3.0  # constant non-zero feature
    xj = jnp.asarray(x)
    g = np.asarray(jax.grad(_gap_loss)(xj))
    assert np.all(np.isfinite(g))
    # exact derivative w.r.t. a constant column is 0 (its contribution to corr is quadratic in the deviation)
    np.testing.assert_allclose(g[:, 0, 0, :], 0.0, atol=1e-4)
    assert np.abs(g).max() > 1e-4  # the other features do get a gradient
    g2 = np.asarray(jax.grad(lambda t: jnp.sum(batch_correlation(t) ** 2))(xj))
    assert np.all(np.isfinite(g2))
    # all-constant input: forward and gradient finite
    z = jnp.zeros((4, 6), jnp.float32)
    assert np.all(np.isfinite(np.asarray(batch_correlation(z))))
    np.testing.assert_allclose(np.asarray(batch_correlation(z)), 0.0, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(jax.grad(_gap_loss)(z))))


def test_gradient_matches_finite_differences():
    """Directional derivative of sum(W * D(x)) vs a float64 central difference of the numpy formula."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    wmat = rng.standard_normal((5, 5))
    direction = rng.standard_normal((5, 6))

    def np_f(t):
        return np.sum(wmat * (np_corr(np_cdf(t)) - np_corr(t)))

    h = 1e-5
    fd = (np_f(x + h * direction) - np_f(x - h * direction)) / (2 * h)
    wj = jnp.asarray(wmat, jnp.float32)
    g = jax.grad(lambda t: jnp.sum(wj * correlation_gap(t, cdf_align_activation(t, 2.0))))(jnp.asarray(x))
    ad = float(np.sum(np.asarray(g, np.float64) * direction))
    np.testing.assert_allclose(ad, fd, rtol=2e-3, atol=1e-4)


def test_jit_matches_eager():
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((6, 2, 2, 3)), jnp.float32)
    y = cdf_align_activation(x, 2.0)
    np.testing.assert_allclose(
        np.asarray(jax.jit(batch_correlation)(x)), np.asarray(batch_correlation(x)), atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(jax.jit(correlation_gap)(x, y)), np.asarray(correlation_gap(x, y)), atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(jax.jit(jax.grad(_gap_loss))(x)), np.asarray(jax.grad(_gap_loss)(x)), rtol=1e-4, atol=1e-6
    )


# ----------------------------------------------------------------------------------------------------------------
# Sampled-feature estimate: a random lattice of spatial positions with all their channels.

import itertools  # noqa: E402

from alignq_jax.correlation import (  # noqa: E402
    draw_feature_sample,
    feature_strides,
    sample_features,
    take_channels,
    take_features,
)

RESNET20_SHAPES = [(32, 32, 16), (16, 16, 32), (8, 8, 64)]


def _sample_columns(shape, offsets, strides):
    """Flat NHWC indices of a sample in take_features' output order, by numpy indexing (independent of the
    library's masks and reshapes): kept channel j = channel_offset + c_s*j at positions spatial_offsets[:, j] +
    s * n along each spatial axis."""
    spatial_offsets, channel_offset = (np.asarray(o) for o in offsets)
    idx = np.arange(int(np.prod(shape))).reshape(shape)
    per_channel = []
    for j, c in enumerate(range(int(channel_offset), shape[-1], strides[-1])):
        grid = tuple(slice(int(o), None, s) for o, s in zip(spatial_offsets[:, j], strides[:-1]))
        per_channel.append(idx[..., c][grid])
    return np.stack(per_channel, axis=-1).ravel()


def _all_offsets_of_one_channel(strides):
    return itertools.product(*(range(s) for s in strides[:-1]))


@pytest.mark.parametrize("shape", RESNET20_SHAPES)
@pytest.mark.parametrize("k", [1024, 256])
def test_every_sample_covers_every_channel_for_resnet20_shapes(shape, k):
    """Every draw keeps all channels (the old stride-F/K scheme saw 1 of 16, 4 of 32 and 16 of 64 channels), has
    at least k columns at evenly spread positions, and every column is equally likely to be drawn."""
    strides = feature_strides(shape, k)
    f, c = int(np.prod(shape)), shape[-1]
    assert strides[-1] == 1 and f // int(np.prod(strides)) >= k
    draws = []
    for t in range(50):
        offsets, _ = draw_feature_sample(shape, jax.random.key(t), k)
        cols = _sample_columns(shape, offsets, strides)
        assert set(cols % c) == set(range(c))
        assert np.all(np.bincount(cols % c, minlength=c) == len(cols) // c)  # the same count per channel
        draws.append(np.asarray(offsets[0]))
    draws = np.stack(draws)  # (draws, spatial axes, channels): each offset uniform over its stride
    for axis, s in enumerate(strides[:-1]):
        counts = np.bincount(draws[:, axis].ravel(), minlength=s)
        assert len(counts) == s and counts.min() > 0.5 * counts.mean()
    # Each channel's possible grids partition its columns: with uniform offsets, inclusion probability 1/S.
    for ch in (0, c - 1):
        seen = np.zeros(f, int)
        for spatial in _all_offsets_of_one_channel(strides):
            offsets = (np.tile(np.asarray(spatial)[:, None], (1, c)), 0)
            cols = _sample_columns(shape, offsets, strides)
            seen[cols[cols % c == ch]] += 1
        assert np.all(seen[np.arange(f) % c == ch] == 1)


def test_feature_strides_edge_cases():
    assert feature_strides((4, 4, 8), 128) == (1, 1, 1)  # all features requested: the exact gap
    assert feature_strides((100,), 8) == (10,)  # (B, F) input: a stride over the features
    assert feature_strides((13,), 4) == (1,)  # a prime count has no divisor: every feature, still exact
    assert feature_strides((7, 7, 64), 196) == (1, 7, 1)  # strides divide their axes (here 7 x 1 positions)
    assert feature_strides((8, 8, 64), 16) == (8, 8, 4)  # fewer features than channels: a channel stride


@pytest.mark.parametrize("shape, k", [((5, 4, 6, 3), 4), ((3, 8, 8, 6), 6), ((4, 12), 3), ((2, 4, 4, 8), 4)])
def test_take_features_forward_and_backward_match_the_gather(shape, k):
    """Values equal numpy indexing of the sampled columns; the select-based backward equals the true VJP of the
    gather (jit, traced offsets)."""
    strides = feature_strides(shape[1:], k)
    assert np.prod(strides) > 1
    x = jax.random.normal(jax.random.key(30), shape)
    b = shape[0]
    fwd = jax.jit(lambda x, o: take_features(x, o, strides))
    for t in range(4):
        offsets, _ = draw_feature_sample(shape[1:], jax.random.key(t), k)
        cols = _sample_columns(shape[1:], offsets, strides)
        got = fwd(x, offsets)
        np.testing.assert_array_equal(got.reshape(b, -1), np.asarray(x).reshape(b, -1)[:, cols])
        up = jax.random.normal(jax.random.key(31 + t), got.shape)
        grad = jax.jit(jax.grad(lambda x, o: jnp.sum(take_features(x, o, strides) * up)))(x, offsets)
        true_vjp = jax.grad(lambda x: jnp.sum(x.reshape(b, -1)[:, cols] * up.reshape(b, -1)))(x)
        np.testing.assert_array_equal(grad, true_vjp)
        assert np.count_nonzero(grad) == up.size
    np.testing.assert_array_equal(take_channels(jnp.arange(12.0), jnp.asarray(2), 3), [2.0, 5.0, 8.0, 11.0])


def _real_like(shape, key):
    """Spatially smooth, channel-correlated activations (a random conv of smooth images), BN-standardised."""
    k1, k2 = jax.random.split(key)
    img = jax.random.normal(k1, (*shape[:3], 3))
    img = jax.lax.reduce_window(img, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")
    filters = jax.random.normal(k2, (3, 3, 3, shape[3]))
    x = jax.lax.conv_general_dilated(img, filters, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (x - x.mean((0, 1, 2))) / x.std((0, 1, 2)) * jnp.linspace(0.5, 2.0, shape[3]) + 0.3


@pytest.mark.parametrize("shape, k", [((8, 16, 16, 8), 256), ((6, 8, 8, 16), 64)])
def test_sampled_gap_is_unbiased(shape, k):
    """E[sampled gap] = exact gap, averaging over random keys (within a few standard errors of the mean); a single
    draw does differ from the exact gap."""
    x = _real_like(shape, jax.random.key(32))
    y = cdf_align_activation(x)
    exact = np.asarray(correlation_gap(x, y), np.float64)
    n = 300
    draws = np.stack([np.asarray(correlation_gap(x, y, num_features=k, key=jax.random.key(t)), np.float64)
                      for t in range(n)])
    assert np.abs(draws[0] - exact).max() > 1e-4
    se = draws.std(0) / np.sqrt(n) + 1e-7
    assert np.max(np.abs(draws.mean(0) - exact) / se) < 5.0
    # squared Frobenius error of the mean vs its expectation sum(Var)/n for an unbiased estimate
    assert np.sum((draws.mean(0) - exact) ** 2) < 4.0 * np.sum(se**2)


def test_sampled_gap_average_over_every_sample_is_the_exact_gap():
    """Exact unbiasedness: 4 x 4 positions, 3 channels, stride 2 x 2 -> 4 grids per channel, 4^3 equally likely
    samples; their mean gap equals the exact gap to float32 rounding."""
    shape = (5, 4, 4, 3)
    x = _real_like(shape, jax.random.key(34))
    y = cdf_align_activation(x)
    strides = feature_strides(shape[1:], 12)
    assert strides == (2, 2, 1)
    grids = list(_all_offsets_of_one_channel(strides))
    gaps = []
    for choice in itertools.product(grids, repeat=3):
        offsets = (jnp.asarray(np.array(choice).T, jnp.int32), jnp.asarray(0, jnp.int32))
        gaps.append(correlation_gap(take_features(x, offsets, strides), take_features(y, offsets, strides)))
    np.testing.assert_allclose(np.mean(gaps, axis=0), correlation_gap(x, y), atol=1e-6)


def test_sample_features_and_gap_arguments():
    a, b = sample_features((jnp.arange(40.0).reshape(2, 20), -jnp.arange(40.0).reshape(2, 20)), jax.random.key(3), 5)
    assert a.shape == (2, 5)
    np.testing.assert_array_equal(a, -b)  # the same columns of every array
    with pytest.raises(ValueError, match="shape"):
        sample_features((jnp.zeros((2, 20)), jnp.zeros((2, 10))), jax.random.key(3), 5)
    x = jax.random.normal(jax.random.key(33), (4, 64))
    with pytest.raises(ValueError, match="key"):
        correlation_gap(x, x, num_features=8)
    with pytest.raises(ValueError, match="num_features"):
        correlation_gap(x, x, num_features=0, key=jax.random.key(0))
    np.testing.assert_allclose(correlation_gap(x, 2 * x, num_features=8, key=jax.random.key(0)), 0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# dtypes: correlations in float32 whatever the input dtype


def test_bfloat16_gap_equals_gap_of_its_float32_cast():
    x = jax.random.normal(jax.random.key(40), (8, 4, 4, 3)).astype(jnp.bfloat16) * 3 + 1
    y = cdf_align_activation(x.astype(jnp.float32)).astype(jnp.bfloat16)
    x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
    d = correlation_gap(x, y)
    assert d.dtype == jnp.float32
    np.testing.assert_array_equal(d, correlation_gap(x32, y32))
    np.testing.assert_array_equal(batch_correlation(x), batch_correlation(x32))
    # and that float32 computation is the float64 reference to float32 rounding (a bf16 computation is not)
    np.testing.assert_allclose(d, np_corr(y32) - np_corr(x32), atol=2e-6)
    key = jax.random.key(41)
    np.testing.assert_array_equal(correlation_gap(x, y, num_features=12, key=key),
                                  correlation_gap(x32, y32, num_features=12, key=key))
    # the gradient reaches the bf16 input in its own dtype
    g = jax.grad(lambda x: jnp.sum(correlation_gap(x, y) ** 2))(x)
    assert g.dtype == jnp.bfloat16
