"""The common-corruption benchmark (Hendrycks & Dietterich, ICLR 2019) as shifted test sets.

Two sources of the same 15 corruptions x 5 severities, with the same keys (``"gaussian_noise_3"``):

* ``corrupt_test_split`` / ``corrupted_test_sets``: generated offline from any test split with the
  ``imagecorruptions`` package (``pip install 'alignq_jax[corruptions]'``), cached on disk;
* ``load_cifar10_corrupted``: the published CIFAR-10-C images through TFDS (``cifar10_corrupted``), read without
  TensorFlow like ``load_tfds``.

``mean_corruption_accuracy`` turns per-(corruption, severity) accuracies into the mean corruption accuracy and the
per-corruption table.

How a test image is corrupted (``corrupt_images``):

* **Padding, not resizing.** The package needs RGB images of at least 32x32. Smaller images (28x28 Fashion-MNIST,
  8x8 digits) are padded to 32x32 with the image centred, and the corrupted image is cropped back to the
  original window. Resizing up would change what a severity means: the corruptions' parameters are in pixels
  (noise per pixel, blur radii, JPEG 8x8 blocks, the pixelate factor), so after up-sampling by 4 and
  down-sampling back, per-pixel noise would be averaged away and blurs would shrink by 4. With padding one image
  pixel is one corruption pixel. The default ``pad_mode="reflect"`` mirrors the image (numpy's ``reflect`` is
  OpenCV's default border, ``BORDER_REFLECT_101``): blurs see the border the library itself would use, and
  image-wide statistics that some corruptions use (``contrast``'s image mean, ``fog``'s maximum) stay close to
  the image's own; ``"edge"`` and ``"constant"`` (zeros) are the alternatives. Images of 32x32 and larger
  (CIFAR-10, SVHN) are not padded.
* **Grayscale** images are replicated to 3 channels and come back as **channel 0** (red), not the channel mean:
  the noise corruptions draw independent noise per channel, and a mean over 3 channels would cut its standard
  deviation by sqrt(3), a weaker corruption than the benchmark's. Channel 0 has exactly the per-pixel
  distribution the corruption applies to each colour channel.
* **Value range.** uint8 images (0..255) come back as uint8; float images in [0, 1] (as ``ArrayDataset`` may
  store them) are quantised to uint8 (the package works on uint8), corrupted and returned as float32 / 255.
  Normalisation with the data set's mean/std happens at batch time (``ArrayDataset.test_batches``), so the
  corruption reaches the model as a deployment shift would, as in ``alignq_jax.data.shifts``.
* **Randomness.** The package draws from numpy's global ``np.random``. Every image is corrupted under its own seed,
  derived from ``(seed, corruption, severity, index of the image in the split)``, and the caller's global state is
  restored afterwards: results are deterministic, and an image gets the same corruption whatever subset or number
  of worker processes is used.

Compatibility with current libraries (``imagecorruptions`` 1.1.2 dates from 2020). Its functions run unchanged;
on first use three names in its module namespace ``imagecorruptions.corruptions`` are replaced (nothing outside
that module is touched):

* ``np``: a view of numpy that also answers ``np.float_`` (removed in NumPy 2.0; ``fog`` uses it) as float64;
* ``gaussian``: scikit-image's ``gaussian`` with the removed ``multichannel=True`` argument translated to
  ``channel_axis=-1`` (``glass_blur``);
* ``sk``: scikit-image, except that ``sk.util.random_noise`` (``impulse_noise``) draws its generator's seed from
  ``np.random``; scikit-image >= 0.21 otherwise seeds it from the OS, and the result could not be reproduced.

Its imports of ``pkg_resources`` (gone from recent setuptools) and ``scipy.ndimage.interpolation`` (deprecated)
are given stand-ins only if they are missing, only while it is imported.

Cost per image at 32x32 (a 28x28 or 8x8 image is padded to that size, so it costs the same), measured as CPU
time of one process on an AMD EPYC machine with 2 cores, through ``corrupt_images`` (padding and seeding
included), 40 random RGB images per severity; milliseconds, mean over severities 1..5 [range]::

    noise    gaussian_noise 0.18 [0.16-0.19]  shot_noise 0.35 [0.31-0.39]  impulse_noise 0.22 [0.20-0.27]
    blur     defocus_blur 0.35 [0.34-0.38]  glass_blur 12.9 [7.5-19.5]  motion_blur 1.1 [0.9-1.3]
             zoom_blur 2.1 [1.8-2.6]
    weather  snow 1.1 [1.0-1.1]  frost 6.3 [5.2-7.7]  fog 0.76 [0.64-0.96]
    digital  brightness 0.63 [0.55-0.80]  contrast 0.15 [0.14-0.16]  elastic_transform 0.56 [0.55-0.58]
             pixelate 0.10 [0.09-0.11]  jpeg_compression 0.27 [0.24-0.37]

The whole 15 x 5 grid over a 10,000-image test split is about 23 CPU minutes, 11 of them glass_blur (its
per-pixel Python loop; at 224x224 it takes 0.8-1.2 s per image) and 5 frost (it reads and resizes a
frost photograph for every image). Generated sets are cached (``cache_dir``), and ``num_workers`` processes
share the (corruption, severity) cells.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import math
import multiprocessing
import os
import re
import socket
import sys
import tempfile
import threading
import types
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

# The 15 benchmark corruptions in the order of the paper's tables: noise, blur, weather, digital.
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
CORRUPTION_GROUPS = types.MappingProxyType({
    "noise": CORRUPTIONS[0:3], "blur": CORRUPTIONS[3:7], "weather": CORRUPTIONS[7:10], "digital": CORRUPTIONS[10:15],
})
SEVERITIES = (1, 2, 3, 4, 5)
# The package refuses images smaller than this (height and width).
MIN_SIZE = 32
PAD_MODES = ("reflect", "edge", "constant")

# TFDS ``cifar10_corrupted`` names two of the corruptions differently; its configs are ``<name>_<severity>``.
CIFAR10_CORRUPTED = "cifar10_corrupted"
TFDS_CORRUPTION_NAMES = types.MappingProxyType({
    **{c: c for c in CORRUPTIONS}, "glass_blur": "frosted_glass_blur", "elastic_transform": "elastic",
})
CIFAR10_CORRUPTED_URL = "https://zenodo.org/record/2535967/files/CIFAR-10-C.tar"
CIFAR10_TEST_SIZE = 10_000

# Part of every cache folder's hash: bump when the generated images of the same inputs change.
CACHE_FORMAT = 1

CorruptFn = Callable[[np.ndarray, str, int], np.ndarray]
Progress = Callable[[int, int], None]


# ------------------------------------------------------------------------------------------------ names


def check_corruptions(corruptions: str | Iterable[str] | None = None) -> tuple[str, ...]:
    """Validated corruption names: ``None`` or ``"all"``: the 15 of ``CORRUPTIONS``; a group name of
    ``CORRUPTION_GROUPS`` (``"noise"``, ``"blur"``, ``"weather"``, ``"digital"``); one name; or a list of names.

    Raises:
      ValueError: an unknown name (``"identity"``, ``"clean"``, ...), a repeated name or an empty list; the message
        lists the allowed names.
    """
    if corruptions is None or corruptions == "all":
        return CORRUPTIONS
    if isinstance(corruptions, str):
        corruptions = CORRUPTION_GROUPS.get(corruptions, (corruptions,))
    names = tuple(corruptions) if isinstance(corruptions, Iterable) else (corruptions,)
    allowed = f"allowed: {', '.join(CORRUPTIONS)}, or 'all', or a group ({', '.join(CORRUPTION_GROUPS)})"
    if not names:
        raise ValueError(f"no corruption given; {allowed}")
    for name in names:
        if not isinstance(name, str) or name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {name!r}; {allowed}")
    if len(set(names)) != len(names):
        raise ValueError(f"corruptions repeat a name: {list(names)}")
    return names


def check_severities(severities: int | Iterable[int] | None = None) -> tuple[int, ...]:
    """Validated severities: ``None``: all of ``SEVERITIES`` (1..5); one integer or a list of integers in 1..5.

    Raises:
      ValueError: severity 0 (there is no identity severity: the clean set is evaluated separately), anything
        outside 1..5, a non-integer (bools and floats included), a repeat or an empty list.
    """
    if severities is None:
        return SEVERITIES
    iterable = isinstance(severities, Iterable) and not isinstance(severities, str)
    values = tuple(severities) if iterable else (severities,)
    if not values:
        raise ValueError(f"no severity given; allowed: {list(SEVERITIES)}")
    for s in values:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or int(s) not in SEVERITIES:
            raise ValueError(f"severity must be one of {list(SEVERITIES)}, got {s!r}")
    values = tuple(int(s) for s in values)
    if len(set(values)) != len(values):
        raise ValueError(f"severities repeat a value: {list(values)}")
    return values


def corruption_key(corruption: str, severity: int) -> str:
    """The name of one corrupted test set: ``"<corruption>_<severity>"``, e.g. ``"glass_blur_5"`` (the pattern of
    TFDS's ``cifar10_corrupted`` configs, with the benchmark's names)."""
    (corruption,) = check_corruptions([corruption])
    (severity,) = check_severities([severity])
    return f"{corruption}_{severity}"


def parse_corruption_key(key: str) -> tuple[str, int]:
    """Inverse of ``corruption_key``: ``"glass_blur_5"`` -> ``("glass_blur", 5)``.

    Raises:
      ValueError: not ``<one of CORRUPTIONS>_<1..5>`` (e.g. a shift of ``alignq_jax.data.shifts`` or ``"clean"``).
    """
    name, _, severity = str(key).rpartition("_")
    if name not in CORRUPTIONS or severity not in tuple(str(s) for s in SEVERITIES):
        raise ValueError(
            f"{key!r} is not a corruption key '<corruption>_<severity>' with a corruption of {', '.join(CORRUPTIONS)} "
            f"and a severity of {list(SEVERITIES)}"
        )
    return name, int(severity)


def subset_indices(num_total: int, num_examples: int | None = None, seed: int = 0) -> np.ndarray:
    """Which test examples a corrupted subset uses: (num_examples,) int64, sorted.

    ``None``: all of them (``arange(num_total)``); otherwise ``num_examples`` distinct indices drawn with
    ``np.random.default_rng(seed)``. The same for generated sets and for CIFAR-10-C (whose images are the
    CIFAR-10 test images in order), so both evaluate the same examples.
    """
    num_total = _check_int(num_total, "num_total", 1)
    if num_examples is None:
        return np.arange(num_total, dtype=np.int64)
    num_examples = _check_int(num_examples, "num_examples", 1)
    if num_examples > num_total:
        raise ValueError(f"num_examples={num_examples} is more than the {num_total} test examples")
    seed = _check_int(seed, "seed", 0)
    chosen = np.random.default_rng(seed).choice(num_total, size=num_examples, replace=False)
    return np.sort(chosen).astype(np.int64)


def _check_int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------------ the package


class _ModuleView(types.ModuleType):
    """A module namespace that answers like ``base`` except for the names given in ``overrides``."""

    def __init__(self, base: types.ModuleType, **overrides: Any) -> None:
        super().__init__(base.__name__)
        self.__dict__.update(overrides)
        self.__dict__["_base"] = base

    def __getattr__(self, name: str) -> Any:  # only called for names not in overrides
        return getattr(self.__dict__["_base"], name)


def _resource_filename(package: str, relative: str) -> str:
    """``pkg_resources.resource_filename`` for a module's data file (what the package asks it for)."""
    return os.path.join(os.path.dirname(sys.modules[package].__file__), relative)


