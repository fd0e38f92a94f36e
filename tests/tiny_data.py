"""A tiny, easy two-class image data set shared by the training-loop tests."""

import numpy as np

from alignq_jax.data import ArrayDataset


def tiny_dataset(n_train=96, n_test=40, seed=0) -> ArrayDataset:
    """Two easy classes: bright vs dark 8x8 images with noise."""
    rng = np.random.default_rng(seed)

    def make(n):
        labels = rng.integers(0, 2, n)
        images = np.clip(rng.normal(80 + 100 * labels[:, None, None, None], 40, (n, 8, 8, 1)), 0, 255)
        return images.astype(np.uint8), labels.astype(np.int32)

    (xtr, ytr), (xte, yte) = make(n_train), make(n_test)
    return ArrayDataset(xtr, ytr, xte, yte, num_classes=2, name="tiny")
