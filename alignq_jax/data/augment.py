"""Vectorised host-side (numpy) augmentation and normalisation of whole NHWC batches.

Specification: docs/method.md §8: CIFAR training uses torchvision's RandomCrop(32, padding=4) (zero
padding, uniform offsets in [0, 2*pad]) followed by RandomHorizontalFlip(p=0.5); every split is then normalised
as (x / 255 - mean) / std. Padding happens on raw pixels, so padded pixels normalise to -mean / std exactly as in
torchvision.

The crop and the flip are one fancy-indexing gather over a once-padded batch (no per-image Python loop).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from alignq_jax.data.specs import AUGMENTATIONS


def _check_batch(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be a batch of shape (N, H, W, C), got shape {images.shape}")
    return images


def crop_flip(
    images: np.ndarray, offset_y: np.ndarray, offset_x: np.ndarray, flip: np.ndarray, *, pad: int = 4
) -> np.ndarray:
    """Deterministic zero-pad, crop and optional horizontal flip of a batch (docs/method.md §8).

    Image i becomes ``padded[i, oy:oy+H, ox:ox+W]`` (flipped left-right when ``flip[i]``), where ``padded``
    is the batch zero-padded by ``pad`` pixels on each side of H and W. ``offset == pad`` with no flip is the
    identity.

    Args:
      images: (N, H, W, C) array of any dtype (uint8 pixels in the pipeline).
      offset_y, offset_x: (N,) ints in [0, 2 * pad].
      flip: (N,) bools.
      pad: padding in pixels (>= 0).

    Returns:
      (N, H, W, C) array, same dtype as ``images``.
    """
    images = _check_batch(images)
    n, h, w, _ = images.shape
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    oy = np.asarray(offset_y, dtype=np.intp).reshape(-1)
    ox = np.asarray(offset_x, dtype=np.intp).reshape(-1)
    fl = np.asarray(flip, dtype=bool).reshape(-1)
    if not (oy.shape == ox.shape == fl.shape == (n,)):
        raise ValueError(
            f"offset_y, offset_x and flip must each have shape ({n},), got {oy.shape}, {ox.shape}, {fl.shape}"
        )
    if n and (oy.min() < 0 or ox.min() < 0 or oy.max() > 2 * pad or ox.max() > 2 * pad):
        raise ValueError(f"crop offsets must lie in [0, {2 * pad}] for pad={pad}")
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else images
    ar_h = np.arange(h)
    ar_w = np.arange(w)
    rows = oy[:, None] + ar_h[None, :]  # (N, H)
    cols = ox[:, None] + np.where(fl[:, None], ar_w[::-1][None, :], ar_w[None, :])  # (N, W)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_crop_flip(
    images: np.ndarray, rng: np.random.Generator, *, pad: int = 4, crop: bool = True, flip: bool = True
) -> np.ndarray:
    """RandomCrop(H, padding=pad) + RandomHorizontalFlip(0.5) on a whole batch (docs/method.md §8).

    Args:
      images: (N, H, W, C).
      rng: numpy Generator; the result is a deterministic function of its state.
      pad: zero padding of the crop.
      crop, flip: switch the two parts on/off.

    Returns:
      (N, H, W, C), same dtype.
    """
    images = _check_batch(images)
    n = images.shape[0]
    if crop:
        oy = rng.integers(0, 2 * pad + 1, size=n)
        ox = rng.integers(0, 2 * pad + 1, size=n)
    else:
        oy = ox = np.full(n, pad)
    fl = rng.random(n) < 0.5 if flip else np.zeros(n, dtype=bool)
    return crop_flip(images, oy, ox, fl, pad=pad)


def augment_batch(images: np.ndarray, rng: np.random.Generator, mode: str, *, pad: int = 4) -> np.ndarray:
    """Applies a named training augmentation to an (N, H, W, C) batch.

    ``mode``: ``"none"`` (returned unchanged), ``"crop_flip"`` (CIFAR recipe, docs/method.md §8) or
    ``"flip"`` (horizontal flip only).
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {mode!r}")
    if mode == "none":
        return _check_batch(images)
    if mode == "flip":
        return random_crop_flip(images, rng, pad=0, crop=False, flip=True)
    return random_crop_flip(images, rng, pad=pad)


def normalize(
    images: np.ndarray, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> np.ndarray:
    """(x / 255 - mean) / std as float32 (torchvision ToTensor + Normalize; docs/method.md §8).

    Args:
      images: (..., C) uint8 pixels in [0, 255], or floats already in [0, 1] (not divided by 255 again).
      mean, std: per-channel (length C or 1) on the [0, 1] scale; ``None`` skips that step (pixels in [0, 1]).

    Returns:
      float32 array of the same shape.
    """
    images = np.asarray(images)
    scale = 1.0 / 255.0 if images.dtype == np.uint8 else 1.0
    mean_arr = np.zeros(1, np.float64) if mean is None else np.asarray(mean, np.float64).reshape(-1)
    std_arr = np.ones(1, np.float64) if std is None else np.asarray(std, np.float64).reshape(-1)
    channels = images.shape[-1] if images.ndim else 1
    for label, arr in (("mean", mean_arr), ("std", std_arr)):
        if arr.size not in (1, channels):
            raise ValueError(f"{label} must have 1 or {channels} (channel count) entries, got {arr.size}")
    if np.any(std_arr <= 0):
        raise ValueError(f"std must be positive, got {std_arr.tolist()}")
    out = images.astype(np.float32)
    # One multiply-add: x * scale / std - mean / std.
    out *= (scale / std_arr).astype(np.float32)
    out -= (mean_arr / std_arr).astype(np.float32)
    return out
