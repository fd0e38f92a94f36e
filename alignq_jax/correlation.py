"""Batch-correlation term of AlignQ (reference section 4): B x B sample-similarity matrices and their gap.

Pure functions, no state. The ADMM solver (``alignq_jax.admm``) consumes the gaps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_batch(x, name="x"):
    if jnp.ndim(x) < 2:
        raise ValueError(f"{name} must have a batch axis and at least one feature axis, shape (B, ...); got {jnp.shape(x)}")
    if jnp.shape(x)[0] < 2:
        raise ValueError(f"{name} needs a batch of at least 2 samples for a batch correlation; got {jnp.shape(x)}")


def standardise_features(x, eps=1e-5):
    """(B, ...) -> (B, F): every feature column centred over the batch and divided by sqrt(var + eps^2).

    var is the unbiased (ddof=1) batch variance. sqrt(var + eps^2) ~ std + eps (the official Office code's
    epsilon) but keeps a finite derivative for features that are constant over the batch (reference quirk 9).
    """
    _check_batch(x)
    b = x.shape[0]
    flat = x.reshape(b, -1)
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


def sample_features(x, y, key, num_features):
    """The same random subset of about ``num_features`` feature columns of x and y: (B, K) each.

    A strided subset: stride s = F // num_features, a random offset o in [0, s), columns o, o+s, ..., o+(K-1)s
    with K = F // s. Every feature is drawn with probability 1/s when s divides F (then the estimate below is
    exactly unbiased: corr(.) is a mean over features of per-feature outer products and the standardisation is
    per feature); otherwise the last F mod s features are never drawn. A strided slice (rather than a random
    gather) keeps the backward a cheap dynamic update instead of a scatter.
    """
    b = x.shape[0]
    xf, yf = x.reshape(b, -1), y.reshape(b, -1)
    f = xf.shape[1]
    stride = max(1, f // num_features)
    k = f // stride
    offset = jax.random.randint(key, (), 0, stride)

    def take(m):
        blocks = m[:, : k * stride].reshape(b, k, stride)
        return jax.lax.dynamic_slice_in_dim(blocks, offset, 1, axis=2)[..., 0]

    return take(xf), take(yf)


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
            x, y = sample_features(x, y, key, num_features)
    xs = standardise_features(x, eps)
    ys = standardise_features(y, eps)
    m = ((ys - xs) @ (ys + xs).T) / xs.shape[1]
    return 0.5 * (m + m.T)
