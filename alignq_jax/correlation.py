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


def correlation_gap(x, y, eps=1e-5):
    """D = corr(y) - corr(x) (reference section 4): how much the transform x -> y changed the batch correlations.

    Args:
      x: (B, ...) quantizer input (the BatchNorm output).
      y: same shape: the aligned, unrounded output (official code) or the rounded output (Theorem 3.2's Q(X)).
    Returns: (B, B).

    Computed with one B x F by F x B matmul: with P = ys - xs and Q = ys + xs, the symmetric part of P Q^T equals
    ys ys^T - xs xs^T (the cross terms cancel), half the FLOPs of two Gram matrices, forward and backward.
    """
    if jnp.shape(x) != jnp.shape(y):
        raise ValueError(f"x and y must have the same shape; got {jnp.shape(x)} and {jnp.shape(y)}")
    xs = standardise_features(x, eps)
    ys = standardise_features(y, eps)
    m = ((ys - xs) @ (ys + xs).T) / xs.shape[1]
    return 0.5 * (m + m.T)
