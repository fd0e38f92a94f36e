"""The training loop's open points: objectives (own loss, metrics, batch layout, a traced schedule), parameter
groups with their own learning rates, and paired source/target batches."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax.data import ArrayDataset
from alignq_jax.data.paired import PairedDomains
from alignq_jax.quantize import QuantConfig
from alignq_jax.training import TrainConfig, canonical_state, create_train_state, fit, make_steps
from alignq_jax.training.objectives import Classification, StepTerms, cross_entropy
from alignq_jax.training.state import parameter_groups


def _arrays(seed, n_train=24, n_test=10, shape=(8, 8, 1), classes=3):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, *shape), dtype=np.uint8), rng.integers(0, classes, n_train),
            rng.integers(0, 256, (n_test, *shape), dtype=np.uint8), rng.integers(0, classes, n_test))


def _dataset(seed, **kwargs):
    return ArrayDataset(*_arrays(seed, **kwargs), num_classes=3, mean=(0.5,), std=(0.25,))


# ------------------------------------------------------------------------------------------------------------
# Parameter groups


def _one_step_update(config, batch):
    steps = make_steps(config, 3, steps_per_epoch=4)
    state = canonical_state(steps, create_train_state(config, (8, 8, 1), 3, 4, gap_batch=steps.gap_batch))
    before = jax.device_get(state.params)
    after, _ = steps.train(steps.place_state(state), steps.place_batch(batch))
    return before, jax.device_get(steps.host_state(after).params)


def test_lr_multipliers_scale_each_groups_update():
    ds = _dataset(0)
    batch = next(iter(ds.train_batches(8, seed=0, epoch=0)))
    base = TrainConfig(model="small_cnn", batch_size=8, epochs=1, weight_decay=5e-4, momentum=0.9, parallel="none",
                       bn_reestimate_batches=0)
    grouped = dataclasses.replace(base, lr_multipliers=(("^fc/", 0.1), ("conv", 0.0)))
    b0, a0 = _one_step_update(base, batch)
    b1, a1 = _one_step_update(grouped, batch)
    delta0 = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), a0, b0)
    delta1 = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), a1, b1)
    flat0 = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(delta0)}
    flat1 = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(delta1)}
    seen = set()
    for name, d0 in flat0.items():
        d1 = flat1[name]
        if "'fc'" in name:
            expected, seen_as = 0.1 * d0, "fc"
        elif "conv" in name:
            expected, seen_as = np.zeros_like(d0), "conv"
        else:
            expected, seen_as = d0, "default"
        seen.add(seen_as)
        # atol: the deltas are differences of float32 parameters of size ~0.1 (eps 1e-8)
        np.testing.assert_allclose(d1, expected, rtol=1e-5, atol=5e-8, err_msg=name)
    assert seen == {"fc", "conv", "default"}
    assert any(np.abs(v).max() > 0 for k, v in flat0.items() if "'fc'" in k)


def test_parameter_groups_first_match_wins_and_unmatched_rules_are_errors():
    params = {"backbone": {"conv": {"kernel": 0}, "bn": {"scale": 0}}, "fc": {"kernel": 0, "bias": 0},
              "head": {"conv": {"kernel": 0}}}
    config = TrainConfig(model="small_cnn", lr_multipliers=(("^backbone/", 0.1), ("conv", 2.0)))
    labels = parameter_groups(config, params)
    assert labels == {"backbone": {"conv": {"kernel": "group0"}, "bn": {"scale": "group0"}},
                      "fc": {"kernel": "default", "bias": "default"}, "head": {"conv": {"kernel": "group1"}}}
    for rules in ((("^backbone/", 0.1), ("^neck", 1.0)), (("^backbone/", 0.1), ("backbone/conv", 2.0))):
        with pytest.raises(ValueError, match="get no parameter"):
            parameter_groups(TrainConfig(model="small_cnn", lr_multipliers=rules), params)


@pytest.mark.parametrize("rules, message", [
    ((("(", 0.1),), "does not compile"),
    ((("fc", -1.0),), ">= 0"),
    ((("fc",),), "pairs"),
])
def test_lr_multipliers_bad_rules(rules, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(model="small_cnn", lr_multipliers=rules)


def test_objective_must_be_an_objective():
    with pytest.raises(ValueError, match="no network"):
        TrainConfig(model="small_cnn", objective="dann")


# ------------------------------------------------------------------------------------------------------------
# An objective of its own through fit: batch layout, metrics, a schedule as a traced value


@dataclasses.dataclass(frozen=True)
class _ScaledByStep(Classification):
    """Classification on {"pair": {"x", "y"}} batches whose loss is coefficient * CE, coefficient = step + 1."""

    name = "scaled_by_step"
    traces: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def schedule(self, steps_per_epoch, epochs):
        def coefficient(step):
            self.traces.append(1)  # Python side effect: runs once per trace, not per step
            return (step + 1).astype(jnp.float32)
        return coefficient

    def loss(self, forward, batch_stats, batch, coefficient, key):
        logits, batch_stats, gaps = forward(batch_stats, batch["pair"]["x"], key)
        ce = cross_entropy(logits, batch["pair"]["y"])
        return StepTerms(coefficient * ce, {"ce": ce, "scaled": coefficient * ce}, batch_stats, gaps)

    def images(self, batch):
        return batch["pair"]["x"]

    def statistics_batches(self, batch):
        return [{"image": batch["pair"]["x"]}]


class _Renamed:
    """An ArrayDataset whose training batches come as {"pair": {"x", "y"}}."""

    def __init__(self, ds):
        self.ds = ds
        self.image_shape, self.num_classes = ds.image_shape, ds.num_classes

    def steps_per_epoch(self, batch_size):
        return self.ds.steps_per_epoch(batch_size)

    def train_batches(self, batch_size, **kwargs):
        for b in self.ds.train_batches(batch_size, **kwargs):
            yield {"pair": {"x": b["image"], "y": b["label"]}}

    def test_batches(self, batch_size, **kwargs):
        return self.ds.test_batches(batch_size, **kwargs)


def test_fit_runs_an_objective_with_its_own_layout_metrics_and_traced_schedule(tmp_path):
    objective = _ScaledByStep()
    config = TrainConfig(model="small_cnn", batch_size=8, epochs=2, eval_batch_size=5, objective=objective,
                         quant=QuantConfig(4, 4), bn_reestimate_batches=2, num_devices=2)
    result = fit(config, _Renamed(_dataset(1)), workdir=tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    # The schedule's traced value reached the loss and the metrics at every step, from one trace.
    np.testing.assert_allclose([r["coefficient"] for r in records], np.arange(1, 7), rtol=0)
    np.testing.assert_allclose([r["loss"] for r in records], [r["coefficient"] * r["ce"] for r in records], rtol=1e-5)
    np.testing.assert_allclose([r["scaled"] for r in records], [r["loss"] for r in records], rtol=1e-6)
    assert len(objective.traces) == 1
    assert {"train_scaled", "train_coefficient", "train_ce"} <= set(result.history[-1])
    assert result.last["bn_statistics"] == "reestimated"
    assert json.loads((tmp_path / "config.json").read_text())["objective"]["name"] == "scaled_by_step"


# ------------------------------------------------------------------------------------------------------------
# Paired source/target batches


def test_paired_domains_epoch_layout_and_cycling():
    source, target = _dataset(2, n_train=40), _dataset(3, n_train=17)
    paired = PairedDomains(source, target)
    assert paired.steps_per_epoch(8) == 5  # max(40 // 8, 17 // 8)
    batches = list(paired.train_batches(8, seed=4, epoch=1))
    assert len(batches) == 5
    assert set(batches[0]) == {"source", "target"} and set(batches[0]["target"]) == {"image"}
    # Source: exactly its own epoch 1. Target: passes 2 and 3 of its own order (3 passes per epoch, 2 batches each).
    own = list(source.train_batches(8, seed=4, epoch=1))
    for got, want in zip(batches, own):
        np.testing.assert_array_equal(got["source"]["image"], want["image"])
        np.testing.assert_array_equal(got["source"]["label"], want["label"])
    target_seed = 4 + 7919
    passes = [list(target.train_batches(8, seed=target_seed, epoch=1 * 3 + r)) for r in range(3)]
    expected = [b["image"] for p in passes for b in p][:5]
    for got, want in zip(batches, expected):
        np.testing.assert_array_equal(got["target"]["image"], want)
    # Deterministic in (seed, epoch); another epoch is another order.
    again = list(paired.train_batches(8, seed=4, epoch=1))
    np.testing.assert_array_equal(again[3]["target"]["image"], batches[3]["target"]["image"])
    other = list(paired.train_batches(8, seed=4, epoch=2))
    assert not np.array_equal(other[0]["source"]["image"], batches[0]["source"]["image"])


def test_paired_domains_shards_make_the_one_shard_batch():
    paired = PairedDomains(_dataset(5, n_train=32), _dataset(6, n_train=20))
    whole = list(paired.train_batches(8, seed=0, epoch=0))
    shards = [list(paired.train_batches(4, seed=0, epoch=0, num_shards=2, shard_index=i)) for i in range(2)]
    assert len(whole) == len(shards[0]) == len(shards[1]) == 4
    for b, s0, s1 in zip(whole, *shards):
        for domain in ("source", "target"):
            np.testing.assert_array_equal(b[domain]["image"], np.concatenate([s0[domain]["image"], s1[domain]["image"]]))


def test_paired_domains_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        PairedDomains(_dataset(0), _dataset(1, shape=(8, 8, 3)))
    with pytest.raises(ValueError, match="fewer images than one batch"):
        PairedDomains(_dataset(0), _dataset(1, n_train=5)).steps_per_epoch(8)
