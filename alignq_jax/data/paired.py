"""Paired source/target batches for unsupervised domain adaptation (docs/method.md §10).

``PairedDomains`` turns a labelled source data set and an unlabelled target data set into the batch layout the
domain-adaptation objectives read: ``{"source": {"image", "label"}, "target": {"image"}}``. The target's labels
are dropped here, so no training code can read them; the target's test split is what ``fit`` evaluates.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from alignq_jax.data.batching import close_if_closable

# The target's data order is drawn from another seed than the source's, so the two shuffles are independent.
_TARGET_SEED_OFFSET = 7919


@dataclasses.dataclass(frozen=True)
class PairedDomains:
    """A source data set (labelled training images) and a target data set (its training images unlabelled, its
    test split evaluated), as one data set for ``fit``.

    Both take the batch interface of ``ArrayDataset`` (``steps_per_epoch``, ``train_batches``, ``test_batches``,
    ``image_shape``, ``num_classes``). An epoch has ``max(source steps, target steps)`` steps, as the official
    code's; the domain with fewer batches starts a new pass over its data (a new shuffle) when it runs out, so every
    step pairs two full batches. Data order is a function of (seed, epoch) only (a resumed run sees the same
    batches), and the target's shuffle uses another seed than the source's.
    """

    source: Any
    target: Any
    name: str = "paired"

    def __post_init__(self):
        if tuple(self.source.image_shape) != tuple(self.target.image_shape):
            raise ValueError(
                f"source and target images differ in shape: {tuple(self.source.image_shape)} vs "
                f"{tuple(self.target.image_shape)}; resize one domain to the other's shape"
            )
        if self.source.num_classes != self.target.num_classes:
            raise ValueError(
                f"source has {self.source.num_classes} classes but target {self.target.num_classes}: the tasks must "
                "share their label set"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.source.image_shape)

    @property
    def num_classes(self) -> int:
        return int(self.source.num_classes)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Paired steps per epoch: the larger of the two domains' training batches (``drop_last``)."""
        source, target = self.source.steps_per_epoch(batch_size), self.target.steps_per_epoch(batch_size)
        if min(source, target) < 1:
            small = "source" if source < 1 else "target"
            raise ValueError(f"the {small} training split has fewer images than one batch of {batch_size}")
        return max(source, target)

    def train_batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0, num_shards: int = 1,
                      shard_index: int = 0) -> Iterator[dict]:
        """One epoch of {"source": {"image": (B, H, W, C), "label": (B,)}, "target": {"image": (B, H, W, C)}},
        B = ``batch_size`` rows of this shard (see ``ArrayDataset.train_batches``)."""
        steps = self.steps_per_epoch(batch_size * num_shards)
        shard = {"num_shards": num_shards, "shard_index": shard_index}
        source = _cycle(self.source, batch_size, seed, epoch, steps, shard)
        target = _cycle(self.target, batch_size, seed + _TARGET_SEED_OFFSET, epoch, steps, shard)
        try:
            for _ in range(steps):
                s, t = next(source), next(target)
                yield {"source": {"image": s["image"], "label": s["label"]}, "target": {"image": t["image"]}}
        finally:  # stops the domains' prefetch threads / workers when the epoch ends or is interrupted
            source.close()
            target.close()

    def test_batches(self, batch_size: int, *, num_shards: int = 1, shard_index: int = 0):
        """The target's test split (padded, with "mask")."""
        return self.target.test_batches(batch_size, num_shards=num_shards, shard_index=shard_index)


def _cycle(dataset, batch_size: int, seed: int, epoch: int, steps: int, shard: dict) -> Iterator[dict]:
    """``steps`` training batches of ``dataset``: its passes for this epoch, each a new shuffle. Pass r of epoch e
    uses the data set's epoch index e * passes + r (passes = passes needed per epoch), so no two (epoch, pass)
    pairs share a shuffle and the order depends only on (seed, epoch)."""
    per_pass = dataset.steps_per_epoch(batch_size * shard["num_shards"])
    passes = -(-steps // per_pass)
    for r in range(passes):
        batches = dataset.train_batches(batch_size, seed=seed, epoch=epoch * passes + r, **shard)
        try:
            for batch in batches:
                yield batch
        finally:
            close_if_closable(batches)
