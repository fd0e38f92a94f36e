"""Data layer (docs/design.md): in-memory data sets, fixed-shape numpy batches, the paper's recipes.

Reference: docs/method.md §8. Every loader returns an ``ArrayDataset`` (or, for JPEG folders such as Office-31,
an ``ImageFolderDataset`` decoding in grain workers); its ``train_batches`` / ``test_batches`` yield
``{"image": (B, H, W, C) float32, "label": (B,) int32, "mask": (B,) bool}``. Domain adaptation: the offline digit
shifts (``digit_shift_task``), Office-31 (``office31_task``), and ``PairedDomains`` for source/target batches.

    from alignq_jax.data import load_dataset
    ds = load_dataset("cifar10", data_dir="~/data")          # local files or prepared TFDS data, no network
    for batch in ds.train_batches(128, seed=0, epoch=epoch):  # shuffled, crop+flip, normalised
        ...
"""

from alignq_jax.data.augment import augment_batch, crop_flip, normalize, random_crop_flip
from alignq_jax.data.batching import epoch_indices, iterate_batches, num_batches, prefetch_in_thread
from alignq_jax.data.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    corrupt_test_split,
    corrupted_test_sets,
    load_cifar10_corrupted,
    mean_corruption_accuracy,
)
from alignq_jax.data.dataset import ArrayDataset, channel_stats
from alignq_jax.data.digit_domains import TASK_NAMES as DIGIT_SHIFT_TASKS, DomainTask, digit_shift_task
from alignq_jax.data.image_folders import ImageFolderDataset, office31_task
from alignq_jax.data.load import find_local_files, load_dataset
from alignq_jax.data.local_files import load_cifar10_python, load_idx, load_svhn_mat, read_idx
from alignq_jax.data.offline import load_digits_dataset
from alignq_jax.data.paired import PairedDomains
from alignq_jax.data.specs import DATASET_SPECS, DataNotFoundError, DatasetSpec, canonical_name, get_spec
from alignq_jax.data.tfds_source import how_to_get, load_tfds, tfds_is_prepared

__all__ = [
    "ArrayDataset",
    "DIGIT_SHIFT_TASKS",
    "DomainTask",
    "ImageFolderDataset",
    "PairedDomains",
    "digit_shift_task",
    "office31_task",
    "CORRUPTIONS",
    "DATASET_SPECS",
    "DataNotFoundError",
    "DatasetSpec",
    "SEVERITIES",
    "augment_batch",
    "canonical_name",
    "channel_stats",
    "corrupt_test_split",
    "corrupted_test_sets",
    "crop_flip",
    "epoch_indices",
    "find_local_files",
    "get_spec",
    "how_to_get",
    "iterate_batches",
    "load_cifar10_corrupted",
    "load_cifar10_python",
    "load_dataset",
    "load_digits_dataset",
    "load_idx",
    "load_svhn_mat",
    "load_tfds",
    "mean_corruption_accuracy",
    "normalize",
    "num_batches",
    "prefetch_in_thread",
    "random_crop_flip",
    "read_idx",
    "tfds_is_prepared",
]
