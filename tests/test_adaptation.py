"""DANN and DSAN as training objectives on quantized backbones: network wiring, the gradient reversal in place,
the loss as the objective defines it, the schedule's traced value per step, per-domain correlation gaps and ADMM
states, and fit on paired batches (two devices)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignq_jax.adaptation import DANN, DSAN, AdaptationNet, SourceOnly, make_objective
from alignq_jax.adaptation_losses import lmmd
from alignq_jax.data import ArrayDataset
from alignq_jax.data.paired import PairedDomains
from alignq_jax.quantize import QuantConfig
from alignq_jax.training import TrainConfig, create_train_state, fit, make_model, train_step
from alignq_jax.training.state import make_optimizer


def _domain(seed, n_train, shift=0):
    rng = np.random.default_rng(seed)
    images = lambda n: np.clip(rng.integers(0, 200, (n, 8, 8, 1)) + shift, 0, 255).astype(np.uint8)  # noqa: E731
    return ArrayDataset(images(n_train), rng.integers(0, 3, n_train), images(12), rng.integers(0, 3, 12),
                        num_classes=3, mean=(0.5,), std=(0.25,))


def _paired():
    return PairedDomains(_domain(0, 32), _domain(1, 24, shift=50))


def _batch(paired, size=8):
    return next(iter(paired.train_batches(size, seed=0, epoch=0)))


def test_networks_heads_and_names():
    dann = make_model(TrainConfig(model="small_cnn", objective=DANN(bottleneck=16, domain_hidden=8)), 3)
    assert isinstance(dann, AdaptationNet)
    variables = dann.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), train=False)
    assert set(variables["params"]) == {"backbone", "bottleneck", "classifier", "domain_hidden0", "domain_hidden1",
                                        "domain_classifier"}
    assert "fc" not in variables["params"]["backbone"]  # the backbone's own head is left out
    out = dann.apply(variables, jnp.ones((2, 8, 8, 1)), train=False, outputs="all")
    assert out["features"].shape == (2, 16) and out["logits"].shape == (2, 3) and out["domain_logits"].shape == (2, 2)
    dsan = make_model(TrainConfig(model="small_cnn", objective=DSAN(bottleneck=0)), 3)
    params = dsan.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), train=False)["params"]
    assert set(params) == {"backbone", "classifier"}
    with pytest.raises(ValueError, match="must be one of"):
        make_objective("mdd")
    with pytest.raises(ValueError, match="bottleneck"):
        DSAN(bottleneck=-1)


def test_gradient_reversal_sits_between_features_and_domain_head():
    """The domain loss's gradient reaches the backbone and bottleneck multiplied by -coefficient and the domain
    classifier unchanged (identity forward)."""
    model = make_model(TrainConfig(model="small_cnn", objective=DANN(bottleneck=8, domain_hidden=4)), 3)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    variables = model.init(jax.random.key(0), x, train=False)

    def domain_loss(params, coefficient):
        out = model.apply({**variables, "params": params}, x, train=False, grl_coefficient=coefficient, outputs="all")
        return optax.softmax_cross_entropy_with_integer_labels(out["domain_logits"], jnp.array([0, 1, 0, 1])).mean()

    plain = jax.grad(domain_loss)(variables["params"], -1.0)  # -(-1) * g = g: the plain gradient
    reversed_ = jax.jit(jax.grad(domain_loss))(variables["params"], 0.3)
    for name in ("backbone", "bottleneck"):
        jax.tree.map(lambda r, p: np.testing.assert_allclose(r, -0.3 * p, rtol=1e-5, atol=1e-8),
                     reversed_[name], plain[name])
    for name in ("domain_hidden0", "domain_classifier"):
        jax.tree.map(lambda r, p: np.testing.assert_allclose(r, p, rtol=1e-5, atol=1e-8), reversed_[name], plain[name])
    assert jax.tree.leaves(jax.tree.map(lambda g: float(jnp.abs(g).max()), plain["backbone"]))[0] > 0
    np.testing.assert_array_equal(jax.grad(domain_loss)(variables["params"], 0.0)["classifier"]["kernel"], 0.0)


def _one_step(objective, config_kwargs=None, batch=None):
    config = TrainConfig(model="small_cnn", objective=objective, batch_size=8, epochs=2, parallel="none",
                         bn_reestimate_batches=0, **(config_kwargs or {}))
    paired = _paired()
    batch = batch or _batch(paired)
    model = make_model(config, 3)
    state = create_train_state(config, (8, 8, 1), 3, 4, gap_batch=8, init_images=batch["source"]["image"])
    tx = make_optimizer(config, 4)
    admm = config.make_admm() if config.admm else None
    step = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, admm=admm, admm_weight=config.admm_weight,
                                           objective=objective, schedule=objective.schedule(4, 2)))
    return config, model, state, batch, step


def test_dsan_loss_uses_both_domains_bottleneck_features():
    """The step's LMMD equals LMMD of the two passes' bottleneck features (the target's too, not its backbone
    feature), weighted by the target's softmax; loss = CE + 0.3 * coefficient * LMMD."""
    objective = DSAN(bottleneck=6)
    config, model, state, batch, step = _one_step(objective)
    state = state.replace(step=jnp.asarray(5, jnp.int32))
    _, metrics = step(state, batch)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    run = lambda x: model.apply(variables, x, train=True, outputs="all", mutable=["batch_stats"])[0]  # noqa: E731
    source, target = run(batch["source"]["image"]), run(batch["target"]["image"])
    assert source["features"].shape == (8, 6)
    expected = lmmd(source["features"], target["features"], batch["source"]["label"],
                    jax.nn.softmax(target["logits"]), 3)
    np.testing.assert_allclose(metrics["lmmd"], expected, rtol=1e-4, atol=1e-7)
    p = 5 / (2 * 4)  # DSAN counts iterations from 0
    coefficient = 2 / (1 + np.exp(-10 * p)) - 1
    np.testing.assert_allclose(metrics["coefficient"], coefficient, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], metrics["ce"] + 0.3 * coefficient * metrics["lmmd"], rtol=1e-5)


