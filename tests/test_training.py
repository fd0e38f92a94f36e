"""Models, optimizer, train/eval steps on one device vs 8 simulated devices (shard_map and pmap), fit, resume."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignq_jax.models import get_model
from alignq_jax.quantize import QuantConfig
from alignq_jax.training import (
    TrainConfig,
    canonical_state,
    create_train_state,
    fit,
    make_optimizer,
    make_steps,
    train_on_arrays,
)
from alignq_jax.training.state import lr_schedule
from tiny_data import tiny_dataset

NUM_DEVICES = 8


def _tree_max_diff(a, b):
    return max(float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------------------------------------------
# Models


def test_fp32_config_gives_plain_network():
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    fp = get_model("small_cnn", config=QuantConfig())
    q = get_model("small_cnn", config=QuantConfig(2, 2))
    v = fp.init(jax.random.key(2), x)
    out_fp = fp.apply(v, x, train=False)
    # The same parameters through an FP32 model written with plain flax layers.
    import flax.linen as nn

    h = x
    for i, stride in enumerate((1, 2, 1)):
        h = nn.Conv(v["params"][f"conv{i}"]["kernel"].shape[-1], (3, 3), strides=stride, padding=1, use_bias=False).apply(
            {"params": v["params"][f"conv{i}"]}, h)
        bs, bp = v["batch_stats"][f"bn{i}"], v["params"][f"bn{i}"]
        h = nn.relu((h - bs["mean"]) / jnp.sqrt(bs["var"] + 1e-5) * bp["scale"] + bp["bias"])
    ref = h.mean((1, 2)) @ v["params"]["fc"]["kernel"] + v["params"]["fc"]["bias"]
    np.testing.assert_allclose(out_fp, ref, atol=1e-5)
    assert np.abs(q.apply(v, x, train=False) - out_fp).max() > 1e-3


def test_batchnorm_matches_pytorch_defaults():
    model = get_model("small_cnn", config=QuantConfig())
    x = jax.random.normal(jax.random.key(3), (6, 8, 8, 1)) * 3 + 1
    v = model.init(jax.random.key(4), x)
    _, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
    # PyTorch momentum 0.1: running = 0.9 * running + 0.1 * batch statistic; like PyTorch (unlike nn.BatchNorm)
    # the running variance takes the unbiased batch variance.
    conv = jax.lax.conv_general_dilated(x, v["params"]["conv0"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(upd["batch_stats"]["bn0"]["mean"], 0.1 * conv.mean((0, 1, 2)), atol=1e-5)
    n = conv.size // conv.shape[-1]
    np.testing.assert_allclose(upd["batch_stats"]["bn0"]["var"], 0.9 + 0.1 * conv.var((0, 1, 2)) * n / (n - 1), rtol=1e-4)
    # Normalisation in training uses the biased batch variance (as PyTorch and nn.BatchNorm do).
    out = model.apply(v, x, train=True, mutable=["batch_stats"])[0]
    assert np.isfinite(np.asarray(out)).all()


# ----------------------------------------------------------------------------------------------------------------
# Optimizer


def test_optimizer_matches_pytorch_sgd_with_l2():
    cfg = TrainConfig(model="small_cnn", lr=0.1, momentum=0.9, weight_decay=0.01, milestones=(2,), epochs=4)
    tx = make_optimizer(cfg, steps_per_epoch=1)
    w = jnp.array([1.0, -2.0, 0.5])
    target = np.array([0.3, 0.1, -0.2])
    state = tx.init(w)
    w_np, buf = np.array(w), np.zeros(3)
    for step in range(4):
        grad = 2 * (np.asarray(w) - target)
        updates, state = tx.update(jnp.asarray(grad, jnp.float32), state, w)
        w = optax.apply_updates(w, updates)
        # torch.optim.SGD: d = g + wd*w; buf = momentum*buf + d (buf = d at the first step); w -= lr*buf
        g_np = 2 * (w_np - target)
        d = g_np + 0.01 * w_np
        buf = d if step == 0 else 0.9 * buf + d
        lr = 0.1 if step < 2 else 0.01
        w_np = w_np - lr * buf
        np.testing.assert_allclose(np.asarray(w), w_np, rtol=1e-5)


def test_lr_schedule_milestones():
    sched = lr_schedule(TrainConfig(lr=0.04, milestones=(80, 150), epochs=200), steps_per_epoch=10)
    assert float(sched(799)) == pytest.approx(0.04)
    assert float(sched(800)) == pytest.approx(0.004)
    assert float(sched(1500)) == pytest.approx(0.0004)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model="vgg"), "model"),
        (dict(batch_size=0), "batch_size"),
        (dict(milestones=(5, 2)), "milestones"),
        (dict(admm=True), "a_bits"),
        (dict(admm_mode="fast"), "admm_mode"),
        (dict(parallel="dp"), "parallel"),
        (dict(dtype="float16"), "dtype"),
    ],
)
def test_train_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_admm_switches_correlation_on():
    cfg = TrainConfig(quant=QuantConfig(4, 4), admm=True)
    assert cfg.quant.correlation
    assert not TrainConfig(quant=QuantConfig(4, 4, correlation=True)).quant.correlation


# ----------------------------------------------------------------------------------------------------------------
# Steps: 1 device vs 8 simulated devices

BATCH = 32
_rng = np.random.default_rng(0)
IMAGES = _rng.normal(size=(BATCH, 8, 8, 1)).astype(np.float32)
LABELS = _rng.integers(0, 10, BATCH).astype(np.int32)


def _two_steps(parallel, num_devices, **overrides):
    cfg = TrainConfig(
        model="small_cnn", quant=overrides.pop("quant", QuantConfig(4, 4)), batch_size=BATCH, eval_batch_size=BATCH,
        lr=0.1, parallel=parallel, num_devices=num_devices, **overrides,
    )
    steps = make_steps(cfg, 10, steps_per_epoch=10)
    state = canonical_state(steps, create_train_state(cfg, (8, 8, 1), 10, 10, gap_batch=steps.gap_batch))
    placed = steps.place_state(state)
    batch = {"image": IMAGES, "label": LABELS}
    history = []
    for _ in range(2):
        placed, metrics = steps.train(placed, steps.place_batch(batch))
        history.append({k: float(v) for k, v in metrics.items()})
    sums = steps.evaluate(placed, steps.place_batch({**batch, "mask": np.arange(BATCH) < BATCH - 3}))
    return steps, steps.host_state(placed), history, {k: float(v) for k, v in sums.items()}


@pytest.fixture(scope="module")
def single_device_run():
    return _two_steps("none", 1)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["shard_map", "pmap"])
def test_data_parallel_equals_single_device(single_device_run, parallel):
    _, ref_state, ref_hist, ref_eval = single_device_run
    steps, state, hist, ev = _two_steps(parallel, NUM_DEVICES)
    assert steps.mode == parallel and steps.num_devices == NUM_DEVICES
    assert _tree_max_diff(state.params, ref_state.params) < 1e-5
    assert _tree_max_diff(state.batch_stats, ref_state.batch_stats) < 1e-4
    assert _tree_max_diff(state.opt_state, ref_state.opt_state) < 1e-4
    for a, b in zip(hist, ref_hist):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["accuracy"] == pytest.approx(b["accuracy"])
    assert ev["count"] == BATCH - 3 == ref_eval["count"]
    assert ev["correct"] == ref_eval["correct"]
    assert ev["loss_sum"] == pytest.approx(ref_eval["loss_sum"], rel=1e-5)
    # The parameters really changed (the comparison is not between two untouched states).
    fresh = create_train_state(TrainConfig(model="small_cnn", quant=QuantConfig(4, 4)), (8, 8, 1), 10, 10, gap_batch=4)
    assert _tree_max_diff(fresh.params, state.params) > 1e-3


def _permuted_shards(num_devices, shard):
    """A global batch whose device shards are distinct orderings of the same ``shard`` images (BATCH rows)."""
    import itertools

    perms = list(itertools.permutations(range(shard)))
    picks = np.random.default_rng(1).choice(len(perms), num_devices, replace=False)
    order = np.concatenate([np.array(perms[i]) for i in picks])
    return IMAGES[:shard][order], LABELS[:shard][order]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["shard_map", "pmap"])
def test_per_device_admm_states_equal_one_device_runs_on_their_shards(parallel):
    """Device d's ADMM state after a step equals a one-device step on device d's shard (same parameters,
    same ADMM init, exact gaps). Every shard holds the same images in another order, so the device-synchronised
    BatchNorm statistics equal each shard's own and the one-device run must reproduce device d exactly; the
    orders differ, so the devices' states differ and a state landing on the wrong device is caught."""
    shard = BATCH // NUM_DEVICES
    images, labels = _permuted_shards(NUM_DEVICES, shard)
    common = dict(model="small_cnn", quant=QuantConfig(4, 4), lr=0.1, admm=True, admm_mode="paper")

    cfg = TrainConfig(batch_size=BATCH, parallel=parallel, num_devices=NUM_DEVICES, **common)
    steps = make_steps(cfg, 10, steps_per_epoch=10)
    state = canonical_state(steps, create_train_state(cfg, (8, 8, 1), 10, 10, gap_batch=steps.gap_batch))
    init_admm = jax.device_get(state.admm_state)  # before the step (its buffers may be donated)
    placed, metrics = steps.train(steps.place_state(state), steps.place_batch({"image": images, "label": labels}))
    z = steps.host_state(placed).admm_state
    assert jax.tree.leaves(z.z)[0].shape == (NUM_DEVICES, shard, shard)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["penalty"]) > 0

    one_cfg = TrainConfig(batch_size=shard, parallel="none", **common)
    one = make_steps(one_cfg, 10, steps_per_epoch=10)
    one_state = create_train_state(one_cfg, (8, 8, 1), 10, 10, gap_batch=one.gap_batch)
    assert _tree_max_diff(one_state.admm_state, jax.tree.map(lambda x: x[0], init_admm)) == 0.0
    for d in range(NUM_DEVICES):
        rows = slice(d * shard, (d + 1) * shard)
        fresh = jax.tree.map(lambda x: x.copy(), one_state)  # the step donates its input buffers
        ref, _ = one.train(one.place_state(fresh), one.place_batch({"image": images[rows], "label": labels[rows]}))
        ref = one.host_state(ref).admm_state
        assert _tree_max_diff(jax.tree.map(lambda x: x[d], z), ref) < 1e-5, f"device {d}"
    # The devices saw different orders, so their states differ (and the comparison above is not vacuous).
    assert _tree_max_diff(jax.tree.map(lambda x: x[0], z), jax.tree.map(lambda x: x[1], z)) > 1e-3
    assert _tree_max_diff(jax.tree.map(lambda x: x[0], z), jax.tree.map(lambda x: x[0], init_admm)) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("features", [None, 64])
