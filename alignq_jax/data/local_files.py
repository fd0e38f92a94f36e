"""Readers for the data sets' original distribution files, for machines without TFDS data or network.

* CIFAR-10 "python version": the folder ``cifar-10-batches-py`` (pickled dicts ``data_batch_1..5`` and
  ``test_batch``, ``b"data"`` (N, 3072) uint8 rows in CHW order, ``b"labels"``) or the unextracted
  ``cifar-10-python.tar.gz``.
* MNIST / Fashion-MNIST IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``; ``.idx3-ubyte`` spelling
  accepted), as shipped by the original sites, torchvision's ``<root>/MNIST/raw`` or Debian packages.
* SVHN cropped digits: ``train_32x32.mat`` and ``test_32x32.mat`` (the ``extra`` set is not used, reference
  section 8).

All readers return uint8 NHWC images in an ``ArrayDataset`` with the recipe of docs/method.md §8.
Note: CIFAR batches are Python pickles; only read files from a source you trust.
"""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile
from pathlib import Path
import numpy as np

from alignq_jax.data.dataset import ArrayDataset
from alignq_jax.data.specs import DataNotFoundError, canonical_name, get_spec

PathLike = str | os.PathLike

CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST = "test_batch"

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


# ----------------------------------------------------------------------------------------------- CIFAR-10


def find_cifar10_python(path: PathLike) -> Path | None:
    """Returns the ``cifar-10-batches-py`` folder or ``cifar-10-python.tar.gz`` at/inside ``path``, or None."""
    p = Path(path).expanduser()
    for cand in (p, p / CIFAR10_DIRNAME):
        if cand.is_dir() and (cand / _CIFAR10_TEST).is_file():
            return cand
    for cand in (p, p / CIFAR10_ARCHIVE):
        if cand.is_file() and cand.name.endswith((".tar.gz", ".tgz", ".tar")):
            return cand
    return None


def _decode_cifar_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = pickle.loads(raw, encoding="bytes")
    except Exception as exc:  # pickle raises many types on garbage
        raise ValueError(f"{source}: not a CIFAR-10 python batch (unpickling failed: {exc})") from exc
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError(f"{source}: not a CIFAR-10 python batch (expected a dict with b'data' and b'labels')")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{source}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{source}: {labels.shape[0] if labels.ndim else 0} labels for {data.shape[0]} images")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW rows -> NHWC
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _read_cifar_members(root: Path) -> dict[str, bytes]:
    """Raw bytes of data_batch_1..5 and test_batch from the folder or the archive ``root``."""
    wanted = (*_CIFAR10_TRAIN, _CIFAR10_TEST)
    if root.is_dir():
        missing = [m for m in wanted if not (root / m).is_file()]
        if missing:
            raise DataNotFoundError(f"CIFAR-10 python batches incomplete in {root}: missing {', '.join(missing)}")
        return {m: (root / m).read_bytes() for m in wanted}
    try:
        with tarfile.open(root) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [m for m in wanted if m not in members]
            if missing:
                raise DataNotFoundError(f"{root}: archive lacks {', '.join(missing)} (expected {CIFAR10_DIRNAME}/...)")
            return {m: tar.extractfile(members[m]).read() for m in wanted}
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"{root}: cannot read the CIFAR-10 archive ({exc})") from exc


def load_cifar10_python(path: PathLike) -> ArrayDataset:
    """CIFAR-10 from the "python version" batches (50,000 train / 10,000 test), recipe of docs/method.md §8.

    Args:
      path: the ``cifar-10-batches-py`` folder, a folder containing it, or ``cifar-10-python.tar.gz`` (or a
        folder containing that archive).

    Returns:
      ``ArrayDataset`` with uint8 images (N, 32, 32, 3) (HWC from the files' CHW rows), int32 labels,
      CIFAR mean/std and crop+flip augmentation.

    Raises:
      DataNotFoundError: no batches at ``path``; ValueError: corrupt files.
    """
    root = find_cifar10_python(path)
    if root is None:
        raise DataNotFoundError(
            f"no CIFAR-10 python batches at {path}: expected a folder {CIFAR10_DIRNAME} (data_batch_1..5, "
            f"test_batch) or {CIFAR10_ARCHIVE} there or at that path"
        )
    raw = _read_cifar_members(root)
    parts = [_decode_cifar_batch(raw[m], f"{root}:{m}") for m in _CIFAR10_TRAIN]
    test_x, test_y = _decode_cifar_batch(raw[_CIFAR10_TEST], f"{root}:{_CIFAR10_TEST}")
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    return ArrayDataset.from_spec(get_spec("cifar10"), train_x, train_y, test_x, test_y)


