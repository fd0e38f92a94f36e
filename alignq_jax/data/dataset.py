"""``ArrayDataset``: an in-memory train/test image classification data set, the object the training loop eats.

Every loader in ``alignq_jax.data`` returns one; users with their own numpy arrays construct it directly.
Reference: docs/method.md §8 (recipes: normalisation, augmentation, evaluation on the full test
split).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from alignq_jax.data.batching import Batch, iterate_batches, num_batches
from alignq_jax.data.specs import AUGMENTATIONS, DatasetSpec


def _validate_split(images, labels, num_classes: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4:
        hint = " (add a channel axis, e.g. images[..., None])" if images.ndim == 3 else ""
        raise ValueError(f"{split}_images must have shape (N, H, W, C), got shape {images.shape}{hint}")
    if images.shape[0] == 0:
        raise ValueError(f"{split}_images is empty")
    if images.dtype == np.uint8:
        pass
    elif np.issubdtype(images.dtype, np.floating):
        images = images.astype(np.float32, copy=False)
        lo, hi = float(images.min()), float(images.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"float {split}_images must be pixel intensities in [0, 1], got values in [{lo}, {hi}]; "
                "pass uint8 pixels (0..255) or divide by 255 (normalisation is done by the pipeline)"
            )
    else:
        raise ValueError(f"{split}_images must be uint8 (0..255) or float in [0, 1], got dtype {images.dtype}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(f"{split}_labels must have shape (N,), got shape {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{split}_images and {split}_labels differ in length: {images.shape[0]} images vs "
            f"{labels.shape[0]} labels"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{split}_labels must be integers in [0, {num_classes}), got dtype {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"{split}_labels must lie in [0, {num_classes}) (num_classes={num_classes}), got values in [{lo}, {hi}]"
        )
    return images, labels.astype(np.int32, copy=False)


def _per_channel(values, channels: int, what: str) -> tuple[float, ...]:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, channels)
    if arr.size != channels:
        raise ValueError(f"{what} must have 1 or {channels} (channel count) entries, got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must be finite, got {arr.tolist()}")
    return tuple(float(v) for v in arr)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of (N, H, W, C) images on the [0, 1] scale (uint8 is divided by 255).

    Computed in float64 one channel at a time (no full float copy of the data set).
    """
    images = np.asarray(images)
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    means, stds = [], []
    for c in range(images.shape[-1]):
        ch = images[..., c].astype(np.float64) / scale
        means.append(float(ch.mean()))
        stds.append(float(max(ch.std(), 1e-6)))
    return tuple(means), tuple(stds)


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Train and test splits held as numpy arrays, with the recipe that turns them into batches.

    Args:
      train_images, test_images: (N, H, W, C) uint8 pixels (0..255) or float pixels in [0, 1]; stored as
        uint8 or float32.
      train_labels, test_labels: (N,) integers in [0, num_classes) ((N, 1) is accepted); stored as int32.
      num_classes: number of classes.
      name: free-form name (used in results and error messages).
      mean, std: per-channel normalisation on [0, 1] pixels (length C or 1); ``None`` computes them from the
        training images (``channel_stats``).
      augment: training augmentation, ``"none"``, ``"crop_flip"`` (random crop with ``pad`` zero padding +
        horizontal flip, the CIFAR recipe of docs/method.md §8) or ``"flip"``.
      pad: crop padding.

    Raises:
      ValueError: wrong ndim, mismatched lengths, non-integer or out-of-range labels, bad dtype or range,
        different image shapes between the splits, bad mean/std/augment.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    name: str = "custom"
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    augment: str = "none"
    pad: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        set_("num_classes", int(self.num_classes))
        tr_x, tr_y = _validate_split(self.train_images, self.train_labels, self.num_classes, "train")
        te_x, te_y = _validate_split(self.test_images, self.test_labels, self.num_classes, "test")
        if tr_x.shape[1:] != te_x.shape[1:]:
            raise ValueError(f"train and test images differ in shape: {tr_x.shape[1:]} vs {te_x.shape[1:]}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if isinstance(self.pad, bool) or not isinstance(self.pad, (int, np.integer)) or self.pad < 0:
            raise ValueError(f"pad must be a non-negative integer, got {self.pad!r}")
        channels = tr_x.shape[-1]
        mean, std = self.mean, self.std
        if mean is None or std is None:
            data_mean, data_std = channel_stats(tr_x)
            mean = data_mean if mean is None else mean
            std = data_std if std is None else std
        mean = _per_channel(mean, channels, "mean")
        std = _per_channel(std, channels, "std")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}")
        for key, value in (
            ("train_images", tr_x), ("train_labels", tr_y), ("test_images", te_x), ("test_labels", te_y),
            ("mean", mean), ("std", std), ("pad", int(self.pad)),
        ):
            set_(key, value)

    @classmethod
    def from_spec(
        cls, spec: DatasetSpec, train_images, train_labels, test_images, test_labels
    ) -> "ArrayDataset":
        """Builds the data set with a ``DatasetSpec``'s classes, normalisation and augmentation (docs/method.md §8)."""
        ds = cls(
            train_images, train_labels, test_images, test_labels, spec.num_classes, name=spec.name,
            mean=spec.mean, std=spec.std, augment=spec.augment, pad=spec.pad,
        )
        if ds.image_shape != tuple(spec.image_shape):
            raise ValueError(f"{spec.name}: expected images of shape {spec.image_shape}, got {ds.image_shape}")
        return ds

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        return tuple(int(d) for d in self.train_images.shape[1:])

    @property
    def num_train(self) -> int:
        return int(self.train_images.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_images.shape[0])

    def steps_per_epoch(self, batch_size: int, *, num_shards: int = 1) -> int:
        """Training batches per epoch and shard (``drop_last``), ``batch_size`` rows per shard: the whole global
        batches of ``num_shards * batch_size`` rows. ``steps_per_epoch(B)`` equals
        ``steps_per_epoch(B // P, num_shards=P)`` for any P dividing B."""
        return num_batches(self.num_train, batch_size, drop_last=True, num_shards=num_shards)

    def eval_steps(self, batch_size: int, *, num_shards: int = 1) -> int:
        """Evaluation batches per shard (last batch padded and masked)."""
        return num_batches(self.num_test, batch_size, drop_last=False, num_shards=num_shards)

    def train_batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        augment: bool = True,
        normalise: bool = True,
        prefetch: int = 2,
        num_shards: int = 1,
        shard_index: int = 0,
    ) -> Iterator[Batch]:
        """One shuffled, augmented training epoch of full batches (``iterate_batches``, drop_last=True).

        Yields ``{"image": (B, H, W, C) float32, "label": (B,) int32, "mask": (B,) bool (all True)}``;
        deterministic in ``(seed, epoch)``. ``augment=False`` switches the data set's augmentation off. With
        ``num_shards`` processes, B = ``batch_size`` is one process's rows: the shards of batch b put together in
        shard order are the one-shard batch b of ``num_shards * batch_size`` rows (see ``epoch_indices``).
        """
        return iterate_batches(
            self.train_images, self.train_labels, batch_size, shuffle=True, seed=seed, epoch=epoch,
            augment=self.augment if augment else "none", pad=self.pad, mean=self.mean, std=self.std,
            normalise=normalise, drop_last=True, prefetch=prefetch, num_shards=num_shards, shard_index=shard_index,
        )

    def test_batches(
        self, batch_size: int, *, normalise: bool = True, prefetch: int = 2, num_shards: int = 1, shard_index: int = 0
    ) -> Iterator[Batch]:
        """The whole test split in order, normalised only; the last batch is padded, ``mask`` marks real rows."""
        return iterate_batches(
            self.test_images, self.test_labels, batch_size, shuffle=False, augment="none", mean=self.mean,
            std=self.std, normalise=normalise, drop_last=False, prefetch=prefetch, num_shards=num_shards,
            shard_index=shard_index,
        )

    def take(self, num_train: int | None = None, num_test: int | None = None) -> "ArrayDataset":
        """The first ``num_train`` / ``num_test`` examples (``None``: all), keeping name and recipe (quick runs)."""
        return dataclasses.replace(
            self,
            train_images=self.train_images[:num_train], train_labels=self.train_labels[:num_train],
            test_images=self.test_images[:num_test], test_labels=self.test_labels[:num_test],
        )

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, train={self.num_train}, test={self.num_test}, "
            f"image_shape={self.image_shape}, dtype={self.train_images.dtype}, num_classes={self.num_classes}, "
            f"augment={self.augment!r})"
        )