def test_global_correlation_matches_single_device_admm(features):
    # With the all-gather option the gaps cover the global batch, so the ADMM state equals the 1-device one
    # (with sampled features too: every device draws the same columns).
    quant = QuantConfig(4, 4, correlation_features=features)
    _, ref, ref_hist, _ = _two_steps("none", 1, admm=True, quant=quant)
    _, glob, hist, _ = _two_steps("shard_map", NUM_DEVICES, admm=True, quant=quant, global_correlation=True)
    assert jax.tree.leaves(glob.admm_state.z)[0].shape == (BATCH, BATCH)
    assert _tree_max_diff(glob.admm_state, ref.admm_state) < 1e-4
    assert _tree_max_diff(glob.params, ref.params) < 1e-4
    assert hist[1]["penalty"] == pytest.approx(ref_hist[1]["penalty"], rel=1e-3)


def test_batch_must_divide_over_devices():
    cfg = TrainConfig(model="small_cnn", batch_size=12, parallel="shard_map", num_devices=8)
    with pytest.raises(ValueError, match="divisible"):
        make_steps(cfg, 10, 10)


# ----------------------------------------------------------------------------------------------------------------
# fit, resume, in-memory API


def _tiny_dataset(n_train=96, n_test=40, seed=0):
    return tiny_dataset(n_train, n_test, seed)


