"""Test-time distribution shifts for out-of-distribution evaluation (brightness, contrast, blend).

Each shift maps uint8 (N, H, W, C) test images to shifted uint8 images; the model still normalises with the
training mean/std, so the shift reaches it as it would in deployment.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def _check_uint8(images):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"shifts take uint8 images of shape (N, H, W, C); got {images.dtype} {images.shape}")
    return images.astype(np.float32)


def brightness(images, delta: float):
    """Adds ``delta`` (a fraction of the full 0..255 range) to every pixel, clipped."""
    x = _check_uint8(images)
    return np.clip(np.rint(x + 255.0 * delta), 0, 255).astype(np.uint8)


def contrast(images, factor: float):
    """Scales every image's pixels about that image's mean by ``factor``."""
    x = _check_uint8(images)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return np.clip(np.rint(mean + factor * (x - mean)), 0, 255).astype(np.uint8)


def blend(images, alpha: float, seed: int = 0):
    """(1 - alpha) * image + alpha * another test image (a fixed random pairing)."""
    x = _check_uint8(images)
    other = x[np.random.default_rng(seed).permutation(len(x))]
    return np.clip(np.rint((1.0 - alpha) * x + alpha * other), 0, 255).astype(np.uint8)


DEFAULT_SHIFTS = {
    "brightness+0.2": lambda x: brightness(x, 0.2),
    "contrast x0.5": lambda x: contrast(x, 0.5),
    "blend 0.3": lambda x: blend(x, 0.3),
}


def shifted_test_sets(dataset, shifts=None) -> dict:
    """{"clean": dataset, name: dataset with shifted test images, ...} for an ``ArrayDataset`` of uint8 images."""
    shifts = DEFAULT_SHIFTS if shifts is None else shifts
    out = {"clean": dataset}
    for name, fn in shifts.items():
        out[name] = dataclasses.replace(dataset, test_images=fn(dataset.test_images))
    return out
