"""Unsupervised domain adaptation on quantized backbones: DANN and DSAN as training objectives (docs/method.md §10).

Both train on ``alignq_jax.data.PairedDomains`` batches ({"source": {"image", "label"}, "target": {"image"}}),
forwarding the source and the target batch separately (each normalised with its own BatchNorm batch statistics,
the running statistics updated by both passes), and evaluate the class head on the target's test split.

* ``DANN`` (Ganin et al.): a domain classifier on the bottleneck features behind a gradient-reversal layer whose
  coefficient follows 2 / (1 + exp(-10 p)) - 1 over training progress p; loss = CE(source) + domain CE.
* ``DSAN`` (Zhu et al.): local MMD between the source and target bottleneck features, class-conditional weights
  from source labels and target predictions; loss = CE(source) + lmmd_weight * coefficient * LMMD.

With AlignQ's correlation term on (``TrainConfig.admm``), every layer records a gap for the source pass and one for
the target pass, and each has its own ADMM state (the gap tree is {"source": ..., "target": ...}). Where the official
code differs (docs/method.md, quirks 11-13): its DSAN-ADMM path fed the 2048-d target backbone feature to LMMD
(here both domains' bottleneck features, as the original DSAN); its optimizer also trained the ADMM variables Z and
Gamma (here they are only changed by the ADMM update); and only the target pass's gaps reached the ADMM update (here
both passes keep theirs).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from alignq_jax.adaptation_losses import (
    dann_coefficient,
    domain_adversarial_loss,
    gradient_reversal,
    lmmd,
    training_progress,
)
from alignq_jax.models import MODELS
from alignq_jax.models.layers import QuantLayers
from alignq_jax.training.objectives import StepTerms, accuracy, cross_entropy

DOMAINS = ("source", "target")


class AdaptationNet(QuantLayers, kw_only=True):
    """backbone (pooled features) -> [bottleneck Dense] -> classifier Dense, and with ``domain_head`` a domain
    classifier behind a gradient-reversal layer on the same features.

    Fields: ``backbone`` (a key of ``alignq_jax.models.MODELS``, built without its head as the submodule "backbone",
    quantized as its ``config`` says); ``num_classes``; ``bottleneck`` (width of a linear bottleneck, 0: none; no
    BN, ReLU or dropout, as DSAN's); ``domain_head`` (DANN); ``domain_hidden`` (width of the domain classifier's two
    hidden ReLU layers, 0: one linear layer). The heads are full precision, as in the official code.

    ``__call__(x, train, *, grl_coefficient=1.0, outputs="logits")``: (B, H, W, C) images -> (B, num_classes)
    float32 logits, or with ``outputs="all"`` {"logits", "features": (B, F), "domain_logits": (B, 2) (with
    ``domain_head``)}.
    """

    backbone: str
    num_classes: int
    bottleneck: int = 256
    domain_head: bool = False
    domain_hidden: int = 1024

    def __post_init__(self):
        if self.backbone not in MODELS:
            raise ValueError(f"backbone must be one of {tuple(MODELS)}; got {self.backbone!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = True, *, grl_coefficient=1.0, outputs: str = "logits"):
        if outputs not in ("logits", "all"):
            raise ValueError(f"outputs must be 'logits' or 'all'; got {outputs!r}")
        features = MODELS[self.backbone](num_classes=0, name="backbone", **self.layer_fields())(x, train)
        if self.bottleneck:
            features = nn.Dense(self.bottleneck, dtype=jnp.float32, name="bottleneck")(features)
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="classifier")(features)
        result = {"logits": logits, "features": features}
        if self.domain_head:  # always built, so init creates its parameters whatever ``outputs`` asks for
            h = gradient_reversal(features, grl_coefficient)
            for i in range(2 if self.domain_hidden else 0):
                h = nn.relu(nn.Dense(self.domain_hidden, dtype=jnp.float32, name=f"domain_hidden{i}")(h))
            result["domain_logits"] = nn.Dense(2, dtype=jnp.float32, name="domain_classifier")(h)
        return logits if outputs == "logits" else result


def _check_nonnegative(name, value, kind=(int, float)):
    if isinstance(value, bool) or not isinstance(value, kind) or value < 0:
        raise ValueError(f"{name} must be a number >= 0; got {value!r}")


@dataclasses.dataclass(frozen=True)
class _PairedObjective:
    """What DANN and DSAN share: the network, the paired batch layout, per-domain gaps and BN passes."""

    bottleneck: int = 256

    def __post_init__(self):
        _check_nonnegative("bottleneck", self.bottleneck, int)

    def _network_fields(self) -> dict:
        return {"bottleneck": self.bottleneck}

    def network(self, backbone: str, num_classes: int, fields: dict):
        return AdaptationNet(backbone=backbone, num_classes=num_classes, **self._network_fields(), **fields)

    def _passes(self, forward, batch_stats, batch, key, **kwargs):
        """Source then target forward, BatchNorm statistics threaded through both (two running-average updates
        per step, as two PyTorch forwards make). Returns (source outputs, target outputs, batch_stats, gaps)."""
        source_key, target_key = jax.random.split(key)
        source, batch_stats, source_gaps = forward(
            batch_stats, batch["source"]["image"], source_key, outputs="all", **kwargs)
        target, batch_stats, target_gaps = forward(batch_stats, batch["target"]["image"], target_key, outputs="all",
                                                   **kwargs)
        return source, target, batch_stats, {"source": source_gaps, "target": target_gaps}

    def gap_tree(self, gaps):
        return {domain: gaps for domain in DOMAINS}

    def images(self, batch: dict):
        return batch["source"]["image"]

    def statistics_batches(self, batch: dict) -> list[dict]:
        return [{"image": batch[domain]["image"]} for domain in DOMAINS]

    def describe(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class DANN(_PairedObjective):
    """Domain-adversarial training (docs/method.md §10): loss = CE(source) + domain_weight * (CE(domain of source
    -> 0) + CE(domain of target -> 1)), the domain classifier behind a gradient-reversal layer with coefficient
    2 / (1 + exp(-10 p)) - 1, p the training progress (the step's schedule, a traced value).

    Metrics: "ce", "accuracy" (source batch), "domain_loss", "domain_accuracy", and the step's "coefficient".
    """

    name = "dann"
    domain_hidden: int = 1024
    domain_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _check_nonnegative("domain_hidden", self.domain_hidden, int)
        _check_nonnegative("domain_weight", self.domain_weight)

    def _network_fields(self) -> dict:
        return {**super()._network_fields(), "domain_head": True, "domain_hidden": self.domain_hidden}

    def schedule(self, steps_per_epoch: int, epochs: int):
        # The official DANN counts iterations from 1 (docs/method.md §10).
        return lambda step: dann_coefficient(training_progress(step, steps_per_epoch, epochs, offset=1))

    def loss(self, forward, batch_stats, batch, coefficient, key) -> StepTerms:
        source, target, batch_stats, gaps = self._passes(
            forward, batch_stats, batch, key, grl_coefficient=coefficient)
        labels = batch["source"]["label"]
        ce = cross_entropy(source["logits"], labels)
        domain = domain_adversarial_loss(source["domain_logits"], target["domain_logits"])
        domain_accuracy = 0.5 * (accuracy(source["domain_logits"], jnp.zeros_like(labels))
                                 + accuracy(target["domain_logits"], jnp.ones_like(labels)))
        metrics = {"ce": ce, "accuracy": accuracy(source["logits"], labels), "domain_loss": domain,
                   "domain_accuracy": domain_accuracy}
        return StepTerms(ce + self.domain_weight * domain, metrics, batch_stats, gaps)


@dataclasses.dataclass(frozen=True)
class DSAN(_PairedObjective):
    """Deep subdomain adaptation (docs/method.md §10): loss = CE(source) + lmmd_weight * coefficient * LMMD of the
    source and target bottleneck features (multi-kernel Gaussian, class-conditional weights from source labels and
    target predictions), coefficient = 2 / (1 + exp(-10 p)) - 1 over training progress p.

    Metrics: "ce", "accuracy" (source batch), "lmmd", and the step's "coefficient".
    """

    name = "dsan"
    lmmd_weight: float = 0.3

    def __post_init__(self):
        super().__post_init__()
        _check_nonnegative("lmmd_weight", self.lmmd_weight)

    def schedule(self, steps_per_epoch: int, epochs: int):
        # The official DSAN counts iterations from 0 (docs/method.md §10).
        return lambda step: dann_coefficient(training_progress(step, steps_per_epoch, epochs, offset=0))

    def loss(self, forward, batch_stats, batch, coefficient, key) -> StepTerms:
        source, target, batch_stats, gaps = self._passes(forward, batch_stats, batch, key)
        labels = batch["source"]["label"]
        ce = cross_entropy(source["logits"], labels)
        num_classes = source["logits"].shape[-1]
        discrepancy = lmmd(source["features"], target["features"], labels,
                           jax.nn.softmax(target["logits"].astype(jnp.float32)), num_classes)
        metrics = {"ce": ce, "accuracy": accuracy(source["logits"], labels), "lmmd": discrepancy}
        return StepTerms(ce + self.lmmd_weight * coefficient * discrepancy, metrics, batch_stats, gaps)


@dataclasses.dataclass(frozen=True)
class SourceOnly(_PairedObjective):
    """The no-adaptation baseline on the same network and batches: CE on the source batch only (the target batch
    is not forwarded, so it never reaches the BatchNorm statistics). Its variables have the layout of DSAN's (and of
    DANN's without the domain head), so a source-only model and an adapted one compare like for like.

    Metrics: "ce", "accuracy" (source batch).
    """

    name = "source_only"

    def schedule(self, steps_per_epoch: int, epochs: int):
        return None

    def loss(self, forward, batch_stats, batch, coefficient, key) -> StepTerms:
        logits, batch_stats, gaps = forward(batch_stats, batch["source"]["image"], key)
        labels = batch["source"]["label"]
        ce = cross_entropy(logits, labels)
        return StepTerms(ce, {"ce": ce, "accuracy": accuracy(logits, labels)}, batch_stats, {"source": gaps})

    def gap_tree(self, gaps):
        return {"source": gaps}

    def statistics_batches(self, batch: dict) -> list[dict]:
        return [{"image": batch["source"]["image"]}]


OBJECTIVES = {"dann": DANN, "dsan": DSAN, "source_only": SourceOnly}


def make_objective(name: str, **options):
    """A domain-adaptation objective by name ("dann", "dsan", "source_only") with its options."""
    try:
        cls = OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"adaptation method must be one of {tuple(OBJECTIVES)}; got {name!r}") from None
    return cls(**options)
