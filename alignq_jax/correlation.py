"""Batch-correlation term of AlignQ (docs/method.md §4): B x B sample-similarity matrices and their gap.

Pure functions, no state. The ADMM solver (``alignq_jax.admm``) consumes the gaps.
"""

from __future__ import annotations

import functools
import itertools
import math
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
    epsilon) but keeps a finite derivative for features that are constant over the batch (docs/method.md, quirk 9).
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
    """B x B batch correlation corr(X) = X_std X_std^T / F of docs/method.md §4.

    Args:
      x: (B, ...) activations; features are everything after the batch axis (F = prod of those dims).
      eps: stabiliser of the per-feature std (see :func:`standardise_features`).
    Returns: (B, B) symmetric matrix whose rows sum to 0.
    """
    xs = standardise_features(x, eps)
    return (xs @ xs.T) / xs.shape[1]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@functools.lru_cache(maxsize=None)
def feature_strides(shape: tuple[int, ...], num_features: int) -> tuple[int, ...]:
    """Per-axis strides of the sampled features for per-sample feature shape ``shape`` = (*spatial, C).

    The last axis is the channel axis (NHWC; for a (B, F) input the F features play that role). Every stride
    divides its axis, and the product S of the strides is the largest such product with F / S >= num_features
    (F = prod(shape)), so a sample has F / S columns: ``num_features``, or more when the axis lengths lack the
    divisors. While num_features >= C every channel is kept and only the spatial axes are strided, as evenly as
    the divisors allow (a regular grid of positions per channel); below C, one position per kept channel and a
    channel stride. All ones (the exact gap) when num_features >= F.
    """
    shape = tuple(int(n) for n in shape)
    total = math.prod(shape)
    if num_features >= total:
        return (1,) * len(shape)
    target = total // num_features  # the largest S with total / S >= num_features
    *spatial, channels = shape
    if not spatial or channels > num_features:
        spatial_strides = tuple(spatial)  # one spatial position per sample (none when there is no spatial axis)
        budget = target // max(1, math.prod(spatial))
        return spatial_strides + (max(d for d in _divisors(channels) if d <= budget),)
    best = None
    for combo in itertools.product(*(_divisors(n) for n in spatial)):
        product = math.prod(combo)
        if product <= target:
            rank = (product, -max(combo))  # the largest S, then the most even spread over the spatial axes
            if best is None or rank > best[0]:
                best = (rank, combo)
    return best[1] + (1,)


def draw_feature_sample(shape: tuple[int, ...], key, num_features: int):
    """A random sample of feature columns for per-sample feature shape ``shape`` = (*spatial, C).

    Returns ((spatial_offsets, channel_offset), strides). strides: :func:`feature_strides` (static), (*s, c_s).
    The kept channels are c_s*j + channel_offset (all C while num_features >= C, the usual case), and kept channel
    j takes the regular grid of positions with index spatial_offsets[i, j] + s[i] * n along spatial axis i:
    spatial_offsets (len(shape) - 1, C // c_s) int32. Every offset is uniform in [0, its stride) and independent,
    so each channel gets its own random grid: every draw covers every channel at evenly spread positions, and
    different channels are sampled at different positions (neighbouring channels of one position are correlated,
    so a shared grid would give a noisier estimate). ResNet-20 with 1024 features: 8 x 8 of the 32 x 32 positions
    of each of the 16 channels in the first stage.

    Unbiasedness: every feature column is in the sample with probability exactly 1/S (S = prod(strides), and each
    stride divides its axis), and the sample always has F/S columns. corr(.) is a mean over columns of per-column
    outer products of the column standardised over the batch (the standardisation uses that column only), so the
    gap of the sampled columns is an unbiased estimate of the exact gap: E[D_sampled] = D. Anything nonlinear in
    the gap is not: the ADMM penalty (|D - Z|, (D - Z)^2, the RMS) of the sampled gap overestimates that of the
    exact gap on average (by Var(D_sampled) in the quadratic term), and neither its gradient nor the ADMM Z-step
    (a soft threshold) is unbiased.
    """
    strides = feature_strides(tuple(int(n) for n in shape), num_features)
    *spatial, c_stride = strides
    kept = shape[-1] // c_stride
    k_spatial, k_channel = jax.random.split(key)
    maxval = jnp.asarray(spatial, jnp.int32).reshape(-1, 1)
    spatial_offsets = jax.random.randint(k_spatial, (len(spatial), kept), 0, maxval, dtype=jnp.int32)
    channel_offset = jax.random.randint(k_channel, (), 0, c_stride, dtype=jnp.int32)
    return (spatial_offsets, channel_offset), strides


