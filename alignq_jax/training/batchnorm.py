"""BatchNorm re-estimation: running statistics recomputed from batches with the weights held fixed.

After quantization-aware training the running BatchNorm statistics are an exponential average over the last few
hundred steps, taken while the quantized weights still moved (weights that flip between grid points change the
statistics of every layer after them). Evaluation-mode accuracy then swings from epoch to epoch and from seed to
seed. Recomputing the statistics with the final weights as a plain average over many batches ("precise BN")
removes that noise; run on unlabelled data of another domain, the same function is AdaBN.

``reestimate_batch_stats`` runs the model in training mode with ``bn_momentum=0`` on every batch (so the
statistics it reports are that batch's alone) and combines the batches exactly:

* BatchNorm mean and variance (every :class:`~alignq_jax.quantize.QuantBatchNorm`): the mean and the unbiased
  variance of the union of all the batches' positions, as if BatchNorm had seen all batches at once (the variance
  includes the spread of the batch means, which an average of per-batch variances would miss).
* every other "batch_stats" leaf (a method's running activation statistics, e.g. absmax ranges, and BatchNorm
  layers of other kinds): the average of the per-batch values weighted by the batch's row count.

The combination runs on the host in float64 (Chan's pairwise update), so neither the order nor the number of
batches costs precision.
"""

from __future__ import annotations

import dataclasses
import itertools
from functools import partial
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from alignq_jax.quantize import BN_MOMENTS_COLLECTION, QuantBatchNorm

INTERMEDIATES = "intermediates"


def _is_batchnorm_call(module, method_name: str) -> bool:
    return method_name == "__call__" and isinstance(module, QuantBatchNorm)