@contextlib.contextmanager
def _legacy_imports():
    """Stand-ins for the package's imports that newer setuptools / SciPy drop, present only while it is imported."""
    added = []
    if importlib.util.find_spec("pkg_resources") is None:
        stub = types.ModuleType("pkg_resources")
        stub.resource_filename = _resource_filename
        sys.modules["pkg_resources"] = stub
        added.append("pkg_resources")
    try:
        import scipy.ndimage.interpolation  # noqa: F401
    except ImportError:
        import scipy.ndimage

        stub = types.ModuleType("scipy.ndimage.interpolation")
        stub.map_coordinates = scipy.ndimage.map_coordinates
        sys.modules["scipy.ndimage.interpolation"] = stub
        added.append("scipy.ndimage.interpolation")
    try:
        with warnings.catch_warnings():
            # Deprecation notices about those two imports, raised inside the package: nothing a user can act on.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*pkg_resources.*")
            yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _gaussian_compat(gaussian: Callable) -> Callable:
    """skimage's ``gaussian`` accepting the ``multichannel=True`` argument that scikit-image 0.21 removed."""
    if "multichannel" in inspect.signature(gaussian).parameters:
        return gaussian

    @functools.wraps(gaussian)
    def wrapped(image, *args, multichannel=None, **kwargs):
        if multichannel:
            kwargs.setdefault("channel_axis", -1)
        return gaussian(image, *args, **kwargs)

    return wrapped


