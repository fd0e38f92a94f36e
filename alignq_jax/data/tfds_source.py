"""TensorFlow Datasets source without TensorFlow: prepared array_record data read through ``as_data_source``.

``tfds.load`` needs TensorFlow and, when the data is missing, tries to download it (offline that hangs for
minutes in retries). Here the builder is only asked whether its prepared version folder exists
(``builder.is_prepared()``: ``dataset_info.json`` + ``features.json`` under ``<data_dir>/<name>/<version>``,
a local file check) and ``DataNotFoundError`` is raised at once when it does not, unless ``download=True``.
The prepared splits are then read through ``builder.as_data_source`` (random access, array_record or parquet
files, no TensorFlow) into uint8 numpy arrays; CIFAR-10 is about 180 MB in memory.

Data prepared by ``tfds.load`` in the default TFRecord format cannot be read without TensorFlow; if
TensorFlow is importable it is used for that case, otherwise the error says how to convert the data.

Specification: docs/method.md §8 (splits and recipes: SVHN uses ``train`` only, not ``extra``).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from alignq_jax.data.dataset import ArrayDataset
from alignq_jax.data.specs import DataNotFoundError, DatasetSpec, canonical_name, get_spec

logger = logging.getLogger(__name__)

TFDS_NAMES = ("cifar10", "svhn_cropped", "mnist", "fashion_mnist")

_LOCAL_HINTS = {
    "cifar10": "the CIFAR-10 python batches (the folder cifar-10-batches-py, or cifar-10-python.tar.gz)",
    "mnist": "the MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte, optionally .gz)",
    "fashion_mnist": "the Fashion-MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally .gz)",
    "svhn_cropped": "the SVHN files train_32x32.mat and test_32x32.mat",
}


# Where each TFDS builder downloads its files from. ``--download`` first checks that this host answers, so an offline
# machine fails in seconds instead of sitting through minutes of TFDS download retries.
SOURCE_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "svhn_cropped": "http://ufldl.stanford.edu/housenumbers/",
}
PROBE_TIMEOUT_S = 10.0
# Set (to anything but "" or "0") to forbid downloads outright, e.g. in tests.
NETWORK_OFF_ENV = "TFDS_DISABLE_NETWORK"


def how_to_get(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """Human-readable instructions for obtaining ``name`` (used in ``DataNotFoundError`` messages)."""
    key = canonical_name(name)
    target = repr(str(data_dir)) if data_dir is not None else "None"
    lines = [
        "To get the data:",
        f"  * on a machine with internet: python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{key}', data_dir={target}, file_format='array_record').download_and_prepare()\" "
        "and copy that data_dir here (or call the loader with download=True / run the experiment with "
        "--download while online);",
    ]
    if key in _LOCAL_HINTS:
        lines.append(f"  * or pass data_dir (--data-dir) pointing at {_LOCAL_HINTS[key]};")
    lines.append("  * for an offline demo use the 'digits' data set (shipped with scikit-learn).")
    return "\n".join(lines)


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as exc:  # pragma: no cover - tfds is a requirement
        raise DataNotFoundError("tensorflow-datasets is not installed: pip install tensorflow-datasets") from exc
    return tfds


def tfds_builder(name: str, data_dir: str | os.PathLike | None = None) -> Any:
    """``tfds.builder(name, data_dir=...)``: code-defined builder; touches only the local file system."""
    key = canonical_name(name)
    if key not in TFDS_NAMES:
        raise ValueError(f"{name!r} is not a TFDS data set here; TFDS names: {', '.join(TFDS_NAMES)}")
    tfds = _tfds()
    return tfds.builder(key, data_dir=None if data_dir is None else os.fspath(data_dir))


def tfds_is_prepared(name: str, data_dir: str | os.PathLike | None = None) -> bool:
    """Whether the prepared TFDS data of ``name`` exists under ``data_dir`` (TFDS default dirs if None).

    A local check (no network): ``builder.is_prepared()``.
    """
    return bool(tfds_builder(name, data_dir).is_prepared())


def check_download_possible(name: str, data_dir: str | os.PathLike | None = None, *,
                            timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raises ``DataNotFoundError`` at once unless the download host of ``name`` accepts a connection.

    Fails without touching the network when ``$TFDS_DISABLE_NETWORK`` is set (not "" or "0"). Otherwise opens
    one TCP connection to the host of ``SOURCE_URLS[name]`` (name lookup included) and gives up after ``timeout``
    seconds.
    """
    key = canonical_name(name)
    url = SOURCE_URLS[key]
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if os.environ.get(NETWORK_OFF_ENV, "") not in ("", "0"):
        reason = f"the network is switched off (${NETWORK_OFF_ENV} is set)"
    else:
        outcome: dict[str, Any] = {}

        def probe():
            try:
                socket.create_connection((host, port), timeout=timeout).close()
                outcome["ok"] = True
            except OSError as exc:  # name lookup or connection failed
                outcome["error"] = exc

        # A thread, because a name lookup with an unreachable DNS server ignores the socket timeout.
        thread = threading.Thread(target=probe, daemon=True, name=f"probe {host}")
        thread.start()
        thread.join(timeout)
        if outcome.get("ok"):
            return
        reason = f"{host}:{port} cannot be reached ({outcome.get('error') or f'no answer within {timeout:g} s'})"
    raise DataNotFoundError(
        f"{key}: --download needs the internet, but {reason}; nothing was downloaded.\n{how_to_get(key, data_dir)}"
    )


def _listing(path: Path) -> set[str] | None:
    return set(os.listdir(path)) if path.is_dir() else None


