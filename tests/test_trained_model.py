"""TrainedModel and FitResult.trained: evaluation equal to the training loop's, compiled once per model and batch
shape (not per call or per data set), re-estimation and substitute statistics touching only batch_stats."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax.models import get_model
from alignq_jax.quantize import QuantConfig
from alignq_jax.training import TrainConfig, TrainedModel, evaluate_datasets, fit, make_model, reestimate_batch_stats
from test_batchnorm_reestimate import TRACES, MaxRange
from tiny_data import tiny_dataset


@pytest.fixture(scope="module")
def trained_run():
    ds = tiny_dataset(n_train=64, n_test=30)
    config = TrainConfig(model="small_cnn", quant=QuantConfig(4, 4), epochs=2, batch_size=16, eval_batch_size=12,
                         lr=0.05, milestones=(), parallel="none")
    return ds, config, fit(config, ds, progress=False)


def test_evaluate_equals_the_training_loops_evaluation(trained_run):
    ds, config, result = trained_run
    last = result.last
    assert last["bn_statistics"] == "reestimated" and result.history[-1]["bn_statistics"] == "running"
    raw = result.trained_raw.evaluate(ds)
    assert raw["count"] == ds.num_test
    assert raw["accuracy"] == last["test_accuracy_running_stats"] == result.history[-1]["test_accuracy"]
    assert raw["loss"] == pytest.approx(last["test_loss_running_stats"], rel=1e-6)
    loop = evaluate_datasets(config, result.state, {"test": ds})["test"]
    assert (raw["accuracy"], raw["loss"]) == pytest.approx((loop["test_accuracy"], loop["test_loss"]), rel=1e-6)
    headline = result.trained.evaluate(ds)
    assert headline["accuracy"] == last["test_accuracy"]
    assert headline["loss"] == pytest.approx(last["test_loss"], rel=1e-6)
    assert abs(headline["loss"] - raw["loss"]) > 1e-4  # the two sets of statistics really differ


def test_fit_reestimates_from_the_last_epochs_training_batches(trained_run):
    ds, config, result = trained_run
    n = min(config.bn_reestimate_batches, ds.steps_per_epoch(config.batch_size))
    assert result.last["bn_reestimate_batches"] == n
    raw = result.trained_raw
    batches = ds.train_batches(config.batch_size, seed=config.seed, epoch=config.epochs - 1)
    expected = reestimate_batch_stats(raw.model, raw.variables, batches, num_batches=n)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(result.trained.variables["batch_stats"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(result.trained.variables["params"]), jax.tree.leaves(result.state.params)):
        np.testing.assert_array_equal(a, b)


def _counting_model(num_classes=2):
    config = TrainConfig(model="small_cnn", quant=QuantConfig(4, 4, method=MaxRange()), eval_batch_size=10)
    model = get_model("small_cnn", config=config.quant, num_classes=num_classes, widths=(2, 4, 4))
    x = jnp.zeros((2, 8, 8, 1))
    variables = model.init(jax.random.key(0), x, train=True)
    return TrainedModel(model, variables, config, num_classes)


def test_another_data_set_of_the_same_batch_shape_does_not_compile_again():
    trained = _counting_model()
    first, second = tiny_dataset(n_train=16, n_test=20, seed=0), tiny_dataset(n_train=16, n_test=20, seed=1)
    reestimated = trained.reestimated(first.train_batches(8))  # new statistics (its own train-mode traces)
    equal = TrainedModel(_counting_model().model, trained.variables, trained.config, 2)  # an equal model
    TRACES.clear()
    a = trained.evaluate(first)
    traced = len(TRACES)
    assert traced > 0
    b = trained.evaluate(second)
    assert len(TRACES) == traced  # same batch shape: compiled once
    assert a["loss"] != b["loss"]
    # New statistics, or a new TrainedModel of an equal model, reuse the compiled function too.
    reestimated.evaluate(first)
    equal.evaluate(second)
    assert len(TRACES) == traced
    trained.predict(first.test_images[:3].astype(np.float32), batch_size=8)
    traced = len(TRACES)
    trained.predict(second.test_images.astype(np.float32), batch_size=8)  # 20 rows: 3 chunks, the last padded
    assert len(TRACES) == traced


def test_predict_pads_and_trims_the_last_chunk():
    ds = tiny_dataset(n_train=16, n_test=21, seed=2)
    trained = _counting_model()
    batch = next(iter(ds.test_batches(21)))
    images, labels = batch["image"], batch["label"]
    whole = trained.predict(images, batch_size=32)
    chunks = trained.predict(images, batch_size=8)
    assert whole.shape == chunks.shape == (21, 2)
    np.testing.assert_allclose(chunks, whole, rtol=1e-5, atol=1e-6)
    accuracy = float(np.mean(np.argmax(chunks, -1) == labels))
    assert accuracy == pytest.approx(trained.evaluate(ds, batch_size=8)["accuracy"])


def test_reestimated_changes_only_the_batch_stats():
    trained = _counting_model()
    ds = tiny_dataset(n_train=24, n_test=10, seed=3)
    before = jax.tree.map(np.asarray, trained.variables)
    new = trained.reestimated(ds.train_batches(8), num_batches=2)
    assert new.model is trained.model and new.config is trained.config and new.num_classes == trained.num_classes
    assert new.variables["params"] is trained.variables["params"]
    expected = reestimate_batch_stats(trained.model, trained.variables, ds.train_batches(8), num_batches=2)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(new.variables["batch_stats"])):
        np.testing.assert_array_equal(a, b)
    changed = [np.abs(np.asarray(a) - b).max() for a, b in
               zip(jax.tree.leaves(new.variables["batch_stats"]), jax.tree.leaves(before["batch_stats"]))]
    assert max(changed) > 1e-3
    for a, b in zip(jax.tree.leaves(trained.variables), jax.tree.leaves(before)):  # the original is untouched
        np.testing.assert_array_equal(a, b)


def test_with_batch_stats_checks_the_tree_and_shapes():
    trained = _counting_model()
    stats = trained.variables["batch_stats"]
    with pytest.raises(ValueError, match="same tree"):
        trained.with_batch_stats({"bn0": stats["bn0"]})
    bad = jax.tree.map(lambda x: x, stats)
    bad["bn1"] = {"mean": jnp.zeros(3), "var": stats["bn1"]["var"]}
    with pytest.raises(ValueError, match=r"has shape \(3,\)"):
        trained.with_batch_stats(bad)
    shifted = jax.tree.map(lambda x: x + 1.0, stats)
    ds = tiny_dataset(n_train=16, n_test=10)
    assert trained.with_batch_stats(shifted).evaluate(ds)["loss"] != trained.evaluate(ds)["loss"]


def test_trained_model_of_fit_is_the_single_device_model(trained_run):
    ds, config, result = trained_run
    assert result.trained.model == make_model(config, ds.num_classes)
    assert result.trained.num_classes == ds.num_classes and result.trained.config is config