@pytest.fixture(scope="module")
def resume_config():
    return TrainConfig(
        model="small_cnn", quant=QuantConfig(4, 4), admm=True, epochs=3, batch_size=32, eval_batch_size=20,
        lr=0.05, milestones=(2,), parallel="none",
    )


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, resume_config):
    ds = _tiny_dataset()
    full = fit(resume_config, ds, workdir=tmp_path / "full", progress=False)
    partial = fit(resume_config, ds, workdir=tmp_path / "cut", progress=False, stop_after_epochs=1)
    assert len(partial.history) == 1
    resumed = fit(resume_config, ds, workdir=tmp_path / "cut", progress=False, resume=True)
    assert len(resumed.history) == 3
    assert _tree_max_diff(resumed.state.params, full.state.params) == 0.0
    assert _tree_max_diff(resumed.state.opt_state, full.state.opt_state) == 0.0
    assert _tree_max_diff(resumed.state.admm_state, full.state.admm_state) == 0.0
    assert int(resumed.state.step) == 3 * ds.steps_per_epoch(32)
    assert [r["test_accuracy"] for r in resumed.history] == [r["test_accuracy"] for r in full.history]
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    # Resuming a finished run trains nothing more and returns its record.
    again = fit(resume_config, ds, workdir=tmp_path / "full", progress=False, resume=True)
    assert again.history == full.history
    assert _tree_max_diff(again.state.params, full.state.params) == 0.0