def _remove_new_entries(before: dict[Path, set[str] | None]) -> None:
    """Deletes what appeared since ``before`` = {folder: its entries, or None if it did not exist}."""
    for folder, entries in sorted(before.items(), key=lambda kv: len(kv[0].parts), reverse=True):
        if not folder.exists():
            continue
        if entries is None:
            shutil.rmtree(folder, ignore_errors=True)
            continue
        for entry in _listing(folder) - entries:
            target = folder / entry
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)


def download_and_prepare(builder: Any, name: str, data_dir: str | os.PathLike | None = None) -> None:
    """``builder.download_and_prepare(file_format="array_record")`` after a connectivity check; on any failure
    (interruption included) removes the folders and files it created (partial downloads, incomplete versions)
    and leaves what was there before untouched."""
    check_download_possible(name, data_dir)
    prepare_or_clean_up(builder, canonical_name(name), how_to_get(name, data_dir))


def prepare_or_clean_up(builder: Any, label: str, help_text: str, extra_folders: tuple[str, ...] = ()) -> None:
    """Runs ``builder.download_and_prepare(file_format="array_record")``; on any failure (interruption included)
    removes what it created under the data dir (downloads, incomplete versions of ``label`` and the
    ``extra_folders`` below the root) and raises DataNotFoundError naming ``label``, followed by ``help_text``."""
    root = Path(builder.data_dir_root)
    watched = [root, root / "downloads", root / "downloads" / "extracted", root / label.split("/")[0],
               *(root / folder for folder in extra_folders)]
    before = {folder: _listing(folder) for folder in watched}
    try:
        builder.download_and_prepare(file_format="array_record")
    except BaseException as exc:
        _remove_new_entries(before)
        if isinstance(exc, Exception):
            raise DataNotFoundError(
                f"{label}: downloading into {root} failed ({type(exc).__name__}: {exc}); the partial download was "
                f"removed.\n{help_text}"
            ) from exc
        raise


def _read_split(source: Any, spec: DatasetSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    n = len(source)
    images = np.empty((n, *spec.image_shape), np.uint8)
    labels = np.empty(n, np.int64)
    for i in range(n):  # one record at a time: decoding dominates, and Sequence indexing works everywhere
        example = source[i]
        img = np.asarray(example["image"])
        if img.shape != spec.image_shape:
            raise ValueError(f"{spec.name}/{split}[{i}]: image shape {img.shape}, expected {spec.image_shape}")
        images[i] = img
        labels[i] = example["label"]
    return images, labels


def _random_access_formats(builder: Any) -> list:
    from tensorflow_datasets.core import file_adapters

    suitable = set(file_adapters.FileFormat.with_random_access())
    info = builder.info
    available = [info.file_format] if info.file_format is not None else []
    try:
        available += list(info.available_file_formats())
    except Exception:  # older TFDS: only the main format
        pass
    return [f for f in available if f in suitable]


def _read_with_tensorflow(builder: Any, spec: DatasetSpec) -> tuple[np.ndarray, ...]:  # pragma: no cover
    tfds = _tfds()
    out = []
    for split in (spec.train_split, spec.test_split):
        data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, as_supervised=True))
        out += [np.asarray(data[0], np.uint8), np.asarray(data[1], np.int64)]
    return tuple(out)


def load_tfds(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = False) -> ArrayDataset:
    """Loads a prepared TFDS data set into memory without TensorFlow (recipe of docs/method.md §8).

    Args:
      name: ``cifar10``, ``svhn_cropped``, ``mnist`` or ``fashion_mnist`` (aliases such as ``svhn`` work).
      data_dir: TFDS data dir (the one holding ``<name>/<version>/``); ``None``: TFDS defaults
        (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      download: if the data is not prepared, download and prepare it as array_record (needs internet; checks
        first that the download host answers, and removes a partial download on failure). Default False: fail
        at once instead.

    Returns:
      ``ArrayDataset`` with uint8 (N, H, W, C) images, int32 labels, and the data set's mean/std/augment.

    Raises:
      DataNotFoundError: the data is not prepared under ``data_dir`` (raised after a local check, in well
        under a second; the message says how to get it), the download is impossible or failed, or the data is
        prepared only as TFRecord and TensorFlow is not installed.
    """
    spec = get_spec(name)
    builder = tfds_builder(spec.name, data_dir)
    if not builder.is_prepared():
        if not download:
            raise DataNotFoundError(
                f"{spec.name}: no prepared TFDS data at {builder.data_path} (data_dir={data_dir!r}); nothing "
                f"was downloaded.\n{how_to_get(spec.name, data_dir)}"
            )
        logger.info("downloading and preparing %s into %s", spec.name, builder.data_dir_root)
        download_and_prepare(builder, spec.name, data_dir)
    formats = _random_access_formats(builder)
    if formats:
        sources = {
            split: builder.as_data_source(split=split, file_format=formats[0])
            for split in (spec.train_split, spec.test_split)
        }
        tr_x, tr_y = _read_split(sources[spec.train_split], spec, spec.train_split)
        te_x, te_y = _read_split(sources[spec.test_split], spec, spec.test_split)
    else:
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            raise DataNotFoundError(
                f"{spec.name}: the TFDS data at {builder.data_path} is stored as {builder.info.file_format}, which "
                "needs TensorFlow to read. Install tensorflow, or convert it once (with TensorFlow): tfds "
                f"convert_format --dataset_version_dir={builder.data_path} --out_file_format=array_record, or "
                "prepare it again with file_format='array_record' in another data_dir.\n"
                + how_to_get(spec.name, data_dir)
            ) from None
        tr_x, tr_y, te_x, te_y = _read_with_tensorflow(builder, spec)
    logger.info("loaded %s from TFDS: %d train, %d test", spec.name, len(tr_y), len(te_y))
    return ArrayDataset.from_spec(spec, tr_x, tr_y, te_x, te_y)
