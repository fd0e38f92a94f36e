"""``load_dataset``: one entry point that picks local files, TFDS, or the offline digits.

Specification: docs/method.md §8 (data sets and recipes of the experiments).
"""

from __future__ import annotations

import os

from alignq_jax.data.dataset import ArrayDataset
from alignq_jax.data.local_files import (
    find_cifar10_python,
    find_idx_dir,
    find_svhn_mat,
    load_cifar10_python,
    load_idx,
    load_svhn_mat,
)
from alignq_jax.data.offline import load_digits_dataset
from alignq_jax.data.specs import canonical_name
from alignq_jax.data.tfds_source import load_tfds


def find_local_files(name: str, data_dir: str | os.PathLike) -> str | None:
    """Which local-file format of ``name`` is present at ``data_dir`` (``"cifar10_python"``, ``"idx"``,
    ``"svhn_mat"``) or None."""
    key = canonical_name(name)
    if key == "cifar10" and find_cifar10_python(data_dir) is not None:
        return "cifar10_python"
    if key in ("mnist", "fashion_mnist") and find_idx_dir(data_dir, key) is not None:
        return "idx"
    if key == "svhn_cropped" and find_svhn_mat(data_dir) is not None:
        return "svhn_mat"
    return None


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = False) -> ArrayDataset:
    """Loads ``name`` into an ``ArrayDataset`` with the recipe of docs/method.md §8.

    Order: ``digits`` comes from scikit-learn; otherwise, if ``data_dir`` holds the data set's original files
    (CIFAR-10 python batches, MNIST/Fashion-MNIST IDX files, SVHN .mat files) they are read; otherwise the
    prepared TFDS data under ``data_dir`` (TFDS defaults when None) is read; if that is missing too,
    ``DataNotFoundError`` is raised at once (or, with ``download=True``, TFDS downloads and prepares it).

    Args:
      name: ``cifar10``, ``svhn_cropped`` (``svhn``), ``mnist``, ``fashion_mnist`` or ``digits``.
      data_dir: folder with local files or a TFDS data dir.
      download: allow TFDS to download (needs internet).

    Raises:
      ValueError: unknown name; DataNotFoundError: no data found and ``download`` is False.
    """
    key = canonical_name(name)
    if key == "digits":
        return load_digits_dataset()
    if data_dir is not None:
        kind = find_local_files(key, data_dir)
        if kind == "cifar10_python":
            return load_cifar10_python(data_dir)
        if kind == "idx":
            return load_idx(data_dir, key)
        if kind == "svhn_mat":
            return load_svhn_mat(data_dir)
    return load_tfds(key, data_dir, download=download)