def _random_noise_seeded(random_noise: Callable) -> Callable:
    """skimage's ``random_noise`` whose generator is seeded from ``np.random`` when no seed is given."""
    rng_arg = "rng" if "rng" in inspect.signature(random_noise).parameters else "seed"

    @functools.wraps(random_noise)
    def wrapped(image, *args, **kwargs):
        if kwargs.get(rng_arg) is None:
            kwargs[rng_arg] = int(np.random.randint(2**31 - 1))
        return random_noise(image, *args, **kwargs)

    return wrapped


@functools.lru_cache(maxsize=None)
def _package_functions() -> tuple[Mapping[str, Callable], types.ModuleType]:
    """The 15 corruption functions of ``imagecorruptions``, with the compatibility fixes of the module docstring,
    and the ``PIL.Image`` module."""
    try:
        with _legacy_imports():
            import imagecorruptions.corruptions as module
    except ImportError as exc:
        raise ImportError(
            f"generating corrupted test sets needs the imagecorruptions package ({exc}): "
            "pip install 'alignq_jax[corruptions]' (or pip install imagecorruptions)"
        ) from exc
    if not getattr(module, "_alignq_compat", False):
        if not hasattr(np, "float_"):
            module.np = _ModuleView(np, float_=np.float64)
        module.gaussian = _gaussian_compat(module.gaussian)
        module.sk = _ModuleView(
            module.sk, util=_ModuleView(module.sk.util, random_noise=_random_noise_seeded(module.sk.util.random_noise))
        )
        module._alignq_compat = True
    # With PIL.Image, through the package's own import (the functions take PIL images): no PIL import here.
    return types.MappingProxyType({name: getattr(module, name) for name in CORRUPTIONS}), module.Image


def _package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("imagecorruptions")
    except metadata.PackageNotFoundError:
        return "unknown"


