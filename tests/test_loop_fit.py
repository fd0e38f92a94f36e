"""fit and its workdir: fresh runs keep nothing stale, every save is checked, resumes log each step once, the ADMM
state can be carried into the next run, epochs count from 1, and no progress-bar redraws when not on a terminal."""

import dataclasses
import io
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax.admm import ADMMState
from alignq_jax.quantize import GAP_COLLECTION, QuantConfig
from alignq_jax.training import TrainConfig, fit, load_variables, make_model
from alignq_jax.training.loop import save_checkpoint
from tiny_data import tiny_dataset


def _tiny_dataset(n_train=64, n_test=24, seed=0):
    return tiny_dataset(n_train, n_test, seed)


def _config(**kw):
    base = dict(model="small_cnn", epochs=2, batch_size=16, eval_batch_size=12, lr=0.05, milestones=(), parallel="none")
    return TrainConfig(**{**base, **kw})


def _max_diff(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


def _steps_log(workdir):
    return [json.loads(line) for line in (workdir / "steps.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fresh_run_into_a_used_workdir_keeps_nothing_of_the_old_run(tmp_path):
    ds = _tiny_dataset()
    old = fit(_config(epochs=2, seed=1), ds, workdir=tmp_path, progress=False)
    new = fit(_config(epochs=1, seed=2), ds, workdir=tmp_path, progress=False)
    assert _max_diff(old.state.params, new.state.params) > 1e-3  # two different runs
    # Only the new run's checkpoint is left, and it is what a later --init-from / resume loads.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    assert _max_diff(load_variables(tmp_path)["params"], new.state.params) == 0.0
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert len(_steps_log(tmp_path)) == ds.steps_per_epoch(16)
    # Resuming continues the new run (from its epoch 1), not the old one.
    resumed = fit(_config(epochs=2, seed=2), ds, workdir=tmp_path, resume=True, progress=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert resumed.history[0] == new.history[0]


def test_a_save_that_did_not_happen_is_an_error(tmp_path):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(tmp_path.absolute(), options=ocp.CheckpointManagerOptions(create=True))
    state = {"w": jnp.arange(3.0)}
    save_checkpoint(manager, 1, state, {"epochs_done": 1})
    with pytest.raises(RuntimeError, match="epoch 1 was not saved"):
        save_checkpoint(manager, 1, {"w": jnp.zeros(3)}, {"epochs_done": 1})  # Orbax returns False: step exists
    manager.close()


class _InterruptedDataset:
    """Delegates to an ArrayDataset, but the training epoch with data index ``stop_epoch`` stops after
    ``after`` batches with KeyboardInterrupt (an interrupted run)."""

    def __init__(self, ds, stop_epoch, after):
        self.ds, self.stop_epoch, self.after = ds, stop_epoch, after

    def __getattr__(self, name):
        return getattr(self.ds, name)

    def train_batches(self, batch_size, *, epoch, **kw):
        for i, batch in enumerate(self.ds.train_batches(batch_size, epoch=epoch, **kw)):
            if epoch == self.stop_epoch and i == self.after:
                raise KeyboardInterrupt
            yield batch


@pytest.mark.slow
def test_resume_after_an_interruption_logs_every_step_once(tmp_path):
    ds = _tiny_dataset()
    spe = ds.steps_per_epoch(16)
    cfg = _config(epochs=3)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, _InterruptedDataset(ds, stop_epoch=1, after=3), workdir=tmp_path, progress=False)
    assert len(_steps_log(tmp_path)) == spe + 2  # epoch 2 logged 2 steps (read one step late) before the stop
    with open(tmp_path / "steps.jsonl", "a") as f:
        f.write('{"epoch": 2, "st')  # a line cut short by the interruption
    result = fit(cfg, ds, workdir=tmp_path, resume=True, progress=False)
    log = _steps_log(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 3 * spe + 1))
    assert [r["epoch"] for r in log] == [e for e in (1, 2, 3) for _ in range(spe)]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in metrics] == [1, 2, 3] == [r["epoch"] for r in result.history]
    assert result.best["epoch"] in (1, 2, 3)
    assert result.best == max(result.history, key=lambda r: r["test_accuracy"])


@pytest.mark.slow
def test_admm_state_is_carried_by_init_variables(tmp_path):
    """The progressive chain: the next run starts from the previous run's final ADMM state."""
    ds = _tiny_dataset(n_train=16)  # one training step per epoch
    quant = QuantConfig(4, 4)
    first = fit(_config(quant=quant, admm=True, epochs=1), ds, workdir=tmp_path / "first", progress=False)
    loaded = load_variables(tmp_path / "first")
    assert isinstance(loaded["admm_state"], ADMMState)
    assert _max_diff(loaded["admm_state"], first.state.admm_state) == 0.0
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(first.state.admm_state)) > 1e-3  # init is 0

    cfg = _config(quant=QuantConfig(2, 2), admm=True, epochs=1)
    second = fit(cfg, ds, init_variables=loaded, progress=False)
    # Expected: one ADMM update from the carried state with the gaps of the only step (taken at the loaded
    # parameters, before their update), computed here outside the training loop.
    batch = next(iter(ds.train_batches(16, seed=cfg.seed, epoch=0)))
    _, gaps = make_model(cfg, 2).apply(
        {"params": loaded["params"], "batch_stats": loaded["batch_stats"]}, batch["image"], train=True,
        mutable=["batch_stats", GAP_COLLECTION],
    )
    expected = cfg.make_admm().update(gaps[GAP_COLLECTION], first.state.admm_state)
    assert _max_diff(second.state.admm_state, expected) < 1e-5
    fresh = fit(cfg, ds, init_variables={k: loaded[k] for k in ("params", "batch_stats")}, progress=False)
    assert _max_diff(fresh.state.admm_state, expected) > 1e-3

    wrong = jax.tree.map(lambda x: x[:8, :8], loaded["admm_state"])  # as from a run with batch size 8
    with pytest.raises(ValueError, match=r"admm_state .* has shape \(8, 8\) but this run needs \(16, 16\)"):
        fit(cfg, ds, init_variables={**loaded, "admm_state": wrong}, progress=False)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.slow
