"""Offline data: scikit-learn's real 8x8 handwritten digits (1,797 images, shipped inside scikit-learn).

This is the data set of the no-network demo (docs/design.md: a laptop user sees results on real data with no
network). It has no official split, so a fixed stratified 75/25 split (``random_state=0``) is used; images are normalised with the
training split's own mean/std (the recipe table of docs/method.md §8 has no digits-8x8 row; this mirrors
its "normalise only, no augmentation" digits recipe).
"""

from __future__ import annotations

import numpy as np

from alignq_jax.data.dataset import ArrayDataset
from alignq_jax.data.specs import DataNotFoundError, get_spec

DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0


def load_digits_dataset(*, test_fraction: float = DIGITS_TEST_FRACTION, seed: int = DIGITS_SPLIT_SEED) -> ArrayDataset:
    """scikit-learn ``load_digits`` as an ``ArrayDataset`` (no network, no files needed).

    The 0..16 intensities are scaled to uint8 0..255 (``round(v * 255 / 16)``); the split is
    ``train_test_split(..., test_size=test_fraction, random_state=seed, stratify=labels)``, so it is the same
    on every machine.

    Returns:
      ``ArrayDataset`` named ``digits``: images (N, 8, 8, 1) uint8, labels int32 in 0..9, N_train + N_test =
      1797 (1347 + 450 by default), mean/std from the training images, no augmentation.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise DataNotFoundError(
            f"the digits data set ships with scikit-learn, which is not installed ({e}): "
            "pip install 'alignq_jax[demo]' (or scikit-learn)"
        ) from None

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int32)
    idx_train, idx_test = train_test_split(
        np.arange(labels.shape[0]), test_size=test_fraction, random_state=seed, stratify=labels
    )
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    spec = get_spec("digits")
    return ArrayDataset.from_spec(spec, images[idx_train], labels[idx_train], images[idx_test], labels[idx_test])