@partial(jax.jit, static_argnums=0)
def _batch_statistics(model, variables, images):
    """One training-mode forward of ``model`` (momentum 0) on ``images`` (B, H, W, C).

    Returns (batch_stats: this batch's value of every leaf, moments: {bn path: {"moments": ((mean, biased var),
    ...)}} one pair per call of each QuantBatchNorm, positions: {bn path: {"__call__": (P, ...)}} the positions per
    row each call normalises over (H*W of its input), as int32 scalars).
    """
    _, updates = model.apply(
        variables, images, train=True, mutable=["batch_stats", BN_MOMENTS_COLLECTION],
        capture_intermediates=_is_batchnorm_call,
    )
    # Only the shapes of the captured BatchNorm outputs are used: they are constants, nothing is transferred.
    positions = jax.tree.map(
        lambda y: jnp.asarray(y.size // (y.shape[0] * y.shape[-1]), jnp.int32), updates.get(INTERMEDIATES, {})
    )
    return updates.get("batch_stats", {}), updates.get(BN_MOMENTS_COLLECTION, {}), positions


@dataclasses.dataclass
class _Union:
    """Running (count, mean, M2) of the union of several sets of positions, M2 = sum of squared deviations."""

    count: float
    mean: np.ndarray
    m2: np.ndarray

    def merge(self, other: "_Union") -> "_Union":
        total = self.count + other.count
        delta = other.mean - self.mean
        return _Union(
            total,
            self.mean + delta * (other.count / total),
            self.m2 + other.m2 + delta * delta * (self.count * other.count / total),
        )


@dataclasses.dataclass
class _Average:
    """Running row-weighted sum of one leaf's per-batch values."""

    weight: float
    total: np.ndarray

    def merge(self, other: "_Average") -> "_Average":
        return _Average(self.weight + other.weight, self.total + other.total)


def _merge_into(acc: dict, new: dict) -> dict:
    for key, value in new.items():
        acc[key] = value if key not in acc else acc[key].merge(value)
    return acc


def _batch_accumulators(stats, moments, positions, rows: int) -> dict:
    """The accumulators of one batch: {(bn path, "moments"): _Union} for QuantBatchNorm layers, {leaf path:
    _Average} for every batch_stats leaf that is not a QuantBatchNorm mean/var."""
    out: dict = {}
    bn_paths = set()
    flat_moments = traverse_util.flatten_dict(moments, is_leaf=lambda _, v: isinstance(v, tuple))
    flat_positions = traverse_util.flatten_dict(positions, is_leaf=lambda _, v: isinstance(v, tuple))
    for path, calls in flat_moments.items():
        bn = path[:-1]  # drop "moments"
        bn_paths.add(bn)
        sizes = flat_positions.get(bn + ("__call__",))
        if sizes is None or len(sizes) != len(calls):
            raise ValueError(f"BatchNorm {'/'.join(bn)}: {len(calls)} calls recorded moments but "
                             f"{0 if sizes is None else len(sizes)} outputs were captured")
        for (mean, var), size in zip(calls, sizes):
            count = float(rows * int(size))
            part = _Union(count, np.asarray(mean, np.float64), np.asarray(var, np.float64) * count)
            _merge_into(out, {(bn, "moments"): part})
    for path, value in traverse_util.flatten_dict(stats).items():
        if path[:-1] in bn_paths and path[-1] in ("mean", "var"):
            continue
        _merge_into(out, {path: _Average(float(rows), np.asarray(value, np.float64) * rows)})
    return out


def _allgather_merge(acc: dict) -> dict:
    """Every process's accumulators merged (the same result on every process); call on all processes."""
    from jax.experimental import multihost_utils

    keys = sorted(acc, key=str)
    local = {}
    for i, key in enumerate(keys):
        a = acc[key]
        if isinstance(a, _Union):
            local[str(i)] = (np.float64(a.count), a.mean, a.m2)
        else:
            local[str(i)] = (np.float64(a.weight), a.total)
    gathered = multihost_utils.process_allgather(local)  # leading axis: processes
    out: dict = {}
    for i, key in enumerate(keys):
        parts = [np.asarray(x) for x in gathered[str(i)]]
        for p in range(parts[0].shape[0]):
            if isinstance(acc[key], _Union):
                part = _Union(float(parts[0][p]), parts[1][p], parts[2][p])
            else:
                part = _Average(float(parts[0][p]), parts[1][p])
            _merge_into(out, {key: part})
    return out


def _check_model(model) -> None:
    names = {f.name for f in dataclasses.fields(model)} if dataclasses.is_dataclass(model) else set()
    if "bn_momentum" not in names:
        raise ValueError(
            f"reestimate_batch_stats needs a model with a bn_momentum field (the running-statistics momentum of its "
            f"BatchNorm layers, set to 0 to read one batch's statistics); {type(model).__name__} has none"
        )


def _valid_images(batch) -> np.ndarray | None:
    """The batch's images without its padding rows (mask False); None when no row is real."""
    if not isinstance(batch, dict) or "image" not in batch:
        raise ValueError(f"each batch must be a dict with an 'image' array (and optionally 'mask'); got "
                         f"{type(batch).__name__}{' with keys ' + str(sorted(batch)) if isinstance(batch, dict) else ''}")
    images = np.asarray(batch["image"])
    if images.ndim != 4:
        raise ValueError(f"batch images must be (B, H, W, C); got shape {images.shape}")
    if "mask" in batch:
        mask = np.asarray(batch["mask"]).astype(bool)
        if mask.shape != images.shape[:1]:
            raise ValueError(f"batch mask must have shape ({images.shape[0]},); got {mask.shape}")
        images = images[mask]
    return images if images.shape[0] else None


def batch_stats_paths(batch_stats) -> list[str]:
    """The "/"-joined paths of every leaf of ``batch_stats`` ("bn0/mean", "conv1/ConvQuantizer_0/activation/range"),
    as ``which`` sees them."""
    return ["/".join(map(str, path)) for path in traverse_util.flatten_dict(batch_stats)]


def reestimate_batch_stats(
    model,
    variables: dict,
    batches: Iterable[dict],
    *,
    num_batches: int | None = None,
    which: Callable[[str], bool] | None = None,
    across_processes: bool = False,
) -> dict:
    """BatchNorm (and quantizer) running statistics recomputed from ``batches`` with ``variables["params"]`` fixed.

    Args:
      model: a Linen model with a ``bn_momentum`` field (every model of ``alignq_jax.models``), called as
        ``model.apply(variables, images, train=True)``; it runs as ``model.clone(bn_momentum=0.0)``.
      variables: {"params", "batch_stats"}.
      batches: an iterable of {"image": (B, H, W, C) float (normalised like the training data), optionally "mask":
        (B,) bool}; rows whose mask is False (the padding of an evaluation batch) are dropped before the forward,
        so they never enter any statistic. Training batches (precise BN) or unlabelled data of a target domain
        (AdaBN). Only iterated, never closed.
      num_batches: use the first ``num_batches`` batches (None: all of them).
      which: ``which(path) -> bool`` on a leaf's "/"-joined path (see ``batch_stats_paths``): only leaves where
        it is True are replaced, the others keep their values in ``variables`` (e.g. ``lambda p: "Quantizer" in
        p`` for the quantizers' statistics only). None: all leaves.
      across_processes: several processes (multi-host) each pass their own batches; the result combines all of
        them and is the same on every process (a collective: every process must call it).

    Returns:
      the new "batch_stats" (same tree, shapes and dtypes): QuantBatchNorm "mean"/"var" = mean and unbiased
      variance over the union of the batches' positions (B * H * W per batch); every other leaf = the row-weighted
      average of its per-batch values. The forward is jitted once per model and batch shape (a padded last batch
      adds one shape: its real rows).

    Raises:
      ValueError: the model has no ``bn_momentum`` field, ``num_batches`` is not a positive int, or no batch with a
      real row was given.
    """
    _check_model(model)
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None (all batches); got {num_batches!r}")
    if not isinstance(variables, dict) or "params" not in variables:
        raise ValueError("variables must be a dict with 'params' (and 'batch_stats')")
    old = variables.get("batch_stats", {})
    if not jax.tree.leaves(old):
        return old
    probe = model.clone(bn_momentum=0.0)
    # Zeros in: with momentum 0 the result is the batch's value alone (0 * stale never turns a stale NaN into NaN).
    inputs = {"params": variables["params"], "batch_stats": jax.tree.map(jnp.zeros_like, old)}
    acc: dict = {}
    seen = 0
    for batch in itertools.islice(batches, num_batches):
        images = _valid_images(batch)
        if images is None:
            continue
        stats, moments, positions = jax.device_get(_batch_statistics(probe, inputs, jnp.asarray(images)))
        _merge_into(acc, _batch_accumulators(stats, moments, positions, images.shape[0]))
        seen += 1
    if not seen:
        raise ValueError("reestimate_batch_stats got no batch with a real (unmasked) row")
    if across_processes and jax.process_count() > 1:
        acc = _allgather_merge(acc)

    flat_old = traverse_util.flatten_dict(old)
    flat_new = {}
    for path, value in flat_old.items():
        name = "/".join(map(str, path))
        if which is not None and not which(name):
            flat_new[path] = value
            continue
        union = acc.get((path[:-1], "moments"))
        if union is not None and path[-1] in ("mean", "var"):
            new = union.mean if path[-1] == "mean" else union.m2 / max(union.count - 1.0, 1.0)
        elif path in acc:
            new = acc[path].total / acc[path].weight
        else:
            raise ValueError(f"batch_stats leaf {name!r} was not updated by the training-mode forward")
        dtype = getattr(value, "dtype", np.float32)
        flat_new[path] = jnp.asarray(np.reshape(new, np.shape(value)), dtype)
    return traverse_util.unflatten_dict(flat_new)


__all__ = ["batch_stats_paths", "reestimate_batch_stats"]