def test_progress_bars_only_on_a_terminal(monkeypatch, capsys):
    """Default progress=None: a log file or pipe gets the per-epoch log lines and no bar redraws."""
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    ds = _tiny_dataset()
    cfg = _config(epochs=2)
    lines = []
    fit(cfg, ds, log=lines.append)  # under pytest stderr is captured: not a terminal
    assert capsys.readouterr().err == ""
    assert [line.split(":")[0] for line in lines] == [
        "epoch 1/2", "epoch 2/2", "BatchNorm statistics re-estimated over 4 training batches"]
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    fit(dataclasses.replace(cfg, epochs=1), ds)
    assert "epoch 1/1" in terminal.getvalue() and "\r" in terminal.getvalue()  # tqdm drew its bar


@pytest.mark.slow
def test_resume_on_another_device_count_with_per_device_admm_is_a_clear_error(tmp_path):
    """Per-device ADMM states (one per device, each B_local x B_local) cannot be resumed on another device count;
    fit must say so before Orbax fails on shapes. The same device count resumes."""
    ds = _tiny_dataset()
    quant = QuantConfig(w_bits=4, a_bits=4, correlation=True)
    config = _config(quant=quant, admm=True, parallel="shard_map", num_devices=2)
    fit(config, ds, workdir=tmp_path, progress=False, stop_after_epochs=1)
    with pytest.raises(ValueError, match="2 per-device ADMM states, but this run has 4 per-device ADMM states"):
        fit(dataclasses.replace(config, num_devices=4), ds, workdir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="2 per-device ADMM states, but this run has one shared ADMM state"):
        fit(dataclasses.replace(config, parallel="none", num_devices=1), ds, workdir=tmp_path, resume=True,
            progress=False)
    resumed = fit(config, ds, workdir=tmp_path, resume=True, progress=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2]


_TIMING = ("train_seconds", "images_per_second", "bn_reestimate_seconds")


def _untimed(record):
    return {k: v for k, v in record.items() if k not in _TIMING}


@pytest.mark.slow
def test_batchnorm_reestimation_in_fit_leaves_training_alone_and_resumes_exactly(tmp_path):
    """Per-epoch re-estimation only adds measurements: the training (params, running statistics, running-statistics
    accuracies) equals a run without it, its last record equals the final re-estimation of a run without it, and
    an interrupted run resumes to the same history (saved in the checkpoint meta) and the same statistics."""
    ds = _tiny_dataset()
    quant = QuantConfig(4, 4)
    plain = fit(_config(quant=quant, epochs=2), ds, progress=False)
    every = fit(_config(quant=quant, epochs=2, bn_reestimate_every_epoch=True), ds, progress=False)
    assert _max_diff(plain.state.params, every.state.params) == 0.0
    assert _max_diff(plain.state.batch_stats, every.state.batch_stats) == 0.0
    assert [r["bn_statistics"] for r in plain.history] == ["running", "running"]
    assert [r["bn_statistics"] for r in every.history] == ["reestimated", "reestimated"]
    for p, e in zip(plain.history, every.history):
        assert (e["test_accuracy_running_stats"], e["test_loss_running_stats"]) == (p["test_accuracy"], p["test_loss"])
    assert plain.last["bn_statistics"] == every.last["bn_statistics"] == "reestimated"
    assert _untimed(plain.last) == _untimed(every.last) == _untimed(every.history[-1])
    assert plain.last["test_loss"] != plain.last["test_loss_running_stats"]
    assert _max_diff(plain.reestimated_batch_stats, every.reestimated_batch_stats) == 0.0
    assert _max_diff(plain.reestimated_batch_stats, plain.state.batch_stats) > 1e-3

    config = _config(quant=quant, epochs=2, bn_reestimate_every_epoch=True)
    fit(config, ds, workdir=tmp_path, progress=False, stop_after_epochs=1)
    resumed = fit(config, ds, workdir=tmp_path, resume=True, progress=False)
    assert [_untimed(r) for r in resumed.history] == [_untimed(r) for r in every.history]
    assert resumed.history[0] == json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert _max_diff(resumed.trained.variables, every.trained.variables) == 0.0


def test_reestimation_off_reports_the_running_statistics():
    ds = _tiny_dataset(n_train=16)
    result = fit(_config(quant=QuantConfig(4, 4), epochs=1, bn_reestimate_batches=0), ds, progress=False)
    assert result.last is result.history[-1] and result.last["bn_statistics"] == "running"
    assert result.reestimated_batch_stats is None
    assert result.summary()["last_epoch_test_accuracy_running_stats"] == result.last["test_accuracy"]
    assert _max_diff(result.trained.variables["batch_stats"], result.state.batch_stats) == 0.0


@pytest.mark.parametrize("fields, message", [
    ({"bn_reestimate_batches": -1}, "bn_reestimate_batches must be an int >= 0"),
    ({"bn_reestimate_batches": True}, "bn_reestimate_batches must be an int >= 0"),
    ({"bn_reestimate_every_epoch": 1}, "bn_reestimate_every_epoch must be True or False"),
    ({"bn_reestimate_batches": 0, "bn_reestimate_every_epoch": True}, "needs bn_reestimate_batches > 0"),
])
def test_reestimation_settings_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        _config(**fields)