def _sample_view(shape, strides):
    """(view, stride axes, kept-channel axis): ``shape`` (B, *spatial, C) with every strided axis n split into
    (n // s, s); the stride axes are the s axes."""
    view, stride_axes = [shape[0]], []
    for n, s in zip(shape[1:], strides):
        if s > 1:
            view += [n // s, s]
            stride_axes.append(len(view) - 1)
        else:
            view.append(n)
    kept_axis = len(view) - (2 if strides[-1] > 1 else 1)
    return view, tuple(stride_axes), kept_axis


def _sample_mask(offsets, strides, view, kept_axis):
    """Boolean mask (broadcastable to ``view``) of the sampled columns, built from iotas: no index arrays."""
    spatial_offsets, channel_offset = offsets
    ndim, mask, axis = len(view), None, 1
    for i, s in enumerate(strides):
        if s == 1:
            axis += 1
            continue
        shape = [1] * ndim
        shape[axis + 1] = s
        hit = jax.lax.broadcasted_iota(jnp.int32, shape, axis + 1)
        if i < len(strides) - 1:  # a spatial axis: every kept channel has its own offset
            per_channel = [1] * ndim
            per_channel[kept_axis] = view[kept_axis]
            hit = hit == spatial_offsets[i].reshape(per_channel)
        else:
            hit = hit == channel_offset
        mask = hit if mask is None else mask & hit
        axis += 2
    return mask


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def take_features(x, offsets, strides: tuple[int, ...]):
    """The sampled columns of x (B, *spatial, C) -> (B, *[n // s per spatial axis], C // c_s).

    ``offsets``, ``strides``: from :func:`draw_feature_sample`. The forward is a select and a sum over the stride
    axes (one pass, fused by XLA, no gather); the backward puts the cotangent back with the same select (no
    scatter, no full-size zeros buffer).
    """
    if len(strides) != x.ndim - 1:
        raise ValueError(f"strides {strides} do not match the feature shape {x.shape[1:]}")
    view, stride_axes, kept_axis = _sample_view(x.shape, strides)
    if not stride_axes:
        return x
    mask = _sample_mask(offsets, strides, view, kept_axis)
    return jnp.sum(jnp.where(mask, x.reshape(view), jnp.zeros((), x.dtype)), axis=stride_axes)


def _take_features_fwd(x, offsets, strides):
    return take_features(x, offsets, strides), (offsets, x.shape)


def _take_features_bwd(strides, res, g):
    offsets, shape = res
    view, stride_axes, kept_axis = _sample_view(shape, strides)
    if not stride_axes:
        return g, None
    mask = _sample_mask(offsets, strides, view, kept_axis)
    g = jnp.expand_dims(g, stride_axes)
    full = jnp.where(mask, g, jnp.zeros((), g.dtype))
    return jnp.broadcast_to(full, view).reshape(shape), None


take_features.defvjp(_take_features_fwd, _take_features_bwd)


def take_channels(v, offset, stride: int):
    """The kept channels of a sample from a per-channel (C,) vector: v[offset::stride] -> (C // stride,)."""
    if stride == 1:
        return v
    return jax.lax.dynamic_slice_in_dim(v.reshape(-1, stride), offset, 1, axis=1)[:, 0]


def sample_features(arrays, key, num_features):
    """The same random sample of at least ``num_features`` feature columns of every (B, ...) array of one shape.

    Returns a tuple of (B, K) arrays, K = F / prod(strides) (see :func:`draw_feature_sample`).
    """
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays):
        raise ValueError(f"arrays must share one shape; got {[a.shape for a in arrays]}")
    offsets, strides = draw_feature_sample(shape[1:], key, num_features)
    return tuple(take_features(a, offsets, strides).reshape(shape[0], -1) for a in arrays)


def correlation_gap(x, y, eps=1e-5, *, num_features=None, key=None):
    """D = corr(y) - corr(x) (docs/method.md §4): how much the transform x -> y changed the batch correlations.

    Args:
      x: (B, ...) quantizer input (the BatchNorm output).
      y: same shape: the aligned, unrounded output (official code) or the rounded output (Theorem 3.2's Q(X)).
      num_features, key: if given and smaller than the feature count F, an unbiased estimate from a random
        sample of at least that many feature columns covering every channel (see :func:`draw_feature_sample`),
        costing about num_features/F of the exact term.
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
