"""Batch-correlation term of AlignQ (reference section 4): B x B sample-similarity matrices and their gap.

Pure functions, no state. The ADMM solver (``alignq_jax.admm``) consumes the gaps.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _check_batch(x, name="x"):
    if jnp.ndim(x) < 2:
        raise ValueError(f"{name} must have a batch axis and at least one feature axis, shape (B, ...); got {jnp.shape(x)}")
    if jnp.shape(x)[0] < 2:
        raise ValueError(f"{name} needs a batch of at least 2 samples for a batch correlation; got {jnp.shape(x)}")


def gap_dtype(dtype):
    """The dtype correlations are computed in: float32 for float32 and narrower inputs (bfloat16, float16),
    float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def standardise_features(x, eps=1e-5):
    """(B, ...) -> (B, F): every feature column centred over the batch and divided by sqrt(var + eps^2).

    var is the unbiased (ddof=1) batch variance. sqrt(var + eps^2) ~ std + eps (the official Office code's
    epsilon) but keeps a finite derivative for features that are constant over the batch (reference quirk 9).
    Computed in float32 (see :func:`gap_dtype`) whatever the input dtype: a bfloat16 batch gives exactly the
    result of its float32 cast.
    """
    _check_batch(x)
    b = x.shape[0]
    flat = x.reshape(b, -1).astype(gap_dtype(x.dtype))
    centred = flat - jnp.mean(flat, axis=0, keepdims=True)
    var = jnp.sum(centred * centred, axis=0, keepdims=True) / (b - 1)
    return centred * jax.lax.rsqrt(var + eps * eps)


def batch_correlation(x, eps=1e-5):
    """B x B batch correlation corr(X) = X_std X_std^T / F of reference section 4.

    Args:
      x: (B, ...) activations; features are everything after the batch axis (F = prod of those dims).
      eps: stabiliser of the per-feature std (see :func:`standardise_features`).
    Returns: (B, B) symmetric matrix whose rows sum to 0.
    """
    xs = standardise_features(x, eps)
    return (xs @ xs.T) / xs.shape[1]


def draw_feature_sample(num_total: int, key, num_features: int) -> tuple[jax.Array, int, int]:
    """A strided random subset of feature columns: (offset, stride, count).

    stride s = num_total // num_features, offset uniform in [0, s), columns offset + i*s for i < count =
    num_total // s. Every feature is drawn with probability 1/s when s divides num_total, so the gap of the
    sampled columns is an unbiased estimate of the full gap (corr(.) is a mean over features of per-feature outer
    products, and the standardisation is per feature); otherwise the last num_total mod s features are never
    drawn.
    """
    stride = max(1, num_total // num_features)
    return jax.random.randint(key, (), 0, stride), stride, num_total // stride


def sampled_columns(offset, stride: int, count: int):
    """Flat feature indices of a sample: offset + stride * arange(count)."""
    return offset + stride * jnp.arange(count)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def take_features(flat, offset, stride: int, count: int):
    """Columns offset, offset+stride, ... of a (B, F) array -> (B, count)."""
    b = flat.shape[0]
    blocks = flat[:, : count * stride].reshape(b, count, stride)
    return jax.lax.dynamic_slice_in_dim(blocks, offset, 1, axis=2)[..., 0]


def _take_features_fwd(flat, offset, stride, count):
    return take_features(flat, offset, stride, count), (offset, flat.shape)


def _take_features_bwd(stride, count, res, g):
    # A select over the full shape instead of a scatter into zeros: XLA fuses it into the consumer, so no B x F
    # buffer is created per sampled layer.
    offset, (b, f) = res
    hit = jax.lax.broadcasted_iota(jnp.int32, (1, 1, stride), 2) == offset
    full = jnp.where(hit, g[:, :, None], jnp.zeros((), g.dtype)).reshape(b, count * stride)
    if count * stride < f:
        full = jnp.pad(full, ((0, 0), (0, f - count * stride)))
    return full, None


take_features.defvjp(_take_features_fwd, _take_features_bwd)


def sample_features(arrays, key, num_features):
    """The same random strided subset of about ``num_features`` feature columns of every (B, ...) array.

    Returns a tuple of (B, K) arrays (see :func:`draw_feature_sample`).
    """
    b = arrays[0].shape[0]
    offset, stride, count = draw_feature_sample(arrays[0][0].size, key, num_features)
    return tuple(take_features(a.reshape(b, -1), offset, stride, count) for a in arrays)


def correlation_gap(x, y, eps=1e-5, *, num_features=None, key=None):
    """D = corr(y) - corr(x) (reference section 4): how much the transform x -> y changed the batch correlations.

    Args:
      x: (B, ...) quantizer input (the BatchNorm output).
      y: same shape: the aligned, unrounded output (official code) or the rounded output (Theorem 3.2's Q(X)).
      num_features, key: if given and smaller than the feature count F, an unbiased estimate from that many
        random features (see :func:`sample_features`), costing num_features/F of the exact term.
    Returns: (B, B).

    Computed with one B x F by F x B matmul: with P = ys - xs and Q = ys + xs, the symmetric part of P Q^T equals
    ys ys^T - xs xs^T (the cross terms cancel), half the FLOPs of two Gram matrices, forward and backward.
    """
    if jnp.shape(x) != jnp.shape(y):
        raise ValueError(f"x and y must have the same shape; got {jnp.shape(x)} and {jnp.shape(y)}")
    if num_features is not None:
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int or None; got {num_features!r}")
        if key is None:
            raise ValueError("num_features needs a PRNG key")
        _check_batch(x)
        if num_features < x[0].size:
            x, y = sample_features((x, y), key, num_features)
    xs = standardise_features(x, eps)
    ys = standardise_features(y, eps)
    m = ((ys - xs) @ (ys + xs).T) / xs.shape[1]
    return 0.5 * (m + m.T)
