"""What a training step minimises: the objective a ``TrainConfig`` trains with.

``fit`` and the train step are written once; an objective says what changes between tasks:

* the network built around the backbone named by ``TrainConfig.model`` (``network``);
* the loss of one step, from however many forward passes it needs (``loss``): it receives ``forward``, which runs
  the network in training mode on some images and returns (outputs, new BatchNorm statistics, correlation gaps),
  so it decides the batch layout and how the BatchNorm statistics thread through its passes;
* its own metrics (the step adds "loss" and "penalty");
* a schedule of the step, evaluated inside the jitted step and passed to ``loss`` as a traced value (DANN's
  gradient-reversal coefficient), so it never recompiles;
* the layout of the correlation gaps one step records (one tree per forward pass), which the ADMM state mirrors;
* where the images of a batch are (initialisation of quantizer state, BatchNorm re-estimation).

``Classification`` is the plain supervised objective; the domain-adaptation objectives live in
``alignq_jax.adaptation``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from alignq_jax.models import get_model

# forward(batch_stats, images, key, **network_kwargs) -> (outputs, batch_stats, gaps)
Forward = Callable[..., tuple[Any, Any, Any]]


class StepTerms(NamedTuple):
    """What ``Objective.loss`` returns: the task loss (before the ADMM penalty), metrics (scalars; the step adds
    "loss" and "penalty"), the BatchNorm statistics after its passes, and the correlation gaps it recorded (laid
    out as ``gap_tree`` says)."""

    loss: jax.Array
    metrics: dict
    batch_stats: Any
    gaps: Any


def accuracy(logits, labels) -> jax.Array:
    """Fraction of rows whose argmax is the label; (B, K), (B,) -> scalar float32."""
    return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def cross_entropy(logits, labels) -> jax.Array:
    """Mean softmax cross-entropy in float32; (B, K) logits, (B,) int labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


@dataclasses.dataclass(frozen=True)
class Classification:
    """Supervised classification: one forward pass of {"image", "label"} batches, cross-entropy.

    Metrics: "ce", "accuracy" (of the training batch). The network is the backbone itself (its "fc" head).
    """

    name = "classification"

    def network(self, backbone: str, num_classes: int, fields: dict):
        """The model to train: the network named ``backbone`` (a key of ``alignq_jax.models.MODELS``) with
        ``num_classes`` outputs and the layer ``fields`` (config, axis names, dtype)."""
        return get_model(backbone, num_classes=num_classes, **fields)

    def schedule(self, steps_per_epoch: int, epochs: int) -> Callable[[jax.Array], jax.Array] | None:
        """A function of the step counter (traced int) passed to ``loss`` as ``coefficient``; None: none."""
        return None

    def loss(self, forward: Forward, batch_stats, batch: dict, coefficient, key) -> StepTerms:
        logits, batch_stats, gaps = forward(batch_stats, batch["image"], key)
        ce = cross_entropy(logits, batch["label"])
        return StepTerms(ce, {"ce": ce, "accuracy": accuracy(logits, batch["label"])}, batch_stats, gaps)

    def gap_tree(self, gaps):
        """The layout of one step's gaps, given the gaps of one forward pass (the ADMM state mirrors it)."""
        return gaps

    def images(self, batch: dict):
        """The images of a training batch that quantizer parameters and statistics are initialised from."""
        return batch["image"]

    def statistics_batches(self, batch: dict) -> list[dict]:
        """The {"image"} batches a training batch contributes to BatchNorm re-estimation (the passes training
        normalised, so re-estimation replaces what the running averages averaged)."""
        return [{"image": batch["image"]}]

    def describe(self) -> dict:
        """JSON-ready description (config.json, results)."""
        return {"name": self.name, **dataclasses.asdict(self)}


CLASSIFICATION = Classification()
