"""Image-folder data sets (Office-31 layout) decoded in grain worker processes, for domain adaptation.

Layout: ``<root>/<domain>/images/<class>/<file>`` (Office-31: domains ``amazon``, ``dslr``, ``webcam``; 31 classes).
Classes are the sorted class-folder names (the same label indices as torchvision's ``ImageFolder``); files are
``*.jpg``, ``*.jpeg``, ``*.png`` (any case), sorted by name; other files are ignored.

    from alignq_jax.data.image_folders import office31_task
    task = office31_task("~/data/office31", "amazon", "webcam", protocol="paper", worker_count=4)
    task.source.train_batches(32, seed=0, epoch=e)   # labelled source images, random crop + flip
    task.target.train_batches(32, seed=0, epoch=e)   # target images; their labels are never used for training
    task.target.test_batches(64)                      # the target evaluation split, padded + masked

Protocols (``office31_task``):
  ``"paper"``: the official AlignQ code's. Every domain is split per class into train (``int(0.8 * n)`` files of a
    class of n) and test (the rest) with ``np.random.RandomState(split_seed).choice`` (seed 1 there), re-seeded for
    every class. Training uses the source's train part (labelled) and the target's train part (unlabelled);
    accuracy is measured on the target's held-out test part. Non-standard (docs/method.md, quirk 15); kept for
    comparability with the paper's tables.
  ``"full"``: standard unsupervised domain adaptation. All source images (labelled), all target images (unlabelled)
    for training, and all target images for evaluation.

Transforms (``transform``; sizes for ``image_size`` S = 224 and ``resize_size`` R = 256; PIL bilinear resize, as
torchvision on PIL images):
  ``"alignq"`` (default; the official AlignQ Office code, docs/method.md §8): train Resize((R, R)) (aspect ratio not
    kept) -> RandomCrop(S) -> RandomHorizontalFlip; test Resize((R, R)) -> CenterCrop(S).
  ``"dsan"`` (the official DSAN code): the same training transform; test Resize((S, S)), no crop.
  ``"shorter_side"`` (the usual ImageNet resize): train Resize(R) of the shorter side, aspect ratio kept ->
    RandomCrop(S) -> flip; test Resize(R) -> CenterCrop(S).
Then ToTensor + Normalize with the ImageNet mean and std (on [0, 1] pixels).

Randomness: the shuffle order is a pure function of ``(seed, epoch)`` (``epoch_indices``) and the crop offsets and
flip of an image a pure function of ``(seed, epoch, its index in the split)``, so batches do not depend on the
number of workers or of shards.

Workers: grain's ``mp_prefetch`` spawns ``worker_count`` processes per pipeline, each importing this package (and so
JAX: seconds). A data set keeps its training and its evaluation pipeline alive between calls, so consecutive epochs
reuse the workers, which decode ahead across the epoch boundary (``ImageFolderDataset``); a task's source and target
data sets have their own, so up to four pipelines of ``worker_count`` processes run during adaptation. Programs that
use workers must guard their entry point with ``if __name__ == "__main__":`` (spawned processes re-import it).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from alignq_jax.data.batching import Batch, _check_nonneg_int, epoch_indices, num_batches
from alignq_jax.data.specs import DataNotFoundError

OFFICE31_DOMAINS = ("amazon", "dslr", "webcam")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRANSFORMS = ("alignq", "dsan", "shorter_side")
PROTOCOLS = ("paper", "full")


# ------------------------------------------------------------------------------------------------ file lists


@dataclasses.dataclass(frozen=True, eq=False)
class ImageFiles:
    """An ordered list of labelled image files.

    Attributes:
      paths: N file paths (str).
      labels: (N,) int32 class indices into ``classes``.
      classes: the class names, index = label.
      name: e.g. ``"amazon/train"`` (used in error messages and reprs).
    """

    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, np.int32).reshape(-1)
        if labels.shape[0] != len(self.paths):
            raise ValueError(f"{self.name}: {len(self.paths)} paths but {labels.shape[0]} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise ValueError(f"{self.name}: labels must lie in [0, {len(self.classes)}), got [{labels.min()}, {labels.max()}]")
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "classes", tuple(self.classes))

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices, name: str) -> "ImageFiles":
        """The files at ``indices`` (in that order) under a new name."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        return ImageFiles(tuple(self.paths[i] for i in indices), self.labels[indices], self.classes, name)

    def __repr__(self) -> str:
        return f"ImageFiles(name={self.name!r}, files={len(self)}, classes={len(self.classes)})"


