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


def write_svhn_mat(folder, n_train=32, n_test=16, seed=0):
    """Writes ``train_32x32.mat`` and ``test_32x32.mat`` into ``folder`` in SVHN's real layout (X: uint8
    (32, 32, 3, N), y: (N, 1) with 10 for the digit 0) from random pixels and labels; returns ``folder``."""
    from pathlib import Path

    from scipy.io import savemat

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        labels = rng.integers(1, 11, n)  # 1..10, 10 = the digit 0
        savemat(folder / f"{split}_32x32.mat", {"X": images, "y": labels[:, None]})
    return folder
