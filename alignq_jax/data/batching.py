"""Fixed-shape numpy batches from in-memory arrays, with deterministic shuffling and background prefetch.

Every batch is a dict ``{"image": (B, H, W, C) float32, "label": (B,) int32, "mask": (B,) bool}`` with the
same shapes, so one jitted train/eval step serves the whole epoch. Training batches (``drop_last=True``) are
all real (mask all True); evaluation batches (``drop_last=False``) pad the last one with zero images, label 0
and ``mask=False`` so accuracy can be computed as ``sum(correct * mask) / sum(mask)``.

Randomness is a pure function of ``(seed, epoch)`` (shuffle order) and ``(seed, epoch, batch index)``
(augmentation), so results do not depend on prefetching or on the order batches are consumed. Training data
sharded over processes is split inside every global batch: the shards of batch b, concatenated in shard order,
are exactly the one-process batch b (same examples, same augmentation).

Reference: docs/method.md §8 (batch sizes, augmentation, evaluation on the full test set).
"""

from __future__ import annotations

import math
import queue
import threading
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from alignq_jax.data.augment import augment_batch, crop_flip, normalize
from alignq_jax.data.specs import AUGMENTATIONS

Batch = dict[str, np.ndarray]


def _check_nonneg_int(value: Any, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def num_batches(num_examples: int, batch_size: int, *, drop_last: bool, num_shards: int = 1) -> int:
    """Number of batches ``iterate_batches`` yields per shard (the same on every shard).

    ``drop_last``: num_examples // (num_shards * batch_size), the whole global batches (equal to
    floor((num_examples // num_shards) / batch_size)); otherwise ceil(ceil(num_examples / num_shards) / batch_size).
    """
    num_examples = _check_nonneg_int(num_examples, "num_examples")
    batch_size = _check_nonneg_int(batch_size, "batch_size", 1)
    num_shards = _check_nonneg_int(num_shards, "num_shards", 1)
    if drop_last:
        return num_examples // (num_shards * batch_size)
    return math.ceil(math.ceil(num_examples / num_shards) / batch_size)


def epoch_indices(
    num_examples: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = True,
    num_shards: int = 1,
    shard_index: int = 0,
    batch_size: int | None = None,
) -> np.ndarray:
    """Example indices one shard visits in one epoch, in order.

    The permutation is ``np.random.default_rng([seed, epoch, 0]).permutation(num_examples)`` (identity when
    not shuffling), shared by all shards.

    With ``drop_last`` and ``batch_size`` (training: ``batch_size`` rows per shard and batch), the permutation
    is cut into global batches of ``num_shards * batch_size`` entries (only whole ones) and shard ``s`` takes
    block ``s`` of each: the shards of a global batch, concatenated in shard order, are the one-shard batch of
    ``num_shards * batch_size`` rows. Otherwise shard ``s`` takes every ``num_shards``-th entry starting at
    ``s``; with ``drop_last`` every shard keeps exactly ``num_examples // num_shards`` of them. Shards are
    disjoint either way.

    Returns:
      (M,) int64 indices.
    """
    n = _check_nonneg_int(num_examples, "num_examples")
    seed = _check_nonneg_int(seed, "seed")
    epoch = _check_nonneg_int(epoch, "epoch")
    num_shards = _check_nonneg_int(num_shards, "num_shards", 1)
    shard_index = _check_nonneg_int(shard_index, "shard_index")
    if shard_index >= num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    order = np.random.default_rng([seed, epoch, 0]).permutation(n) if shuffle else np.arange(n)
    if drop_last and batch_size is not None:
        batch_size = _check_nonneg_int(batch_size, "batch_size", 1)
        group = num_shards * batch_size
        blocks = order[: n // group * group].reshape(-1, num_shards, batch_size)
        return blocks[:, shard_index].reshape(-1)
    mine = order[shard_index::num_shards]
    if drop_last:
        mine = mine[: n // num_shards]
    return mine


def _batch_generator(
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    batch_size: int,
    steps: int,
    *,
    rng_key: Sequence[int],
    augment: str,
    pad: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    normalise: bool,
    num_shards: int = 1,
    shard_index: int = 0,
) -> Iterator[Batch]:
    for b in range(steps):
        idx = indices[b * batch_size : (b + 1) * batch_size]
        valid = idx.shape[0]
        x = images[idx]
        y = labels[idx].astype(np.int32)
        if valid < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - valid,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros(batch_size - valid, np.int32)])
        if augment != "none":
            rng = np.random.default_rng([*rng_key, b])
            if num_shards == 1:
                x = augment_batch(x, rng, augment, pad=pad)
            else:
                x = _augment_shard(x, rng, augment, pad, num_shards, shard_index)
        if normalise:
            x = normalize(x, mean, std)
        yield {"image": x, "label": y, "mask": np.arange(batch_size) < valid}


def _augment_shard(x, rng, augment: str, pad: int, num_shards: int, shard_index: int) -> np.ndarray:
    """This shard's rows of ``augment_batch`` applied to the global batch of ``num_shards * len(x)`` rows.

    Draws the global batch's crop offsets and flips exactly as ``random_crop_flip`` does (the data tests check
    that the shards put together equal the one-shard batch) and crops only this shard's rows.
    """
    rows, total = len(x), num_shards * len(x)
    if augment == "flip":
        pad = 0
        oy = ox = np.zeros(total, np.intp)
    else:
        oy = rng.integers(0, 2 * pad + 1, size=total)
        ox = rng.integers(0, 2 * pad + 1, size=total)
    flip = rng.random(total) < 0.5
    mine = slice(shard_index * rows, (shard_index + 1) * rows)
    return crop_flip(x, oy[mine], ox[mine], flip[mine], pad=pad)


def iterate_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    augment: str = "none",
    pad: int = 4,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    normalise: bool = True,
    drop_last: bool = True,
    prefetch: int = 2,
    num_shards: int = 1,
    shard_index: int = 0,
) -> Iterator[Batch]:
    """Yields one epoch of fixed-shape batches (docs/method.md §8 recipes).

    Args:
      images: (N, H, W, C) uint8 pixels, or float pixels in [0, 1].
      labels: (N,) integer labels.
      batch_size: B, the leading dimension of every batch.
      shuffle: permute the examples with ``default_rng([seed, epoch, 0])``.
      seed, epoch: non-negative ints; the same pair gives the same order and augmentation.
      augment: ``"none"``, ``"crop_flip"`` (CIFAR) or ``"flip"``; applied before normalisation, so crop
        padding is black pixels as in torchvision.
      pad: crop padding for ``"crop_flip"``.
      mean, std: per-channel normalisation on [0, 1] pixels (``None``: no shift / no scaling).
      normalise: if False, images are yielded in their stored dtype (e.g. uint8) after augmentation, for
        normalising on the device instead.
      drop_last: True for training (only full batches; raises if there is not even one); False for evaluation
        (the last batch is zero-padded and flagged in ``mask``).
      prefetch: size of the background-thread queue (0: produce batches in the calling thread).
      num_shards, shard_index: data-parallel processes; each yields ``num_batches(...)`` batches of disjoint
        examples (see ``epoch_indices``). For training (``drop_last``) ``batch_size`` is the shard's part of a
        global batch of ``num_shards * batch_size`` rows, and the shards of batch b put together in shard order
        are the one-shard batch b of that size, augmentation included.

    Returns:
      An iterator of ``{"image": (B, H, W, C) float32 (stored dtype if not normalise), "label": (B,) int32,
      "mask": (B,) bool}``. Arguments are validated when this function is called, not on the first batch.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W, C), got shape {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"labels must have shape (N,) with N = {images.shape[0]} (number of images), got shape {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    batch_size = _check_nonneg_int(batch_size, "batch_size", 1)
    pad = _check_nonneg_int(pad, "pad")
    prefetch = _check_nonneg_int(prefetch, "prefetch")
    indices = epoch_indices(
        images.shape[0],
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        drop_last=drop_last,
        num_shards=num_shards,
        shard_index=shard_index,
        batch_size=batch_size if drop_last else None,
    )
    steps = num_batches(images.shape[0], batch_size, drop_last=drop_last, num_shards=num_shards)
    if drop_last and steps == 0:
        raise ValueError(
            f"drop_last=True with batch_size={batch_size} leaves no batch: only {images.shape[0] // num_shards} "
            f"examples per shard ({images.shape[0]} in total over {num_shards} shard(s)); lower the batch size"
        )
    gen = _batch_generator(
        images,
        labels,
        indices,
        batch_size,
        steps,
        # Shard 0's key for every shard: augmentation is drawn for the global batch (see _augment_shard).
        rng_key=(int(seed), int(epoch), 1, 0),
        augment=augment,
        pad=pad,
        mean=mean,
        std=std,
        normalise=normalise,
        num_shards=num_shards if drop_last else 1,
        shard_index=shard_index,
    )
    return prefetch_in_thread(gen, prefetch) if prefetch > 0 else gen


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def close_if_closable(obj) -> None:
    """Calls ``obj.close()`` when it has one: a batch generator left half read (stops its prefetching thread or
    grain workers), or a data set holding worker processes."""
    close = getattr(obj, "close", None)
    if close is not None:
        close()


def prefetch_in_thread(iterable: Iterable[Any], size: int = 2) -> Iterator[Any]:
    """Runs ``iterable`` on a daemon thread, buffering up to ``size`` items in a bounded queue.

    Host-side batch preparation then overlaps the (asynchronous) device step. Exceptions raised by the
    producer are re-raised in the consumer; closing or abandoning the returned generator stops the thread.
    """
    size = _check_nonneg_int(size, "size", 1)
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterable:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(_Failure(exc))

    def consume() -> Iterator[Any]:
        thread = threading.Thread(target=produce, name="alignq-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            stop.set()
            thread.join()

    return consume()