def _domain_dir(root, domain: str, images_subdir: str) -> Path:
    root_path = Path(os.path.expanduser(str(root)))
    layout = f"<root>/<domain>/{images_subdir + '/' if images_subdir else ''}<class>/<image>.jpg"
    if not root_path.is_dir():
        raise DataNotFoundError(f"image folder root {str(root_path)!r} does not exist or is not a directory "
                                f"(expected the layout {layout})")
    path = root_path / domain / images_subdir if images_subdir else root_path / domain
    if not path.is_dir():
        found = sorted(p.name for p in root_path.iterdir() if p.is_dir())
        raise DataNotFoundError(f"domain {domain!r}: no folder {str(path)!r} (expected the layout {layout}; "
                                f"folders under {str(root_path)!r}: {found})")
    return path


def _class_folders(path: Path) -> tuple[str, ...]:
    classes = tuple(sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not classes:
        raise ValueError(f"no class folders in {str(path)!r}")
    return classes


def _class_difference(name_a: str, a: Sequence[str], name_b: str, b: Sequence[str]) -> str:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    return (f"{name_a} and {name_b} have different class folders "
            f"(only in {name_a}: {only_a}; only in {name_b}: {only_b}); every domain must have the same classes")


def find_classes(root, domains: Sequence[str], *, images_subdir: str = "images") -> tuple[str, ...]:
    """The sorted class-folder names shared by ``domains``.

    Raises:
      DataNotFoundError: ``root`` or a domain folder is missing.
      ValueError: a domain has no class folders, or two domains have different class lists (the message names the
        classes found in only one of them).
    """
    domains = list(domains)
    if not domains:
        raise ValueError("domains must name at least one domain folder")
    first = _class_folders(_domain_dir(root, domains[0], images_subdir))
    for domain in domains[1:]:
        other = _class_folders(_domain_dir(root, domain, images_subdir))
        if other != first:
            raise ValueError(_class_difference(f"domain {domains[0]!r}", first, f"domain {domain!r}", other))
    return first


def image_folder_domain(
    root, domain: str, *, classes: Sequence[str] | None = None, images_subdir: str = "images"
) -> ImageFiles:
    """All image files of one domain, ``<root>/<domain>/<images_subdir>/<class>/*``, sorted by class then name.

    Args:
      root: the data set folder.
      domain: a domain folder name (Office-31: ``amazon``, ``dslr``, ``webcam``).
      classes: the expected class list (e.g. from ``find_classes``); ``None``: this domain's sorted class folders.
      images_subdir: the folder between domain and classes (``"images"`` in Office-31; ``""`` for none).

    Returns:
      ``ImageFiles`` named ``domain`` with labels in [0, len(classes)).

    Raises:
      DataNotFoundError: ``root`` or the domain folder is missing.
      ValueError: the class folders differ from ``classes``; a class folder holds no image file.
    """
    path = _domain_dir(root, domain, images_subdir)
    found = _class_folders(path)
    if classes is not None and tuple(classes) != found:
        raise ValueError(_class_difference(f"domain {domain!r}", found, "the expected class list", tuple(classes)))
    paths, labels = [], []
    for label, name in enumerate(found):
        files = sorted(p for p in (path / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"class folder {str(path / name)!r} holds no image file ({'/'.join(IMAGE_EXTENSIONS)})")
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    return ImageFiles(tuple(paths), np.asarray(labels, np.int32), found, domain)


def split_per_class(files: ImageFiles, *, train_fraction: float = 0.8, seed: int = 1) -> tuple[ImageFiles, ImageFiles]:
    """Stratified train/test split, the official AlignQ Office split rule (docs/method.md §8).

    For every class with n files (in ``files``' order): ``int(n * train_fraction)`` train files drawn by
    ``np.random.RandomState(seed).choice(n, ., replace=False)``, the generator re-seeded for every class as there;
    the rest is test. (The official script lists files in directory order, which depends on the file system, so the
    same seed does not pick the same files there; here the order is sorted by name.) Both parts keep ``files``'
    order.

    Returns:
      (train, test) ``ImageFiles``, disjoint, together all of ``files``.
    """
    if not 0.0 < float(train_fraction) < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    seed = _check_nonneg_int(seed, "seed")
    train_mask = np.zeros(len(files), bool)
    for c in range(len(files.classes)):
        idx = np.flatnonzero(files.labels == c)
        n_train = int(len(idx) * train_fraction)
        train_mask[idx[np.random.RandomState(seed).choice(len(idx), n_train, replace=False)]] = True
    return (files.subset(np.flatnonzero(train_mask), f"{files.name}/train"),
            files.subset(np.flatnonzero(~train_mask), f"{files.name}/test"))


# ------------------------------------------------------------------------------------------------ decoding


def _load_rgb(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image file {path!r}: {exc}") from exc


def _shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``size`` and the longer truncated, as torchvision's Resize(int)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def decode_image(
    path: str,
    *,
    image_size: int = 224,
    resize_size: int = 256,
    transform: str = "alignq",
    crop_rng: np.random.Generator | None = None,
) -> np.ndarray:
    """One image file through the resize/crop/flip transform (module docstring), before normalisation.

    Args:
      path: an image file PIL can read (converted to RGB).
      image_size, resize_size: S and R.
      transform: ``"alignq"``, ``"dsan"`` or ``"shorter_side"``.
      crop_rng: ``None``: the test transform; a generator: the training transform, drawing the crop's top offset,
        left offset (``integers``, inclusive of the last valid offset) and the flip (``random() < 0.5``) in that order.

    Returns:
      (S, S, 3) uint8.

    Raises:
      ValueError: the file cannot be read or decoded (the message names it); bad transform or sizes.
    """
    from PIL import Image

    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    if not 1 <= image_size <= resize_size:
        raise ValueError(f"need 1 <= image_size <= resize_size, got image_size={image_size}, resize_size={resize_size}")
    img = _load_rgb(path)
    s, r = image_size, resize_size
    bilinear = Image.Resampling.BILINEAR
    if transform == "dsan" and crop_rng is None:
        return np.asarray(img.resize((s, s), bilinear))
    size = (r, r) if transform in ("alignq", "dsan") else _shorter_side_size(img.width, img.height, r)
    x = np.asarray(img.resize(size, bilinear))
    h, w = x.shape[:2]
    if crop_rng is not None:
        top, left = int(crop_rng.integers(0, h - s + 1)), int(crop_rng.integers(0, w - s + 1))
        flip = bool(crop_rng.random() < 0.5)
    else:  # torchvision CenterCrop's offsets
        top, left, flip = int(round((h - s) / 2.0)), int(round((w - s) / 2.0)), False
    x = x[top : top + s, left : left + s]
    return np.ascontiguousarray(x[:, ::-1] if flip else x)


@dataclasses.dataclass(frozen=True, eq=False)
class _BatchMaker:
    """Decodes batch ``g`` of an endless sequence of epochs (train) or passes over the files (test).

    Batch g is batch ``g % steps`` of epoch ``g // steps``: its files are ``epoch_indices``' (shuffled in
    ``(seed, epoch)`` for training, in order for evaluation), the crop and flip of file i drawn from
    ``default_rng([seed, epoch, 1, i])``. A pure function of g, so workers can decode any batch (picklable).
    """

    paths: tuple[str, ...]
    labels: np.ndarray
    batch_size: int
    steps: int
    shuffle: bool
    augment: bool
    seed: int
    num_shards: int
    shard_index: int
    image_size: int
    resize_size: int
    transform: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalise: bool

    def __call__(self, g: int) -> Batch:
        epoch, b = divmod(int(g), self.steps)
        order = epoch_indices(len(self.paths), shuffle=self.shuffle, seed=self.seed, epoch=epoch,
                              drop_last=self.shuffle, num_shards=self.num_shards, shard_index=self.shard_index,
                              batch_size=self.batch_size if self.shuffle else None)
        idx = order[b * self.batch_size : (b + 1) * self.batch_size]
        s = self.image_size
        pixels = np.zeros((self.batch_size, s, s, 3), np.uint8)
        for row, i in enumerate(idx):
            rng = np.random.default_rng([self.seed, epoch, 1, int(i)]) if self.augment else None
            pixels[row] = decode_image(self.paths[i], image_size=s, resize_size=self.resize_size,
                                       transform=self.transform, crop_rng=rng)
        labels = np.zeros(self.batch_size, np.int32)
        labels[: len(idx)] = self.labels[idx]
        mask = np.arange(self.batch_size) < len(idx)
        if not self.normalise:
            return {"image": pixels, "label": labels, "mask": mask}
        # (x / 255 - mean) / std as one multiply-add in place (a third faster; within 1e-6 of the formula).
        mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
        image = pixels.astype(np.float32)
        image *= (1.0 / (255.0 * std)).astype(np.float32)
        image += (-mean / std).astype(np.float32)
        return {"image": image, "label": labels, "mask": mask}


class _Stream:
    """Batches ``start, start + 1, ...`` of a ``_BatchMaker``, decoded by grain (in worker processes if any).

    Each grain worker decodes whole batches (every ``worker_count``-th one), and grain returns them in order, so
    the batches do not depend on ``worker_count``; the workers keep decoding ahead, across epoch boundaries.
    """

    def __init__(self, maker: _BatchMaker, key: tuple, start: int, worker_count: int, worker_buffer_size: int):
        import grain

        self.key, self.position, self.busy = key, start, False
        # Endless: 10**9 epochs or passes from ``start`` (lazy; grain never materialises the range).
        ds = grain.MapDataset.source(range(start, start + maker.steps * 10**9)).map(maker)
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if worker_count:
            _make_grain_profiling_flag_readable()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
        self._it = iter(it_ds)

    def next(self) -> Batch:
        batch = next(self._it)
        self.position += 1
        # Plain arrays: grain hands worker output over in shared memory, released when its array is freed.
        return {k: np.array(v, copy=True) for k, v in batch.items()}

    def close(self) -> None:
        self._it.close()


def _make_grain_profiling_flag_readable() -> None:
    """Lets grain start worker processes in a program that does not parse absl flags (no ``absl.app``).

    With JAX imported, grain 0.2.18 reads its absl flag ``grain_enable_multiprocess_worker_profiling`` when it
    starts workers and raises ``UnparsedFlagAccessError`` if flags were never parsed (a grain bug, fixed upstream
    after that release). Marking that one flag present keeps its value (the default, False) and leaves every
    other flag as it is; grain marks its own debug flags the same way.
    """
    from absl import flags

    name = "grain_enable_multiprocess_worker_profiling"
    if not flags.FLAGS.is_parsed() and name in flags.FLAGS and not flags.FLAGS[name].present:
        flags.FLAGS[name].present = 1


# ------------------------------------------------------------------------------------------------ data set


class ImageFolderDataset:
    """Train and evaluation image lists with the batch interface of ``ArrayDataset`` (what ``fit`` eats).

    Batches are decoded by grain: ``MapDataset`` of batch numbers -> decode a whole batch -> ``mp_prefetch`` over
    ``worker_count`` processes. Starting workers costs seconds (each imports JAX through this package), so they
    are kept between calls: a ``train_batches`` call that continues where the previous one of the same settings
    stopped (epoch e + 1 after a whole epoch e) reads from the same workers, which have been decoding ahead; any
    other call starts new ones. At most one training and one evaluation pipeline are alive per data set;
    ``close()`` (or ``with``) stops their workers, as does the end of the program.

    Args:
      train: the files ``train_batches`` reads (shuffled, augmented).
      test: the files ``test_batches`` reads (in order, test transform). Same classes as ``train``.
      image_size: S, the side of the square output images.
      resize_size: R, the resize before cropping; ``None``: ``round(S * 256 / 224)`` (256 at 224).
      transform: ``"alignq"``, ``"dsan"`` or ``"shorter_side"`` (module docstring).
      mean, std: per-channel normalisation of [0, 1] pixels (ImageNet's by default).
      worker_count: grain worker processes per pipeline (0: decode in the calling thread, on demand).
      worker_buffer_size: decoded batches each worker keeps ready.
      name: free-form name.

    Raises:
      ValueError: empty file list, different classes, bad sizes or transform.
    """

    def __init__(
        self,
        train: ImageFiles,
        test: ImageFiles,
        *,
        image_size: int = 224,
        resize_size: int | None = None,
        transform: str = "alignq",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        worker_count: int = 0,
        worker_buffer_size: int = 2,
        name: str | None = None,
    ):
        for files, what in ((train, "train"), (test, "test")):
            if not isinstance(files, ImageFiles):
                raise ValueError(f"{what} must be ImageFiles, got {type(files).__name__}")
            if len(files) == 0:
                raise ValueError(f"the {what} file list {files.name!r} is empty")
        if train.classes != test.classes:
            raise ValueError(_class_difference(f"train files {train.name!r}", train.classes,
                                               f"test files {test.name!r}", test.classes))
        self.image_size = _check_nonneg_int(image_size, "image_size", 1)
        self.resize_size = (round(self.image_size * 256 / 224) if resize_size is None
                            else _check_nonneg_int(resize_size, "resize_size", 1))
        if self.resize_size < self.image_size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size})")
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must have 3 entries, std positive; got mean={mean}, std={std}")
        self.train, self.test = train, test
        self.transform = transform
        self.mean, self.std = mean, std
        self.worker_count = _check_nonneg_int(worker_count, "worker_count")
        self.worker_buffer_size = _check_nonneg_int(worker_buffer_size, "worker_buffer_size", 1)
        self.name = name or f"{train.name}->{test.name}"
        self._streams: dict[str, _Stream] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(S, S, 3)."""
        return (self.image_size, self.image_size, 3)

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_test(self) -> int:
        return len(self.test)

    def steps_per_epoch(self, batch_size: int, *, num_shards: int = 1) -> int:
        """Training batches per epoch and shard: the whole global batches of ``num_shards * batch_size`` rows."""
        return num_batches(self.num_train, batch_size, drop_last=True, num_shards=num_shards)

    def eval_steps(self, batch_size: int, *, num_shards: int = 1) -> int:
        """Evaluation batches per shard (the last one padded and masked)."""
        return num_batches(self.num_test, batch_size, drop_last=False, num_shards=num_shards)

    def _maker(self, files: ImageFiles, batch_size, steps, *, shuffle, augment, seed, num_shards, shard_index,
               normalise) -> _BatchMaker:
        return _BatchMaker(files.paths, files.labels, batch_size, steps, shuffle, bool(augment), int(seed),
                           num_shards, shard_index, self.image_size, self.resize_size, self.transform, self.mean,
                           self.std, bool(normalise))

    def train_batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        augment: bool = True,
        normalise: bool = True,
        num_shards: int = 1,
        shard_index: int = 0,
    ) -> Iterator[Batch]:
        """One shuffled epoch of the train files in full batches (the last partial global batch is dropped).

        Yields ``{"image": (B, S, S, 3) float32 (uint8 if not normalise), "label": (B,) int32, "mask": (B,) bool
        (all True)}``, ``steps_per_epoch(B * num_shards)`` of them; deterministic in ``(seed, epoch)``.
        ``augment=False`` applies the test transform instead (e.g. BN statistics re-estimated on target images).
        With ``num_shards`` processes, B = ``batch_size`` is one process's rows, and the shards of batch b put
        together in shard order are the one-shard batch b of ``num_shards * batch_size`` rows (``epoch_indices``).

        Raises:
          ValueError: (on the call, not the first batch) the split holds fewer than ``num_shards * batch_size``
            files; bad seed, epoch or shard.
        """
        epoch_indices(self.num_train, shuffle=True, seed=seed, epoch=epoch, drop_last=True, num_shards=num_shards,
                      shard_index=shard_index, batch_size=batch_size)  # validates the arguments
        steps = self.steps_per_epoch(batch_size, num_shards=num_shards)
        if steps == 0:
            raise ValueError(
                f"{self.train.name}: batch_size={batch_size} x {num_shards} shard(s) is larger than the split "
                f"({self.num_train} images): no full batch; lower the batch size")
        key = ("train", batch_size, int(seed), bool(augment), bool(normalise), num_shards, shard_index)
        maker = lambda: self._maker(self.train, batch_size, steps, shuffle=True, augment=augment, seed=seed,  # noqa: E731
                                    num_shards=num_shards, shard_index=shard_index, normalise=normalise)
        return self._serve("train", key, maker, int(epoch) * steps, steps, any_pass=False)

    def test_batches(
        self, batch_size: int, *, normalise: bool = True, num_shards: int = 1, shard_index: int = 0
    ) -> Iterator[Batch]:
        """The test files in order with the test transform; every shard yields ``eval_steps`` batches of B rows.

        Shard s reads files s, s + num_shards, ...; its last batch is padded with zero images (label 0, ``mask``
        False), so over the shards every test image appears exactly once with mask True.
        """
        batch_size = _check_nonneg_int(batch_size, "batch_size", 1)
        epoch_indices(self.num_test, shuffle=False, drop_last=False, num_shards=num_shards, shard_index=shard_index)
        steps = self.eval_steps(batch_size, num_shards=num_shards)
        key = ("test", batch_size, bool(normalise), num_shards, shard_index)
        maker = lambda: self._maker(self.test, batch_size, steps, shuffle=False, augment=False, seed=0,  # noqa: E731
                                    num_shards=num_shards, shard_index=shard_index, normalise=normalise)
        return self._serve("test", key, maker, 0, steps, any_pass=True)

    def _serve(self, kind: str, key: tuple, maker, start: int, steps: int, *, any_pass: bool) -> Iterator[Batch]:
        stream = self._streams.get(kind)
        if stream is not None and not stream.busy and stream.key == key and (
                stream.position % steps == 0 if any_pass else stream.position == start):
            pass  # the workers have been decoding exactly these batches ahead
        else:
            if stream is not None and not stream.busy:
                stream.close()
            stream = _Stream(maker(), key, start, self.worker_count, self.worker_buffer_size)
            if self.worker_count:
                self._streams[kind] = stream
        stream.busy, served = True, 0
        try:
            while served < steps:
                batch = stream.next()
                served += 1
                yield batch
        finally:
            stream.busy = False
            # A pipeline left mid-way (error, or the consumer stopped early) is not reused: stop its workers.
            if self._streams.get(kind) is not stream or served < steps:
                if self._streams.get(kind) is stream:
                    del self._streams[kind]
                stream.close()

    def close(self) -> None:
        """Stops the worker processes kept for the next call (a later call starts new ones)."""
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            if not stream.busy:
                stream.close()

    def __enter__(self) -> "ImageFolderDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(name={self.name!r}, train={self.num_train}, test={self.num_test}, "
                f"image_shape={self.image_shape}, num_classes={self.num_classes}, transform={self.transform!r}, "
                f"worker_count={self.worker_count})")


# ------------------------------------------------------------------------------------------------ tasks


@dataclasses.dataclass(frozen=True, eq=False)
class DomainAdaptationTask:
    """One source -> target transfer task.

    Attributes:
      source: trains on ``source_train`` (labelled), evaluates on ``target_test``: the source-only model's data,
        and the source stream of an adaptation run.
      target: trains on ``target_train``, evaluates on ``target_test``. Its training batches carry the labels
        found on disk (so the batch layout is the same), but adaptation methods must not read them; they are
        there for diagnostics only.
      source_train, target_train, target_test: the file lists.
      protocol: ``"paper"`` or ``"full"``.
    """

    source: ImageFolderDataset
    target: ImageFolderDataset
    source_train: ImageFiles
    target_train: ImageFiles
    target_test: ImageFiles
    protocol: str

    @property
    def classes(self) -> tuple[str, ...]:
        return self.source_train.classes


def office31_task(
    root,
    source: str,
    target: str,
    *,
    protocol: str = "paper",
    split_seed: int = 1,
    train_fraction: float = 0.8,
    images_subdir: str = "images",
    image_size: int = 224,
    resize_size: int | None = None,
    transform: str = "alignq",
    worker_count: int = 0,
    worker_buffer_size: int = 2,
) -> DomainAdaptationTask:
    """The source -> target task of an image-folder data set in Office-31's layout (module docstring).

    Args:
      root: folder holding ``<domain>/images/<class>/*.jpg``.
      source, target: two different domain folder names (Office-31: ``amazon``, ``dslr``, ``webcam``).
      protocol: ``"paper"`` (per-domain per-class split, evaluate on the target's held-out part) or ``"full"``
        (all source, all target for training and evaluation).
      split_seed, train_fraction: the ``"paper"`` split (``split_per_class``; the official code uses 1 and 0.8).
      images_subdir, image_size, resize_size, transform, worker_count, worker_buffer_size: see
        ``image_folder_domain`` and ``ImageFolderDataset``.

    Raises:
      DataNotFoundError: ``root`` or a domain folder is missing.
      ValueError: bad protocol, same domains, class lists that differ between the domains, empty class folder.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if source == target:
        raise ValueError(f"source and target must be different domains, got {source!r} twice")
    classes = find_classes(root, [source, target], images_subdir=images_subdir)
    src = image_folder_domain(root, source, classes=classes, images_subdir=images_subdir)
    tgt = image_folder_domain(root, target, classes=classes, images_subdir=images_subdir)
    if protocol == "paper":
        source_train, _ = split_per_class(src, train_fraction=train_fraction, seed=split_seed)
        target_train, target_test = split_per_class(tgt, train_fraction=train_fraction, seed=split_seed)
    else:
        source_train, target_train, target_test = src, tgt, tgt
    options = dict(image_size=image_size, resize_size=resize_size, transform=transform, worker_count=worker_count,
                   worker_buffer_size=worker_buffer_size)
    return DomainAdaptationTask(
        source=ImageFolderDataset(source_train, target_test, name=f"{source}->{target} source", **options),
        target=ImageFolderDataset(target_train, target_test, name=f"{source}->{target} target", **options),
        source_train=source_train, target_train=target_train, target_test=target_test, protocol=protocol,
    )