def test_train_on_arrays_learns_and_reports(tmp_path):
    ds = _tiny_dataset(seed=1)
    cfg = TrainConfig(model="small_cnn", quant=QuantConfig(2, 2), epochs=3, batch_size=32, eval_batch_size=20,
                      lr=0.05, milestones=(), parallel="none")
    result = train_on_arrays(ds.train_images, ds.train_labels, ds.test_images, ds.test_labels, cfg,
                             progress=False, workdir=tmp_path)
    assert result.summary()["last_epoch_test_accuracy"] > 0.8  # chance is 0.5
    assert result.best["test_accuracy"] == max(r["test_accuracy"] for r in result.history)
    assert (tmp_path / "steps.jsonl").read_text().count("\n") == 3 * ds.steps_per_epoch(32)


def test_fit_stops_on_non_finite_loss():
    ds = _tiny_dataset(seed=2)
    with pytest.raises(ValueError, match="(?i)nan"):  # NaN pixels are refused before training
        dataclasses.replace(ds, train_images=np.full(ds.train_images.shape, np.nan, np.float32))
    # A diverging run stops with the epoch and step instead of training on NaN.
    cfg = TrainConfig(model="small_cnn", epochs=1, batch_size=32, eval_batch_size=20, parallel="none", lr=1e30,
                      momentum=0.0)
    with pytest.raises(FloatingPointError, match="epoch 1, step"):
        fit(cfg, ds, progress=False)


def test_fit_on_batch_iterators_equals_fit_on_arrays():
    """The iterator adapter: the same batches give the same training as the array path."""
    from alignq_jax.training import BatchStreams

    ds = _tiny_dataset(seed=3)
    cfg = TrainConfig(model="small_cnn", quant=QuantConfig(4, 4), epochs=2, batch_size=32, eval_batch_size=20,
                      lr=0.05, milestones=(), parallel="none")
    streams = BatchStreams(
        train=lambda epoch: ds.train_batches(32, seed=cfg.seed, epoch=epoch),
        test=lambda: ({"image": b["image"], "label": b["label"]} for b in ds.test_batches(20)),
        steps_per_epoch_=ds.steps_per_epoch(32), image_shape=ds.image_shape, num_classes=2,
    )
    a = fit(cfg, ds, progress=False)
    b = fit(cfg, streams, progress=False)
    assert _tree_max_diff(a.state.params, b.state.params) == 0.0
    assert [r["test_accuracy"] for r in a.history] == [r["test_accuracy"] for r in b.history]
    bad = dataclasses.replace(streams, train=lambda epoch: ds.train_batches(16, epoch=epoch))
    with pytest.raises(ValueError, match="batch_size"):
        fit(cfg, bad, progress=False)


def test_config_to_dict_names_a_method_object_with_its_options():
    import json

    from alignq_jax.methods import APoT
    from alignq_jax.quantize import QuantConfig
    from alignq_jax.training.loop import config_to_dict

    method = APoT(weight_alpha_init="mse", activation_alpha_init=6.0)
    d = config_to_dict(TrainConfig(quant=QuantConfig(w_bits=2, a_bits=2, method=method)))
    assert d["quant"]["method"] == {"name": "apot", "weight_alpha_init": "mse", "activation_alpha_init": 6.0}
    assert json.loads(json.dumps(d)) == d
    assert config_to_dict(TrainConfig(quant=QuantConfig(w_bits=2, a_bits=2, method="lsq")))["quant"]["method"] == "lsq"
