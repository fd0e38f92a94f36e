"""A trained model you can use: predict, evaluate on any data set, swap or re-estimate its BatchNorm statistics.

The jitted functions live at module level with the (hashable) Linen model as a static argument, so they compile
once per model and batch shape for every ``TrainedModel`` and every call, not once per call.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignq_jax.training.batchnorm import reestimate_batch_stats


@partial(jax.jit, static_argnums=0)
def _logits(model, variables, images):
    return model.apply(variables, images, train=False).astype(jnp.float32)


@partial(jax.jit, static_argnums=0)
def _eval_sums(model, variables, images, labels, mask):
    """Sums over the real rows (mask True) of one batch, as the training loop's eval step computes them."""
    logits = model.apply(variables, images, train=False)
    mask = mask.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {
        "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
        "loss_sum": jnp.sum(ce * mask),
        "count": jnp.sum(mask),
    }


def _pad_to(batch: dict, rows: int) -> dict:
    """``batch`` with zero rows (mask False) appended up to ``rows`` rows."""
    n = len(batch["label"])
    if n == rows:
        return batch
    if n > rows:
        raise ValueError(f"a batch of {n} rows follows a first batch of {rows}: batches after the first may only be "
                         "smaller (a padded last batch), or pass batch_size")
    extra = rows - n
    return {k: np.concatenate([v, np.zeros((extra,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


@dataclasses.dataclass(frozen=True, eq=False)
class TrainedModel:
    """A trained network ready to use (what ``FitResult.trained`` returns).

    Attributes:
      model: the single-device Linen model (no device axis), e.g. ``make_model(config, num_classes)``.
      variables: {"params", "batch_stats"}.
      config: the TrainConfig it was trained with (``eval_batch_size`` is the default evaluation batch).
      num_classes: number of classes (logits per image).
    """

    model: Any
    variables: dict
    config: Any
    num_classes: int

    def predict(self, images, batch_size: int = 256) -> np.ndarray:
        """Logits (N, num_classes) float32 of ``images`` (N, H, W, C), normalised as the data set's batches are
        (``ArrayDataset.test_batches`` yields them so). Runs in chunks of ``batch_size`` rows, the last one padded,
        so every call compiles at most once per ``batch_size``."""
        _check_batch_size(batch_size)
        images = np.asarray(images, np.float32)
        if images.ndim != 4:
            raise ValueError(f"images must be (N, H, W, C); got shape {images.shape}")
        out = []
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start:start + batch_size]
            n = chunk.shape[0]
            if n < batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], np.float32)])
            out.append(np.asarray(_logits(self.model, self.variables, chunk))[:n])
        if not out:
            return np.zeros((0, self.num_classes), np.float32)
        return np.concatenate(out)

    def evaluate(self, data, batch_size: int | None = None) -> dict:
        """Accuracy and mean cross-entropy on ``data``: an ``ArrayDataset`` (its test split, in batches of
        ``batch_size``, default ``config.eval_batch_size``, the last one padded) or an iterable of batches
        {"image": (B, H, W, C) normalised, "label": (B,) int, optionally "mask": (B,) bool} (a batch smaller than
        the first is padded to its size, so a ragged last batch does not compile again).

        Returns {"accuracy", "loss" (means over the real rows), "count" (number of real rows)}.
        """
        if hasattr(data, "test_batches"):
            size = self.config.eval_batch_size if batch_size is None else batch_size
            _check_batch_size(size)
            batches = data.test_batches(size)
        elif batch_size is not None:
            raise ValueError("batch_size only applies to a data set (an object with test_batches); an iterable "
                             "of batches keeps its own batch size")
        else:
            batches = data
        totals = {"correct": 0.0, "loss_sum": 0.0, "count": 0.0}
        rows = None
        for batch in batches:
            batch = _as_eval_batch(batch)
            rows = len(batch["label"]) if rows is None else rows
            batch = _pad_to(batch, rows)
            sums = _eval_sums(self.model, self.variables, batch["image"], batch["label"], batch["mask"])
            for k in totals:
                totals[k] += float(sums[k])
        if not totals["count"]:
            raise ValueError("evaluate got no batch with a real (unmasked) row")
        count = totals["count"]
        return {"accuracy": totals["correct"] / count, "loss": totals["loss_sum"] / count, "count": int(count)}

    def reestimated(self, batches: Iterable[dict], num_batches: int | None = None, *,
                    which: Callable[[str], bool] | None = None) -> "TrainedModel":
        """The same model with BatchNorm (and quantizer) statistics re-estimated from ``batches``
        (``alignq_jax.training.reestimate_batch_stats``: training batches for precise BN, unlabelled target-domain
        batches for AdaBN; masked rows are dropped). Only ``variables["batch_stats"]`` changes."""
        return self.with_batch_stats(
            reestimate_batch_stats(self.model, self.variables, batches, num_batches=num_batches, which=which)
        )

    def with_batch_stats(self, batch_stats) -> "TrainedModel":
        """The same model with ``batch_stats`` (same tree and shapes as the current ones) in place of its own."""
        old = self.variables.get("batch_stats", {})
        if jax.tree.structure(old) != jax.tree.structure(batch_stats):
            raise ValueError("batch_stats must have the same tree as the model's: "
                             f"{jax.tree.structure(old)} vs {jax.tree.structure(batch_stats)}")
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(old)[0], jax.tree.leaves(batch_stats)):
            if np.shape(a) != np.shape(b):
                raise ValueError(f"batch_stats{jax.tree_util.keystr(path)} has shape {np.shape(b)}; the model's has "
                                 f"{np.shape(a)}")
        return dataclasses.replace(self, variables={**self.variables, "batch_stats": batch_stats})


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")


def _as_eval_batch(batch) -> dict:
    if not isinstance(batch, dict) or "image" not in batch or "label" not in batch:
        raise ValueError("each evaluation batch must be a dict with 'image' and 'label' (and optionally 'mask')")
    images = np.asarray(batch["image"], np.float32)
    labels = np.asarray(batch["label"]).astype(np.int32)
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"batch images must be (B, H, W, C) and labels (B,); got {images.shape} and {labels.shape}")
    mask = np.ones(len(labels), bool) if "mask" not in batch else np.asarray(batch["mask"]).astype(bool)
    if mask.shape != labels.shape:
        raise ValueError(f"batch mask must have shape {labels.shape}; got {mask.shape}")
    return {"image": images, "label": labels, "mask": mask.copy()}


__all__ = ["TrainedModel"]