def apply_corruption(image: np.ndarray, corruption: str, severity: int) -> np.ndarray:
    """One corruption of the ``imagecorruptions`` package on one RGB image, as its ``corrupt`` does it.

    Args:
      image: (H, W, 3) uint8, H and W >= 32.
      corruption: one of ``CORRUPTIONS``; severity: 1..5.

    Returns:
      (H, W, 3) uint8 (the package's float result converted with ``np.uint8``, i.e. truncated, as its ``corrupt``
      and the published benchmark do). Draws from ``np.random``: seed it for a reproducible result.
    """
    (corruption,) = check_corruptions([corruption])
    (severity,) = check_severities([severity])
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < MIN_SIZE:
        raise ValueError(
            f"apply_corruption takes one (H, W, 3) uint8 image with H, W >= {MIN_SIZE}; got {image.dtype} {image.shape}"
        )
    functions, pil_image = _package_functions()
    return np.uint8(np.asarray(functions[corruption](pil_image.fromarray(image), severity)))


# ------------------------------------------------------------------------------------------------ corrupting


def _check_images(images) -> tuple[np.ndarray, bool]:
    """(N, H, W, C) uint8 or float in [0, 1] -> (uint8 images, whether the input was float)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"images must have shape (N, H, W, C) with N >= 1 and C = 1 or 3, got shape {images.shape}"
        )
    if images.dtype == np.uint8:
        return images, False
    if np.issubdtype(images.dtype, np.floating):
        lo, hi = float(images.min()), float(images.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise ValueError(f"float images must be pixel intensities in [0, 1], got values in [{lo}, {hi}]")
        return np.rint(images.astype(np.float32) * 255.0).astype(np.uint8), True
    raise ValueError(f"images must be uint8 (0..255) or float in [0, 1], got dtype {images.dtype}")


def _window(height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) padding that centres an image in at least MIN_SIZE x MIN_SIZE."""
    dh, dw = max(MIN_SIZE - height, 0), max(MIN_SIZE - width, 0)
    return (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)