# ----------------------------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(file: PathLike) -> np.ndarray:
    """Reads one IDX file (optionally gzipped, detected by content) into a numpy array.

    Format: bytes 0-1 zero, byte 2 the element type (0x08 = uint8), byte 3 the number of dimensions d,
    then d big-endian uint32 sizes, then the data in C order.

    Raises:
      DataNotFoundError: missing file; ValueError: bad magic number or truncated data.
    """
    f = Path(file)
    if not f.is_file():
        raise DataNotFoundError(f"IDX file {f} does not exist")
    raw = f.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{f}: corrupt gzip data ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{f}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{f}: truncated IDX header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{f}: IDX header says shape {shape} ({expected} bytes) but {len(raw) - header} bytes follow")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path | None:
    alt = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", alt, alt + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_idx_dir(path: PathLike, name: str = "mnist") -> Path | None:
    """Folder holding the four IDX files of ``name`` at/under ``path`` (also ``<path>/<name>``, torchvision's
    ``<path>/MNIST/raw`` or ``<path>/FashionMNIST/raw``), or None."""
    p = Path(path).expanduser()
    key = canonical_name(name)
    sub = {"mnist": ["mnist", "MNIST/raw"], "fashion_mnist": ["fashion_mnist", "fashion-mnist", "FashionMNIST/raw"]}
    for cand in [p] + [p / s for s in sub.get(key, [])]:
        if cand.is_dir() and all(_idx_file(cand, stem) for stem in IDX_FILES.values()):
            return cand
    return None


def load_idx(path: PathLike, name: str = "mnist") -> ArrayDataset:
    """MNIST or Fashion-MNIST from IDX files (docs/method.md §8: normalise with mean 0.5, std 0.5).

    Args:
      path: folder with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
        ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``), or a parent (see ``find_idx_dir``).
      name: ``"mnist"`` or ``"fashion_mnist"`` (picks the name and recipe; the file format is the same).

    Returns:
      ``ArrayDataset`` with uint8 images (N, 28, 28, 1) and int32 labels.

    Raises:
      DataNotFoundError: files missing; ValueError: bad magic numbers, truncated files, count mismatch, or a
      ``name`` other than mnist/fashion_mnist.
    """
    key = canonical_name(name)
    if key not in ("mnist", "fashion_mnist"):
        raise ValueError(f"load_idx reads mnist or fashion_mnist, got {name!r}")
    folder = find_idx_dir(path, key)
    if folder is None:
        p = Path(path).expanduser()
        missing = [s for s in IDX_FILES.values() if not (p.is_dir() and _idx_file(p, s))]
        raise DataNotFoundError(
            f"no {key} IDX files at {path}: missing {', '.join(missing)} (each may be .gz)"
        )
    arrays = {}
    for key_, stem in IDX_FILES.items():
        file = _idx_file(folder, stem)
        arr = read_idx(file)
        want_ndim = 3 if key_.endswith("images") else 1
        if arr.ndim != want_ndim or arr.dtype != np.uint8:
            raise ValueError(f"{file}: expected a {want_ndim}-d uint8 IDX array, got {arr.dtype} shape {arr.shape}")
        arrays[key_] = arr
    for split in ("train", "test"):
        if arrays[f"{split}_images"].shape[0] != arrays[f"{split}_labels"].shape[0]:
            raise ValueError(
                f"{folder}: {split} has {arrays[f'{split}_images'].shape[0]} images but "
                f"{arrays[f'{split}_labels'].shape[0]} labels"
            )
    return ArrayDataset.from_spec(
        get_spec(key),
        arrays["train_images"][..., None], arrays["train_labels"],
        arrays["test_images"][..., None], arrays["test_labels"],
    )


# ----------------------------------------------------------------------------------------------- SVHN


def find_svhn_mat(path: PathLike) -> Path | None:
    """Folder holding ``train_32x32.mat`` and ``test_32x32.mat`` (at ``path`` or ``path/svhn``), or None."""
    p = Path(path).expanduser()
    for cand in (p, p / "svhn", p / "svhn_cropped"):
        if all((cand / f).is_file() for f in SVHN_FILES.values()):
            return cand
    return None


def _read_svhn_mat(file: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    try:
        mat = loadmat(file)
    except Exception as exc:  # scipy raises ValueError/TypeError/... on garbage
        raise ValueError(f"{file}: cannot read the MATLAB file ({exc})") from exc
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{file}: expected variables 'X' and 'y'")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8 or x.shape[3] != y.shape[0]:
        raise ValueError(f"{file}: expected X uint8 (32, 32, 3, N) and y (N, 1), got X {x.dtype} {x.shape}, y {y.shape}")
    y = y.astype(np.int64)
    y[y == 10] = 0  # the .mat files label the digit 0 as 10
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), y


def load_svhn_mat(path: PathLike) -> ArrayDataset:
    """SVHN cropped digits from ``train_32x32.mat`` / ``test_32x32.mat`` (no ``extra``; docs/method.md §8).

    Returns:
      ``ArrayDataset`` with uint8 images (N, 32, 32, 3), labels 0..9 (the files' 10 is mapped to 0),
      mean/std 0.5 and no augmentation.
    """
    folder = find_svhn_mat(path)
    if folder is None:
        raise DataNotFoundError(f"no SVHN files at {path}: expected {' and '.join(SVHN_FILES.values())}")
    tr_x, tr_y = _read_svhn_mat(folder / SVHN_FILES["train"])
    te_x, te_y = _read_svhn_mat(folder / SVHN_FILES["test"])
    return ArrayDataset.from_spec(get_spec("svhn_cropped"), tr_x, tr_y, te_x, te_y)
