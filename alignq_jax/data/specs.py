"""Dataset specifications: shapes, classes, normalisation and augmentation per dataset.

Specification: docs/method.md §8 (data recipes):

* CIFAR-10: RandomCrop(32, padding 4) + RandomHorizontalFlip for training; Normalize mean
  (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010); test split: normalise only.
* SVHN (``train`` split only, no ``extra``): no augmentation; Normalize (0.5, 0.5, 0.5)/(0.5, 0.5, 0.5).
* MNIST / Fashion-MNIST (digits recipes): Normalize mean 0.5, std 0.5; no augmentation.
* ``digits`` (scikit-learn's real 8x8 digits, the offline demo): normalised with the training split's own
  mean/std (computed at load time).

Means and standard deviations are in units of [0, 1] pixel intensities (as torchvision's ``ToTensor``).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Mapping

AUGMENTATIONS = ("none", "crop_flip", "flip")


class DataNotFoundError(RuntimeError):
    """The requested data set is not available locally (nothing was downloaded).

    Raised up front (in well under a second) instead of letting TFDS try to download; the message says how
    to obtain the data.
    """


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static description of a supported data set (docs/method.md §8).

    Attributes:
      name: canonical name (the TFDS name where there is one).
      image_shape: (H, W, C) of one image.
      num_classes: number of labels; labels are ints in [0, num_classes).
      mean, std: per-channel normalisation on [0, 1] pixels; ``None`` = computed from the training split.
      augment: training augmentation, one of ``AUGMENTATIONS``.
      pad: zero padding for the random crop (``augment == "crop_flip"``).
      train_split, test_split: TFDS split names.
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    augment: str = "none"
    pad: int = 4
    train_split: str = "train"
    test_split: str = "test"


DATASET_SPECS: Mapping[str, DatasetSpec] = types.MappingProxyType(
    {
        "cifar10": DatasetSpec(
            "cifar10", (32, 32, 3), 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), "crop_flip", 4
        ),
        "svhn_cropped": DatasetSpec("svhn_cropped", (32, 32, 3), 10, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        "mnist": DatasetSpec("mnist", (28, 28, 1), 10, (0.5,), (0.5,)),
        "fashion_mnist": DatasetSpec("fashion_mnist", (28, 28, 1), 10, (0.5,), (0.5,)),
        "digits": DatasetSpec("digits", (8, 8, 1), 10, None, None),
    }
)

_ALIASES = types.MappingProxyType(
    {"cifar-10": "cifar10", "svhn": "svhn_cropped", "fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist"}
)


def canonical_name(name: str) -> str:
    """Maps a user-facing data set name (case-insensitive, a few aliases such as ``svhn``) to its spec key.

    Raises:
      ValueError: for an unknown name (the message lists the supported ones).
    """
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key).replace("-", "_")
    if key not in DATASET_SPECS:
        raise ValueError(f"unknown dataset {name!r}; supported: {', '.join(DATASET_SPECS)} (aliases: {', '.join(_ALIASES)})")
    return key


def get_spec(name: str) -> DatasetSpec:
    """Returns the ``DatasetSpec`` of a supported data set (docs/method.md §8)."""
    return DATASET_SPECS[canonical_name(name)]
