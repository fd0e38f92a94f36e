"""Device and process counts: evaluation works with any batch on any device count (same sums as one device), and
with several processes every process feeds its own disjoint share of the configured global batch."""

import dataclasses
import types

import jax
import numpy as np
import pytest

from alignq_jax.data import ArrayDataset
from alignq_jax.quantize import QuantConfig
from alignq_jax.training import TrainConfig, canonical_state, create_train_state, make_steps
from alignq_jax.training import loop
from alignq_jax.training.steps import process_batch_size


def _dataset(n_train=100, n_test=203, augment="none", seed=0):
    """Images whose first pixel holds the example's index (mod 256), so rows can be identified after batching."""
    rng = np.random.default_rng(seed)

    def make(n):
        images = rng.integers(0, 256, (n, 8, 8, 1)).astype(np.uint8)
        images[:, 0, 0, 0] = np.arange(n) % 256
        return images, rng.integers(0, 10, n).astype(np.int32)

    (xtr, ytr), (xte, yte) = make(n_train), make(n_test)
    return ArrayDataset(xtr, ytr, xte, yte, num_classes=10, augment=augment, pad=2)


def _config(**kw):
    base = dict(model="small_cnn", quant=QuantConfig(4, 4), batch_size=16, eval_batch_size=100, milestones=())
    return TrainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------------------------------------------
# Evaluation on any number of devices


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["shard_map", "pmap"])
def test_evaluation_on_eight_devices_equals_one_device(parallel):
    ds = _dataset()
    assert ds.num_test % 8 and 100 % 8  # neither the test set nor the eval batch divides over 8 devices
    one = make_steps(_config(parallel="none"), 10, 6)
    eight = make_steps(_config(parallel=parallel, num_devices=8), 10, 6)
    assert eight.eval_batch_size(100) == 104
    state = create_train_state(_config(parallel="none"), (8, 8, 1), 10, 6, gap_batch=16)
    ref = loop.evaluate(one, one.place_state(state), ds, 100)
    got = loop.evaluate(eight, eight.place_state(canonical_state(eight, state)), ds, 100)
    assert got["test_accuracy"] == ref["test_accuracy"]
    assert got["test_accuracy"] * 203 == pytest.approx(round(ref["test_accuracy"] * 203))  # a count of 203 rows
    assert got["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-5)


def test_training_batch_must_divide_over_devices_and_processes():
    with pytest.raises(ValueError, match=r"batch_size=12 must be divisible by the number of devices \(8\)"):
        make_steps(_config(batch_size=12, parallel="shard_map", num_devices=8), 10, 6)
    with pytest.raises(ValueError, match=r"batch_size=15 must be divisible by the number of processes \(2\)"):
        process_batch_size(15, 2)


# ----------------------------------------------------------------------------------------------------------------
# Several processes (simulated: jax.process_count / process_index patched)


def _as_process(monkeypatch, index, count=2):
    monkeypatch.setattr(jax, "process_count", lambda: count)
    monkeypatch.setattr(jax, "process_index", lambda: index)


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_two_processes_feed_disjoint_halves_of_the_global_batch(monkeypatch, augment):
    ds = _dataset(augment=augment)
    cfg = _config()
    spe = ds.steps_per_epoch(cfg.batch_size)  # what fit gives the LR schedule
    single = list(loop.process_train_batches(cfg, ds, 3))
    shards = []
    for index in (0, 1):
        _as_process(monkeypatch, index)
        shards.append(list(loop.process_train_batches(cfg, ds, 3)))
    monkeypatch.undo()
    assert len(single) == len(shards[0]) == len(shards[1]) == spe == 100 // 16
    for b, whole in enumerate(single):
        parts = [shards[0][b], shards[1][b]]
        assert all(p["image"].shape == (8, 8, 8, 1) and p["mask"].all() for p in parts)
        # Together exactly the one-process global batch (same rows in order, same augmentation).
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    if augment == "none":  # the first pixel identifies the example: the processes never share one
        ids = [np.concatenate([p["image"][:, 0, 0, 0] for p in shard]).tolist() for shard in shards]
        assert not set(ids[0]) & set(ids[1])
        assert len(set(ids[0] + ids[1])) == 2 * len(ids[0]) == spe * 16


def test_two_processes_share_the_evaluation(monkeypatch):
    ds = _dataset(n_test=203)
    fake_steps = types.SimpleNamespace(process_count=2, local_devices=4)
    per_process = loop.Steps.eval_batch_size(fake_steps, 100)
    assert per_process == 52  # half of 100, rounded up to the 4 local devices
    seen = []
    for index in (0, 1):
        _as_process(monkeypatch, index)
        batches = list(ds.test_batches(per_process, normalise=False, **loop._shard_kwargs()))
        seen.append(np.concatenate([b["image"][b["mask"]][:, 0, 0, 0] for b in batches]))
        assert all(len(b["label"]) == per_process for b in batches)
    monkeypatch.undo()
    assert len(seen[0]) + len(seen[1]) == 203
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(203))  # every test image once


def test_pmap_splits_host_rows_over_local_devices(monkeypatch):
    """Process 1 of 2, 4 devices each: pmap gets (4 local devices, rows / 4) and its devices' ADMM states."""
    cfg = _config(parallel="pmap", admm=True)
    state = create_train_state(dataclasses.replace(cfg, parallel="none"), (8, 8, 1), 10, 6, gap_batch=2)
    devices = [types.SimpleNamespace(process_index=i // 4, id=i, platform="cpu") for i in range(8)]
    monkeypatch.setattr(jax, "devices", lambda *a: devices)
    _as_process(monkeypatch, 1)
    steps = make_steps(cfg, 10, 6)
    assert (steps.num_devices, steps.local_devices, steps.process_count, steps.gap_batch) == (8, 4, 2, 2)
    rows = steps.process_batch_size(cfg.batch_size)
    assert rows == 8
    batch = {"image": np.zeros((rows, 8, 8, 1), np.float32), "label": np.arange(rows, dtype=np.int32)}
    placed = steps.place_batch(batch)
    assert placed["image"].shape == (4, 2, 8, 8, 1)
    np.testing.assert_array_equal(placed["label"], np.arange(8).reshape(4, 2))
    canonical = canonical_state(steps, state)
    # Entry d of every per-device ADMM leaf holds the value d.
    numbered = jax.tree.map(lambda x: np.arange(8.0).reshape(8, 1, 1) * np.ones_like(x), canonical.admm_state)
    canonical = canonical.replace(admm_state=numbered)
    local = steps.place_state(canonical)
    for leaf in jax.tree.leaves(local.admm_state):
        np.testing.assert_array_equal(np.asarray(leaf)[:, 0, 0], [4, 5, 6, 7])  # devices 4..7 are process 1's
    assert jax.tree.leaves(local.params)[0].shape[0] == 4