def _image_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """The np.random seed of one image: a function of (seed, corruption, severity, index in the split) only."""
    entropy = [seed, CORRUPTIONS.index(corruption), severity, int(index)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _corrupt_uint8(images: np.ndarray, indices: np.ndarray, corruption: str, severity: int, seed: int,
                   pad_mode: str, corrupt_fn: CorruptFn, on_image: Callable[[], None] | None = None) -> np.ndarray:
    """The core loop: (N, H, W, C) uint8 -> (N, H, W, C) uint8 (pad, replicate, corrupt, crop, channel 0)."""
    n, height, width, channels = images.shape
    (top, bottom), (left, right) = _window(height, width)
    out = np.empty_like(images)
    saved = np.random.get_state()
    try:
        for j in range(n):
            image = np.pad(images[j], ((top, bottom), (left, right), (0, 0)), mode=pad_mode)
            if channels == 1:
                image = np.repeat(image, 3, axis=-1)
            np.random.seed(_image_seed(seed, corruption, severity, indices[j]))
            result = np.asarray(corrupt_fn(image, corruption, severity))
            if result.shape != image.shape or result.dtype != np.uint8:
                raise ValueError(
                    f"{corruption} severity {severity} returned {result.dtype} {result.shape} for a uint8 image of "
                    f"shape {image.shape}; a corruption must keep the shape and return uint8"
                )
            out[j] = result[top:top + height, left:left + width, :channels]
            if on_image is not None:
                on_image()
    finally:
        np.random.set_state(saved)
    return out


def corrupt_images(
    images,
    corruption: str,
    severity: int,
    *,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    pad_mode: str = "reflect",
    corrupt_fn: CorruptFn | None = None,
) -> np.ndarray:
    """One corruption at one severity on a batch of images in a data set's layout (no cache).

    Args:
      images: (N, H, W, C) uint8 pixels or float pixels in [0, 1], C = 1 or 3, any H, W (padded to 32 if smaller).
      corruption: one of ``CORRUPTIONS``; severity: 1..5.
      seed: with ``indices``, decides every image's randomness.
      indices: (N,) the images' positions in their split (their seeds); ``None``: ``0..N-1``.
      pad_mode: how images smaller than 32x32 are padded: ``"reflect"`` (default), ``"edge"`` or ``"constant"``
        (zeros); see the module docstring.
      corrupt_fn: ``f(image (H', W', 3) uint8, corruption, severity) -> (H', W', 3) uint8`` on the padded RGB
        image; ``None``: ``apply_corruption`` (the imagecorruptions package). With ``num_workers > 1`` elsewhere it
        must be picklable (a module-level function).

    Returns:
      (N, H, W, C) array of the input's dtype (uint8, or float32 in [0, 1] for float input).
    """
    (corruption,) = check_corruptions([corruption])
    (severity,) = check_severities([severity])
    uint8_images, was_float = _check_images(images)
    seed = _check_int(seed, "seed", 0)
    indices = _check_indices(indices, len(uint8_images))
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    out = _corrupt_uint8(uint8_images, indices, corruption, severity, seed, pad_mode, corrupt_fn or apply_corruption)
    return out.astype(np.float32) / 255.0 if was_float else out


def _check_indices(indices, n: int) -> np.ndarray:
    if indices is None:
        return np.arange(n, dtype=np.int64)
    indices = np.asarray(indices)
    if indices.shape != (n,) or not np.issubdtype(indices.dtype, np.integer) or (n and indices.min() < 0):
        raise ValueError(f"indices must be ({n},) non-negative integers, got {indices.dtype} {indices.shape}")
    return indices.astype(np.int64)


# ------------------------------------------------------------------------------------------------ cache


_DATASET_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def _fn_identity(corrupt_fn: CorruptFn | None) -> str:
    """What names the corruption function in the cache key: the package and its version, or the function's module
    and qualified name (a callable object's class); not its closure or attributes."""
    if corrupt_fn is None:
        return f"imagecorruptions=={_package_version()}"
    named = corrupt_fn if hasattr(corrupt_fn, "__qualname__") else type(corrupt_fn)
    return f"{named.__module__}.{named.__qualname__}"


def cache_folder(cache_dir: str | os.PathLike, dataset_name: str, images: np.ndarray, labels: np.ndarray,
                 indices: np.ndarray, *, seed: int, pad_mode: str, corrupt_fn: CorruptFn | None = None) -> Path:
    """``<cache_dir>/<dataset_name>-<16 hex digits>``: the digest covers everything a generated set depends on
    (the selected uint8 images and labels, their indices, seed, pad mode, the corruption function and package
    version, ``CACHE_FORMAT``). Files inside: ``<corruption>_<severity>.npz`` (``corruption_key``)."""
    digest = hashlib.sha256()
    meta = {"format": CACHE_FORMAT, "seed": seed, "pad_mode": pad_mode, "fn": _fn_identity(corrupt_fn),
            "shape": list(images.shape), "dtype": str(images.dtype)}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    for array in (images, labels.astype(np.int64), indices.astype(np.int64)):
        digest.update(np.ascontiguousarray(array).tobytes())
    return Path(cache_dir) / f"{dataset_name}-{digest.hexdigest()[:16]}"


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Writes through a temporary file in the same folder and renames it: readers see the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(path: Path, labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    try:
        with np.load(path) as data:
            images, cached_labels = data["images"], data["labels"]
    except Exception as exc:
        raise ValueError(
            f"cached corrupted set {path} cannot be read ({type(exc).__name__}: {exc}); delete it"
        ) from exc
    if images.shape != shape or images.dtype != np.uint8 or not np.array_equal(cached_labels, labels):
        raise ValueError(
            f"cached corrupted set {path} holds {images.dtype} {images.shape} images whose labels "
            f"{'match' if np.array_equal(cached_labels, labels) else 'differ'}; expected uint8 {shape}; delete it"
        )
    return images


# ------------------------------------------------------------------------------------------------ test sets


def _generate_cell(args: tuple) -> np.ndarray:
    """One (corruption, severity) cell in a worker process."""
    images, indices, corruption, severity, seed, pad_mode, corrupt_fn = args
    return _corrupt_uint8(images, indices, corruption, severity, seed, pad_mode, corrupt_fn or apply_corruption)


def _show_progress() -> bool:
    """Progress bars by default only where they redraw in place: a terminal, or a notebook."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def corrupt_test_split(
    images,
    labels,
    corruptions: str | Iterable[str] | None = None,
    severities: int | Iterable[int] | None = None,
    *,
    num_examples: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    dataset_name: str = "custom",
    pad_mode: str = "reflect",
    num_workers: int = 1,
    progress: bool | Progress | None = None,
    corrupt_fn: CorruptFn | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The corrupted test sets of a test split, generated with ``imagecorruptions`` and cached on disk.

    Args:
      images: (N, H, W, C) uint8 or float in [0, 1], C = 1 or 3 (``ArrayDataset.test_images`` or raw pixels).
      labels: (N,) integers ((N, 1) is accepted).
      corruptions: names (see ``check_corruptions``); default all 15. severities: default 1..5.
      num_examples: corrupt a subset of this many test examples (``subset_indices(N, num_examples, seed)``, the
        same subset for every corruption); ``None``: all N.
      seed: the subset and every image's corruption randomness.
      cache_dir: if given, each set is stored as ``cache_folder(...)/<corruption>_<severity>.npz`` (written
        atomically, right after its cell is generated, so an interrupted generation resumes where it stopped) and
        read back on later calls instead of being generated again. ``None``: no cache.
      dataset_name: names the cache folder (letters, digits, ``_.+-``).
      pad_mode: see ``corrupt_images``.
      num_workers: processes generating cells in parallel (``spawn`` start method: a script calling this with
        ``num_workers > 1`` needs the ``if __name__ == "__main__":`` guard); 1: in this process.
      progress: a callable ``progress(done_images, total_images)`` called after every generated image (after
        every cell with ``num_workers > 1``), or True / False for a tqdm bar on stderr; None (default): a bar
        only when stderr is a terminal or in a notebook. Cache hits are not counted.
      corrupt_fn: see ``corrupt_images``; ``None``: the imagecorruptions package.

    Returns:
      ``{corruption_key(c, s): (images (M, H, W, C) of the input dtype, labels (M,) int32)}`` in the order
      corruption-major, severity-minor, with M = ``num_examples`` or N. The labels are the same array for every
      key. Wrap into data sets with ``as_test_sets`` (or call ``corrupted_test_sets``).
    """
    names = check_corruptions(corruptions)
    levels = check_severities(severities)
    uint8_images, was_float = _check_images(images)
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != (len(uint8_images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be ({len(uint8_images)},) integers (one per image), got {labels.dtype} {labels.shape}"
        )
    seed = _check_int(seed, "seed", 0)
    num_workers = _check_int(num_workers, "num_workers", 1)
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    if not isinstance(dataset_name, str) or not _DATASET_NAME.match(dataset_name):
        raise ValueError(f"dataset_name must be letters, digits and _.+- (a folder name), got {dataset_name!r}")
    indices = subset_indices(len(uint8_images), num_examples, seed)
    subset, subset_labels = uint8_images[indices], labels[indices].astype(np.int32)
    folder = None
    if cache_dir is not None:
        folder = cache_folder(cache_dir, dataset_name, subset, subset_labels, indices, seed=seed, pad_mode=pad_mode,
                              corrupt_fn=corrupt_fn)

    cells = [(c, s) for c in names for s in levels]
    results: dict[tuple[str, int], np.ndarray] = {}
    for cell in cells:
        path = folder / f"{corruption_key(*cell)}.npz" if folder is not None else None
        if path is not None and path.exists():
            results[cell] = _load_cached(path, subset_labels, subset.shape)
    missing = [cell for cell in cells if cell not in results]

    def store(cell, generated):
        results[cell] = generated
        if folder is not None:
            _write_atomic(folder / f"{corruption_key(*cell)}.npz",
                          lambda f: np.savez(f, images=generated, labels=subset_labels, indices=indices))

    if missing:
        total = len(missing) * len(subset)
        bar, report = _progress(progress, total, f"corrupting {dataset_name}")
        try:
            if num_workers == 1:
                done = 0
                for cell in missing:
                    if bar is not None:
                        bar.set_postfix_str(corruption_key(*cell))

                    def tick():
                        nonlocal done
                        done += 1
                        report(done, 1)

                    store(cell, _corrupt_uint8(subset, indices, *cell, seed, pad_mode, corrupt_fn or apply_corruption,
                                               tick))
            else:
                context = multiprocessing.get_context("spawn")
                with concurrent.futures.ProcessPoolExecutor(min(num_workers, len(missing)), mp_context=context) as pool:
                    futures = {
                        pool.submit(_generate_cell, (subset, indices, *cell, seed, pad_mode, corrupt_fn)): cell
                        for cell in missing
                    }
                    done = 0
                    for future in concurrent.futures.as_completed(futures):
                        store(futures[future], future.result())
                        done += len(subset)
                        report(done, len(subset))
        finally:
            if bar is not None:
                bar.close()
        if folder is not None:
            logger.info("corrupted sets of %s cached in %s", dataset_name, folder)

    convert = (lambda x: x.astype(np.float32) / 255.0) if was_float else (lambda x: x)
    return {corruption_key(*cell): (convert(results[cell]), subset_labels) for cell in cells}


def _progress(progress, total: int, desc: str):
    """(tqdm bar or None, report(done, step)) for the ``progress`` argument of ``corrupt_test_split``."""
    if callable(progress):
        return None, lambda done, step: progress(done, total)
    show = _show_progress() if progress is None else bool(progress)
    if not show:
        return None, lambda done, step: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="img", leave=False)
    return bar, lambda done, step: bar.update(step)


def as_test_sets(dataset, sets: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """``{name: dataset with its test split replaced by (images, labels)}``, like ``shifts.shifted_test_sets``
    (without its ``"clean"`` entry: with a subset, the clean accuracy of the same subset is ``dataset`` restricted
    to ``subset_indices``)."""
    return {name: dataclasses.replace(dataset, test_images=x, test_labels=y) for name, (x, y) in sets.items()}


def corrupted_test_sets(
    dataset,
    corruptions: str | Iterable[str] | None = None,
    severities: int | Iterable[int] | None = None,
    **kwargs: Any,
) -> dict:
    """``corrupt_test_split`` on an ``ArrayDataset``'s test split, as ``{corruption_key: ArrayDataset}``.

    Every returned data set keeps ``dataset``'s training split, mean/std and recipe, so
    ``test_batches`` normalises the corrupted images with the training statistics. ``dataset_name`` defaults to
    ``dataset.name``; other keyword arguments are those of ``corrupt_test_split``.
    """
    kwargs.setdefault("dataset_name", re.sub(r"[^A-Za-z0-9_.+-]", "_", dataset.name) or "custom")
    sets = corrupt_test_split(dataset.test_images, dataset.test_labels, corruptions, severities, **kwargs)
    return as_test_sets(dataset, sets)


# ------------------------------------------------------------------------------------------------ CIFAR-10-C (TFDS)


def _cifar10_corrupted_builder(corruption: str, severity: int, data_dir):
    from alignq_jax.data.tfds_source import _tfds

    config = f"{CIFAR10_CORRUPTED}/{TFDS_CORRUPTION_NAMES[corruption]}_{severity}"
    return _tfds().builder(config, data_dir=None if data_dir is None else os.fspath(data_dir))


def cifar10_corrupted_is_prepared(
    data_dir: str | os.PathLike | None = None,
    corruptions: str | Iterable[str] | None = None,
    severities: int | Iterable[int] | None = None,
) -> bool:
    """Whether every requested ``cifar10_corrupted`` config is prepared under ``data_dir`` (a local file check)."""
    return all(
        _cifar10_corrupted_builder(c, s, data_dir).is_prepared()
        for c in check_corruptions(corruptions) for s in check_severities(severities)
    )


def _cifar10_corrupted_help(data_dir) -> str:
    target = repr(str(data_dir)) if data_dir is not None else "None"
    return (
        "To get CIFAR-10-C (one 2.9 GB download, https://zenodo.org/record/2535967; preparing it needs TensorFlow):\n"
        "  * on a machine with internet and tensorflow: python -c \"import tensorflow_datasets as tfds; "
        f"[tfds.builder(f'cifar10_corrupted/{{c}}_{{s}}', data_dir={target}, file_format='array_record')"
        ".download_and_prepare() for c in ['gaussian_noise', ...] for s in range(1, 6)]\" (TFDS names: "
        "frosted_glass_blur, elastic) and copy that data_dir here, or call with download=True there;\n"
        "  * or generate the same corruptions offline from the CIFAR-10 test split: corrupted_test_sets(dataset)."
    )


def _check_host(url: str, timeout: float) -> None:
    """Raises DataNotFoundError unless the host of ``url`` accepts a TCP connection (or the network is off)."""
    from alignq_jax.data.specs import DataNotFoundError
    from alignq_jax.data.tfds_source import NETWORK_OFF_ENV

    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if os.environ.get(NETWORK_OFF_ENV, "") not in ("", "0"):
        raise DataNotFoundError(f"{CIFAR10_CORRUPTED}: download=True needs the internet, but the network is switched "
                                f"off (${NETWORK_OFF_ENV} is set); nothing was downloaded.")
    outcome: dict[str, Any] = {}

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as exc:
            outcome["error"] = exc

    # A thread, because a name lookup with an unreachable DNS server ignores the socket timeout.
    thread = threading.Thread(target=probe, daemon=True, name=f"probe {host}")
    thread.start()
    thread.join(timeout)
    if not outcome.get("ok"):
        reason = outcome.get("error") or f"no answer within {timeout:g} s"
        raise DataNotFoundError(f"{CIFAR10_CORRUPTED}: download=True needs the internet, but {host}:{port} cannot be "
                                f"reached ({reason}); nothing was downloaded.")


def _download_cifar10_corrupted(builders: list, data_dir) -> None:
    from alignq_jax.data.specs import DataNotFoundError
    from alignq_jax.data.tfds_source import PROBE_TIMEOUT_S, prepare_or_clean_up

    if importlib.util.find_spec("tensorflow") is None:
        # Its TFDS builder reads the downloaded .npy files through tf.io.gfile: fail before a 2.9 GB download.
        raise DataNotFoundError(
            f"{CIFAR10_CORRUPTED}: preparing it needs TensorFlow (pip install tensorflow); nothing was downloaded.\n"
            + _cifar10_corrupted_help(data_dir)
        )
    _check_host(CIFAR10_CORRUPTED_URL, PROBE_TIMEOUT_S)
    for builder in builders:
        config = builder.builder_config.name
        prepare_or_clean_up(builder, f"{CIFAR10_CORRUPTED}/{config}", _cifar10_corrupted_help(data_dir),
                            extra_folders=(f"{CIFAR10_CORRUPTED}/{config}",))


def load_cifar10_corrupted(
    corruptions: str | Iterable[str] | None = None,
    severities: int | Iterable[int] | None = None,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    num_examples: int | None = None,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The published CIFAR-10-C test sets from prepared TFDS data (``cifar10_corrupted``), without TensorFlow.

    Args:
      corruptions, severities: as ``corrupt_test_split`` (benchmark names; ``glass_blur`` and
        ``elastic_transform`` are read from TFDS's ``frosted_glass_blur`` and ``elastic`` configs).
      data_dir: TFDS data dir holding ``cifar10_corrupted/<config>/<version>/``; ``None``: TFDS defaults.
      download: download and prepare missing configs as array_record (needs internet and TensorFlow). Default
        False: fail at once, listing the missing configs.
      num_examples, seed: read the subset ``subset_indices(10000, num_examples, seed)`` (the same test examples
        ``corrupt_test_split`` picks from the CIFAR-10 test split with the same arguments).

    Returns:
      ``{corruption_key(c, s): (images (M, 32, 32, 3) uint8, labels (M,) int32)}``, keys as ``corrupt_test_split``.

    Raises:
      DataNotFoundError: configs not prepared (in well under a second; the message says how to get them), the
        download is impossible or failed, or the data is stored in a format that needs TensorFlow to read.
    """
    from alignq_jax.data.specs import DataNotFoundError
    from alignq_jax.data.tfds_source import _random_access_formats

    cells = [(c, s) for c in check_corruptions(corruptions) for s in check_severities(severities)]
    builders = {cell: _cifar10_corrupted_builder(*cell, data_dir) for cell in cells}
    missing = [cell for cell in cells if not builders[cell].is_prepared()]
    if missing:
        if not download:
            names = ", ".join(f"{CIFAR10_CORRUPTED}/{builders[cell].builder_config.name}" for cell in missing)
            raise DataNotFoundError(
                f"{CIFAR10_CORRUPTED}: {len(missing)} of {len(cells)} requested configs are not prepared under "
                f"data_dir={data_dir!r} ({names}); nothing was downloaded.\n" + _cifar10_corrupted_help(data_dir)
            )
        _download_cifar10_corrupted([builders[cell] for cell in missing], data_dir)
    out = {}
    indices = None
    for cell in cells:
        builder = builders[cell]
        formats = _random_access_formats(builder)
        if not formats:
            raise DataNotFoundError(
                f"{CIFAR10_CORRUPTED}: the TFDS data at {builder.data_path} is stored as {builder.info.file_format}, "
                f"which needs TensorFlow to read; convert it once (with TensorFlow): tfds convert_format "
                f"--dataset_version_dir={builder.data_path} --out_file_format=array_record"
            )
        source = builder.as_data_source(split="test", file_format=formats[0])
        if indices is None:
            indices = subset_indices(len(source), num_examples, seed)
        elif len(source) < int(indices.max()) + 1:
            raise ValueError(f"{builder.data_path}: {len(source)} test examples, fewer than the other configs")
        images = np.empty((len(indices), 32, 32, 3), np.uint8)
        labels = np.empty(len(indices), np.int32)
        for j, i in enumerate(indices):
            example = source[int(i)]
            image = np.asarray(example["image"])
            if image.shape != (32, 32, 3):
                raise ValueError(f"{builder.data_path}[{i}]: image shape {image.shape}, expected (32, 32, 3)")
            images[j], labels[j] = image, example["label"]
        out[corruption_key(*cell)] = (images, labels)
    return out


# ------------------------------------------------------------------------------------------------ summary


@dataclasses.dataclass(frozen=True)
class CorruptionSummary:
    """Mean corruption accuracy of a (corruption x severity) grid (``dataclasses.asdict`` gives plain dicts).

    Attributes:
      mean: mean over every (corruption, severity) cell (equal to the mean of ``per_corruption``).
      per_corruption: {corruption: mean over its severities}, in ``CORRUPTIONS`` order.
      per_severity: {severity: mean over the corruptions}, ascending.
      table: {corruption: {severity: accuracy}}, the per-corruption table.
      count: number of cells.
    """

    mean: float
    per_corruption: Mapping[str, float]
    per_severity: Mapping[int, float]
    table: Mapping[str, Mapping[int, float]]
    count: int


def mean_corruption_accuracy(accuracies: Mapping[Any, float]) -> CorruptionSummary:
    """Mean corruption accuracy (unnormalised: not the AlexNet-relative mCE) and the per-corruption table.

    Args:
      accuracies: {(corruption, severity) or corruption_key: accuracy}; a full grid: every corruption present
        has the same severities.

    Raises:
      ValueError: an empty mapping, a key that is not a corruption cell (e.g. ``"clean"``; filter shifted or clean
        sets out first), a repeated cell (``("fog", 1)`` and ``"fog_1"``), a non-finite accuracy, or a ragged grid
        (the message names the missing cells).
    """
    if not accuracies:
        raise ValueError("no accuracies given")
    table: dict[str, dict[int, float]] = {}
    for key, value in accuracies.items():
        if isinstance(key, tuple) and len(key) == 2:
            name, severity = corruption_key(*key).rsplit("_", 1)
            severity = int(severity)
        else:
            name, severity = parse_corruption_key(key)
        if severity in table.get(name, {}):
            raise ValueError(f"accuracy of {name} severity {severity} given twice")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"accuracy of {name} severity {severity} is {value}")
        table.setdefault(name, {})[severity] = value
    levels = sorted({s for row in table.values() for s in row})
    missing = [corruption_key(c, s) for c in table for s in levels if s not in table[c]]
    if missing:
        raise ValueError(f"the corruption grid is incomplete: every corruption needs severities {levels}; "
                         f"missing {missing}")
    names = [c for c in CORRUPTIONS if c in table]
    table = {c: {s: table[c][s] for s in levels} for c in names}
    per_corruption = {c: float(np.mean(list(table[c].values()))) for c in names}
    per_severity = {s: float(np.mean([table[c][s] for c in names])) for s in levels}
    cells = [table[c][s] for c in names for s in levels]
    return CorruptionSummary(float(np.mean(cells)), per_corruption, per_severity, table, len(cells))