def test_dann_loss_and_domain_metrics():
    objective = DANN(bottleneck=8, domain_hidden=4, domain_weight=0.5)
    config, model, state, batch, step = _one_step(objective)
    _, metrics = step(state, batch)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    run = lambda x: model.apply(variables, x, train=True, outputs="all", mutable=["batch_stats"])[0]  # noqa: E731
    ds, dt = run(batch["source"]["image"])["domain_logits"], run(batch["target"]["image"])["domain_logits"]
    ce = lambda logits, label: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        logits, jnp.full(8, label)).mean()
    np.testing.assert_allclose(metrics["domain_loss"], ce(ds, 0) + ce(dt, 1), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], metrics["ce"] + 0.5 * metrics["domain_loss"], rtol=1e-5)
    acc = 0.5 * (np.mean(np.argmax(ds, -1) == 0) + np.mean(np.argmax(dt, -1) == 1))
    np.testing.assert_allclose(metrics["domain_accuracy"], acc, rtol=1e-6)
    np.testing.assert_allclose(metrics["coefficient"], 2 / (1 + np.exp(-10 * 1 / 8)) - 1, rtol=1e-6)  # from 1


def test_both_domains_keep_their_gaps_and_admm_states():
    objective = DSAN(bottleneck=6)
    config, model, state, batch, step = _one_step(
        objective, {"quant": QuantConfig(4, 4), "admm": True, "admm_weight": 2.0})
    assert set(state.admm_state.z) == {"source", "target"}
    assert jax.tree.structure(state.admm_state.z["source"]) == jax.tree.structure(state.admm_state.z["target"])
    new, metrics = step(state, batch)
    # Each domain's ADMM state moved with its own gaps: after one step from zero, Z_source != Z_target.
    zs, zt = jax.tree.leaves(new.admm_state.gamma["source"]), jax.tree.leaves(new.admm_state.gamma["target"])
    assert any(float(jnp.abs(a).max()) > 0 for a in zs)
    assert any(not np.allclose(a, b) for a, b in zip(zs, zt))
    # The penalty is the one of both domains' gaps: recompute it from the passes' gaps.
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    from alignq_jax.quantize import CORRELATION_RNG, GAP_COLLECTION

    key = jax.random.split(jax.random.split(state.rng)[0])
    gaps = {}
    stats = state.batch_stats
    for domain, k in zip(("source", "target"), key):
        _, upd = model.apply({"params": state.params, "batch_stats": stats}, batch[domain]["image"], train=True,
                             outputs="all", mutable=["batch_stats", GAP_COLLECTION], rngs={CORRELATION_RNG: k})
        gaps[domain], stats = upd[GAP_COLLECTION], upd["batch_stats"]
    penalty = config.make_admm().penalty(gaps, state.admm_state)
    np.testing.assert_allclose(metrics["penalty"], penalty, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(metrics["loss"], metrics["ce"] + 0.3 * metrics["coefficient"] * metrics["lmmd"]
                               + 2.0 * metrics["penalty"], rtol=1e-5)
    # The running statistics after the step are the target pass's update of the source pass's update.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new.batch_stats, stats)
    del variables


def test_fit_dann_on_paired_domains_two_devices(tmp_path):
    objective = DANN(bottleneck=8, domain_hidden=4)
    config = TrainConfig(model="small_cnn", objective=objective, batch_size=8, epochs=2, eval_batch_size=5,
                         quant=QuantConfig(4, 4), admm=True, num_devices=2, bn_reestimate_batches=2,
                         lr_multipliers=(("^backbone/", 0.1),))
    paired = _paired()
    result = fit(config, paired, workdir=tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    steps_per_epoch = paired.steps_per_epoch(8)
    assert steps_per_epoch == 4 and len(records) == 8
    p = (np.arange(8) + 1) / 8  # DANN: iteration counted from 1, over 2 epochs of 4 steps
    np.testing.assert_allclose([r["coefficient"] for r in records], 2 / (1 + np.exp(-10 * p)) - 1, rtol=1e-5)
    assert {"train_domain_loss", "train_domain_accuracy", "train_coefficient"} <= set(result.history[-1])
    # Evaluated on the target's test split (12 images), per-device ADMM states for both domains.
    assert set(result.state.admm_state.z) == {"source", "target"}
    assert jax.tree.leaves(result.state.admm_state.z["source"])[0].shape[0] == 2
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["objective"] == {"name": "dann", **dataclasses.asdict(objective)}
    assert saved["lr_multipliers"] == [["^backbone/", 0.1]]
    # Resume from epoch 1 reproduces the uninterrupted run.
    again = tmp_path / "again"
    fit(config, paired, workdir=again, progress=False, stop_after_epochs=1)
    resumed = fit(config, paired, workdir=again, progress=False, resume=True)
    jax.tree.map(np.testing.assert_array_equal, resumed.state.params, result.state.params)


def test_source_only_never_forwards_the_target():
    """Same variables as DSAN; the loss and the BatchNorm statistics depend on the source batch alone."""
    objective = SourceOnly(bottleneck=6)
    config, model, state, batch, step = _one_step(objective)
    dsan_params = create_train_state(dataclasses.replace(config, objective=DSAN(bottleneck=6)), (8, 8, 1), 3, 4,
                                     gap_batch=8, init_images=batch["source"]["image"]).params
    assert jax.tree.structure(state.params) == jax.tree.structure(dsan_params)
    new, metrics = step(state, batch)
    other_target = {**batch, "target": {"image": batch["target"]["image"][::-1] * 3.0}}
    new2, metrics2 = step(state, other_target)
    jax.tree.map(np.testing.assert_array_equal, new.batch_stats, new2.batch_stats)
    jax.tree.map(np.testing.assert_array_equal, new.params, new2.params)
    np.testing.assert_array_equal(metrics["loss"], metrics2["loss"])
    assert "coefficient" not in metrics
