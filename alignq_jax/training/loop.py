"""The fit loop: epochs of jitted steps, evaluation, progress bar, JSONL metrics, Orbax checkpoints, resume.

``fit`` takes any data set with the ``ArrayDataset`` batch interface (``train_batches``, ``test_batches``,
``steps_per_epoch``, ``image_shape``, ``num_classes``); ``train_on_arrays`` is the entry point for numpy arrays.
Evaluation runs on the test split after every epoch; results report both the last and the best epoch (the paper
reports the best epoch on the test set, i.e. model selection on test data: we say so wherever we print it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from alignq_jax.admm import ADMMState
from alignq_jax.data import ArrayDataset
from alignq_jax.data.batching import close_if_closable
from alignq_jax.training.batchnorm import reestimate_batch_stats
from alignq_jax.training.state import TrainConfig, TrainState, create_train_state, make_model
from alignq_jax.training.steps import Steps, canonical_state, make_steps, process_batch_size
from alignq_jax.training.trained import TrainedModel

RUNNING, REESTIMATED = "running", "reestimated"  # which BatchNorm statistics a test accuracy was measured with


@dataclasses.dataclass
class FitResult:
    """What ``fit`` returns: per-epoch history, the last and best epochs, and the final state (canonical layout).

    ``last`` is the final epoch's record with the headline test accuracy: measured with BatchNorm statistics
    re-estimated after training when ``config.bn_reestimate_batches`` > 0 (``last["bn_statistics"] ==
    "reestimated"``), else with the training-time running statistics ("running");
    ``last["test_accuracy_running_stats"]`` is always the latter. History records say the same per epoch
    ("reestimated" only with ``config.bn_reestimate_every_epoch``). ``best`` is the history record with the highest
    "test_accuracy".

    ``trained`` / ``trained_raw``: the model to use (``TrainedModel``), with the re-estimated / the training-time
    statistics. ``num_classes`` and ``reestimated_batch_stats`` are filled in by ``fit``.
    """

    history: list[dict]
    last: dict
    best: dict
    state: TrainState
    config: TrainConfig
    num_classes: int | None = None
    reestimated_batch_stats: Any = None

    @property
    def trained(self) -> TrainedModel:
        """The final model, BatchNorm statistics re-estimated when the config says so (else as ``trained_raw``)."""
        if self.reestimated_batch_stats is None:
            return self.trained_raw
        return self.trained_raw.with_batch_stats(self.reestimated_batch_stats)

    @property
    def trained_raw(self) -> TrainedModel:
        """The final model with the running statistics accumulated during training."""
        if self.num_classes is None:
            raise ValueError("this FitResult has no num_classes (it was not made by fit): build TrainedModel yourself")
        model = make_model(self.config, self.num_classes)
        variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        return TrainedModel(model, variables, self.config, self.num_classes)

    def summary(self) -> dict:
        """Headline numbers: last-epoch test accuracy (and which BN statistics it used, and the accuracy with the
        training-time statistics), best epoch."""
        last = self.last
        return {
            "last_epoch_test_accuracy": last["test_accuracy"],
            "last_epoch_test_accuracy_running_stats": last.get("test_accuracy_running_stats", last["test_accuracy"]),
            "bn_statistics": last.get("bn_statistics", RUNNING),
            "bn_reestimate_batches": last.get("bn_reestimate_batches", 0),
            "best_epoch_test_accuracy": self.best["test_accuracy"],
            "best_epoch": self.best["epoch"],
            "best_epoch_bn_statistics": self.best.get("bn_statistics", RUNNING),
            "epochs": len(self.history),
        }


def evaluate(steps: Steps, placed_state, dataset, batch_size: int) -> dict:
    """Test-split accuracy and mean cross-entropy over all processes.

    ``batch_size``: the global evaluation batch; any value works on any number of devices: each process reads
    ``steps.eval_batch_size(batch_size)`` rows per batch (its share, rounded up to a multiple of its device
    count), and rows that are padding are masked out, so the sums equal a one-device evaluation's.
    """
    totals = {"correct": 0.0, "loss_sum": 0.0, "count": 0.0}
    for batch in dataset.test_batches(steps.eval_batch_size(batch_size), **_shard_kwargs()):
        sums = steps.evaluate(placed_state, steps.place_batch(_pad_rows(batch, steps.local_devices)))
        for k in totals:
            totals[k] += float(sums[k])
    count = max(totals["count"], 1.0)
    return {"test_accuracy": totals["correct"] / count, "test_loss": totals["loss_sum"] / count}


def _pad_rows(batch: dict, multiple: int) -> dict:
    """Pads a masked evaluation batch with zero rows (mask False) up to a multiple of ``multiple`` rows."""
    rows = len(batch["label"])
    extra = -rows % multiple
    if not extra:
        return batch
    mask = np.concatenate([np.asarray(batch["mask"], bool), np.zeros(extra, bool)])
    padded = {
        k: np.concatenate([v, np.zeros((extra,) + np.shape(v)[1:], np.asarray(v).dtype)])
        for k, v in batch.items() if k != "mask"
    }
    return {**padded, "mask": mask}


def evaluate_datasets(config: TrainConfig, state: TrainState, datasets: dict) -> dict[str, dict]:
    """Evaluates a finished state (canonical layout) on several data sets (e.g. shifted test sets), one device.

    Compiles the eval step once for all of them. Returns {name: {"test_accuracy", "test_loss"}}.
    """
    single = dataclasses.replace(config, parallel="none", num_devices=1, admm=False)
    any_ds = next(iter(datasets.values()))
    steps = make_steps(single, any_ds.num_classes, 1)
    placed = steps.place_state(state.replace(admm_state=None))
    return {name: evaluate(steps, placed, ds, config.eval_batch_size) for name, ds in datasets.items()}


def _shard_kwargs():
    # Multi-host: every process reads its own part of each global batch.
    return {"num_shards": jax.process_count(), "shard_index": jax.process_index()}


def process_train_batches(config: TrainConfig, dataset, epoch_index: int):
    """This process's part of every global training batch of one epoch (``epoch_index`` counts from 0).

    Each of the ``jax.process_count()`` processes reads ``config.batch_size // process_count`` rows, disjoint
    from the other processes' rows, so a step trains on a global batch of ``config.batch_size`` and an epoch
    has ``dataset.steps_per_epoch(config.batch_size)`` steps whatever the number of processes.
    """
    rows = process_batch_size(config.batch_size, jax.process_count())
    return dataset.train_batches(rows, seed=config.seed, epoch=epoch_index, **_shard_kwargs())


def first_train_images(config: TrainConfig, dataset) -> np.ndarray:
    """The images of the first training batch of epoch 1 (process 0's rows on every process): the real batch that
    quantizer parameters and statistics are initialised from (``create_train_state``'s ``init_images``)."""
    batches = process_train_batches(config, dataset, 0)
    try:
        images = np.asarray(config.objective.images(next(iter(batches))), np.float32)
    except StopIteration:
        raise ValueError("the training set yields no batch: it is smaller than the batch size") from None
    finally:
        close_if_closable(batches)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        images = np.asarray(multihost_utils.broadcast_one_to_all(images))  # identical initial parameters
    return images


def _checkpoint_manager(workdir: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    )


def save_checkpoint(manager, epoch: int, state: TrainState, meta: dict) -> None:
    """Saves ``state`` and ``meta`` as checkpoint ``epoch`` (1-based: the number of finished epochs).

    Raises RuntimeError if Orbax did not save (it returns False, e.g. when that step already exists): a run must
    never go on with a checkpoint of another run standing in for its own.
    """
    import orbax.checkpoint as ocp

    saved = manager.save(
        epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    )
    manager.wait_until_finished()
    if not saved:
        raise RuntimeError(
            f"the checkpoint of epoch {epoch} was not saved in {manager.directory} (Orbax returned False; a "
            "checkpoint of that epoch already exists there?)"
        )


def restore_checkpoint(manager, template: TrainState, epoch: int | None = None) -> tuple[TrainState, dict]:
    """(state, meta) of checkpoint ``epoch`` (default: the latest), restored into ``template``'s structure."""
    import orbax.checkpoint as ocp

    epoch = manager.latest_step() if epoch is None else epoch
    meta = manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if "epochs_done" not in meta:
        raise ValueError(
            f"checkpoint {epoch} in {manager.directory} was written by an older version of alignq_jax (epochs "
            "counted from 0); it cannot be resumed: start the run again without resume"
        )
    _check_admm_layout(meta.get("admm_devices"), template, manager.directory)
    restored = manager.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(template)))
    return restored["state"], meta


def _admm_devices(state: TrainState) -> int | None:
    """Leading device axis of per-device ADMM states (canonical layout), or None when the state is shared."""
    leaves = jax.tree.leaves(state.admm_state)
    if not leaves or leaves[0].ndim != 3:
        return None
    return int(leaves[0].shape[0])


def _check_admm_layout(saved: int | None, template: TrainState, directory) -> None:
    # Per-device ADMM states cannot be restored on another device count (their number and size change); say so
    # rather than let Orbax fail on shapes.
    now = _admm_devices(template)
    if saved != now:
        def where(n):
            return "one shared ADMM state" if n is None else f"{n} per-device ADMM states"
        raise ValueError(
            f"the checkpoint in {directory} holds {where(saved)}, but this run has {where(now)}: resume with the "
            "device count and correlation settings it was trained with (e.g. --devices)"
        )


def load_variables(checkpoint_dir: str | os.PathLike) -> dict:
    """Variables of the latest checkpoint in a run's workdir (for ``--init-from`` and the progressive chain).

    Returns {"params", "batch_stats"}, plus "admm_state" (an ``ADMMState`` in the canonical layout of
    ``FitResult.state.admm_state``) when the run trained with ADMM. All three can be passed to ``fit`` as
    ``init_variables``.
    """
    import orbax.checkpoint as ocp

    path = Path(checkpoint_dir)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {checkpoint_dir}")
    manager = ocp.CheckpointManager(path.absolute())
    epoch = manager.latest_step()
    if epoch is None:
        raise FileNotFoundError(f"no checkpoint found in {path}")
    restored = manager.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    state = restored["state"]
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    if state.get("admm_state") is not None:
        variables["admm_state"] = _as_admm_state(state["admm_state"])
    return variables


def _as_admm_state(tree) -> ADMMState:
    """An ADMMState from one, or from the {"z", "gamma"} mapping Orbax restores without a template."""
    if isinstance(tree, ADMMState):
        return tree
    if isinstance(tree, dict) and set(tree) == {"z", "gamma"}:
        return ADMMState(z=tree["z"], gamma=tree["gamma"])
    raise ValueError(
        f"admm_state must be an ADMMState or a mapping with keys 'z' and 'gamma'; got {type(tree).__name__}"
        + (f" with keys {sorted(tree)}" if isinstance(tree, dict) else "")
    )


def initial_admm_state(template: ADMMState, given) -> ADMMState:
    """``given`` (e.g. the previous stage's final ADMM state) checked against and laid out like ``template``.

    Both in the canonical layout: per-device states (devices, B, B), one global state (B, B), B the correlation
    batch. Leaves are matched by their paths (a checkpoint restored without a template holds lists where the
    state has tuples) and cast to the template's dtype. Raises ValueError naming the first leaf whose shape
    differs.
    """
    given = _as_admm_state(given)
    expected, got = _layer_names(template), _layer_names(given)
    if expected != got:
        raise ValueError(
            "init admm_state does not have this model's correlation layers: was it trained with another model? "
            f"expected {expected}, got {got}"
        )

    def check(name, t, g):
        if tuple(t.shape) != tuple(np.shape(g)):
            raise ValueError(
                f"init admm_state {name} has shape {tuple(np.shape(g))} but this run needs {tuple(t.shape)}: the "
                "ADMM state is (devices, B, B) with per-device correlations or (B, B) global, B the correlation "
                "batch; use the same batch_size, number of devices and global_correlation as the run it comes from"
            )
        return jnp.asarray(g, t.dtype)

    leaves = [check(n, t, g) for n, t, g in zip(expected, jax.tree.leaves(template), jax.tree.leaves(given))]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def _layer_names(tree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


RUN_FILES = ("metrics.jsonl", "steps.jsonl")


def _clear_run(workdir: Path) -> None:
    """Removes a previous run's checkpoints and logs from ``workdir`` (a fresh run keeps nothing stale)."""
    if (workdir / "checkpoints").exists():
        shutil.rmtree(workdir / "checkpoints")
    for name in RUN_FILES:
        (workdir / name).unlink(missing_ok=True)


def _truncate_logs(workdir: Path, history: list[dict], step: int) -> None:
    """After a restore: metrics.jsonl = the restored history, steps.jsonl = its steps up to ``step``.

    Steps logged after the last checkpoint (an interrupted epoch) are dropped, so the resumed run logs each step
    exactly once. A line cut short by the interruption is dropped too.
    """
    _rewrite(workdir / "metrics.jsonl", [json.dumps(r) for r in history])
    path = workdir / "steps.jsonl"
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line)
    _rewrite(path, kept)


def _rewrite(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


@contextlib.contextmanager
def interrupts_outside(packages: tuple[str, ...] = ("orbax",), retry_s: float = 0.05, max_wait_s: float = 120.0):
    """Ctrl-C (SIGINT) and SIGTERM raise KeyboardInterrupt, except while the main thread runs code of
    ``packages``: then it is delivered as soon as the main thread has left them (or after ``max_wait_s``, should
    that code hang).

    SIGTERM is what a preempted cloud VM, ``timeout`` or ``kill`` sends: handled like Ctrl-C, the run stops
    cleanly and says how to resume instead of dying mid-write. An Orbax checkpoint write interrupted half way
    leaves a thread that waits forever, so the process would hang at exit instead of printing how to resume.
    Only acts in the main thread, and only on signals with their default handling (not where they are ignored,
    e.g. SIGINT in a background job). An interrupt still waiting when the block ends is raised there.
    """
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    handled = [s for s, default in defaults.items() if signal.getsignal(s) is default]
    if threading.current_thread() is not threading.main_thread() or not handled:
        yield
        return
    waiting = {"since": None, "timer": None, "signal": None}

    def inside(frame) -> bool:
        while frame is not None:
            if str(frame.f_globals.get("__name__", "")).startswith(packages):
                return True
            frame = frame.f_back
        return False

    def ask_again():
        waiting["timer"] = None
        os.kill(os.getpid(), waiting["signal"])

    def handler(signum, frame):
        now = time.monotonic()
        if inside(frame) and (waiting["since"] is None or now - waiting["since"] < max_wait_s):
            if waiting["since"] is None:
                waiting["since"], waiting["signal"] = now, signum
                print("\ninterrupt: finishing the checkpoint being written first", file=sys.stderr)
            if waiting["timer"] is None:
                waiting["timer"] = threading.Timer(retry_s, ask_again)
                waiting["timer"].daemon = True
                waiting["timer"].start()
            return
        waiting["since"] = None
        raise KeyboardInterrupt

    for s in handled:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s in handled:
            signal.signal(s, defaults[s])
        if waiting["timer"] is not None:
            waiting["timer"].cancel()
    if waiting["since"] is not None:
        raise KeyboardInterrupt


@interrupts_outside()  # Ctrl-C waits for a checkpoint write to finish (users calling fit directly too)
def fit(
    config: TrainConfig,
    dataset,
    *,
    workdir: str | os.PathLike | None = None,
    init_variables: dict | None = None,
    resume: bool = False,
    progress: bool | None = None,
    stop_after_epochs: int | None = None,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Trains ``config`` on ``dataset`` for ``config.epochs`` epochs, evaluating after each.

    Epochs are numbered from 1 everywhere: history records, ``FitResult.best["epoch"]``, ``steps.jsonl``,
    checkpoint numbers (checkpoint E holds the state after epoch E).

    BatchNorm re-estimation (``config.bn_reestimate_batches`` > 0, the default): after the last epoch the BN and
    quantizer running statistics are recomputed with the final weights (``reestimate_for_fit``) and
    ``FitResult.last["test_accuracy"]`` is measured with them; the training-time statistics' accuracy stays in
    ``last["test_accuracy_running_stats"]`` and ``last["bn_statistics"]`` says which is the headline. With
    ``config.bn_reestimate_every_epoch`` every history record is measured so. Checkpoints keep the training state
    (running statistics), so resuming continues training exactly; the history with its records is in their meta.

    Args:
      workdir: if given: ``metrics.jsonl`` (one line per epoch), ``steps.jsonl`` (every step), Orbax checkpoints
        after every epoch, ``config.json`` (with several processes, process 0 writes the logs). Without
        ``resume`` any checkpoints and logs already there are deleted first: a fresh run never keeps or loads another run's checkpoints.
      init_variables: {"params", "batch_stats"} to start from (e.g. the FP32 run), optionally with "admm_state"
        (canonical layout, as ``FitResult.state.admm_state`` or ``load_variables``) as the initial ADMM state,
        e.g. the previous stage of the progressive chain; its shapes must match this run's (same batch size,
        devices and ``global_correlation``). An "admm_state" is not used when ``config.admm`` is False.
      resume: continue from the latest checkpoint in ``workdir`` (the next epoch; data order depends only on
        (seed, epoch), so an interrupted and resumed run equals an uninterrupted one). ``metrics.jsonl`` and
        ``steps.jsonl`` are cut back to what that checkpoint covers, so every step is logged once. Without any
        checkpoint in ``workdir`` the run starts from epoch 1 (with emptied logs).
      progress: a progress bar per epoch on stderr; None (default): only when stderr is a terminal or in a
        notebook, so logs written to a file or pipe get no bar redraws (use ``log`` for one line per epoch).
      stop_after_epochs: stop early after this many epochs of this call (simulates an interruption; the
        schedule still follows ``config.epochs``).
      log: called with one line per epoch (e.g. ``print``); None is silent.
    """
    progress = _show_progress() if progress is None else bool(progress)
    steps_per_epoch = dataset.steps_per_epoch(config.batch_size)
    steps = make_steps(config, dataset.num_classes, steps_per_epoch)
    state = create_train_state(
        config, dataset.image_shape, dataset.num_classes, steps_per_epoch, gap_batch=steps.gap_batch,
        init_variables=init_variables, init_images=first_train_images(config, dataset),
    )
    state = canonical_state(steps, state)
    if config.admm and init_variables is not None and init_variables.get("admm_state") is not None:
        state = state.replace(admm_state=initial_admm_state(state.admm_state, init_variables["admm_state"]))
    workdir = Path(workdir) if workdir is not None else None
    manager = None
    history: list[dict] = []
    epochs_done = 0
    primary = jax.process_index() == 0  # with several processes one writes the logs (Orbax coordinates its own)
    if workdir is not None:
        if primary:
            workdir.mkdir(parents=True, exist_ok=True)
            if not resume:
                _clear_run(workdir)
        _barrier("alignq_jax.fit: workdir ready")
        manager = _checkpoint_manager(workdir)
        if resume:
            if manager.latest_step() is not None:
                state, meta = restore_checkpoint(manager, state)
                history, epochs_done = meta["history"], meta["epochs_done"]
            if primary:
                _truncate_logs(workdir, history, int(state.step))
        if primary:
            (workdir / "config.json").write_text(json.dumps(config_to_dict(config), indent=2))
    log_dir = workdir if primary else None

    reestimated = None  # the re-estimated batch_stats of the last epoch run (every-epoch re-estimation)
    try:
        placed = steps.place_state(state)
        end = config.epochs if stop_after_epochs is None else min(config.epochs, epochs_done + stop_after_epochs)
        for epoch in range(epochs_done + 1, end + 1):
            placed, record = _run_epoch(
                config, dataset, steps, placed, epoch, steps_per_epoch, log_dir, progress and primary
            )
            host = None
            if config.bn_reestimate_every_epoch:
                host = steps.host_state(placed)
                record, reestimated = _reestimated_record(config, dataset, steps, host, record)
            else:
                record = {**record, "bn_statistics": RUNNING}
            history.append(record)
            if workdir is not None:
                if log_dir is not None:
                    with open(log_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                save_checkpoint(
                    manager, epoch, host if host is not None else steps.host_state(placed),
                    {"epochs_done": epoch, "history": history, "admm_devices": _admm_devices(state)},
                )
            if log is not None:
                log(
                    f"epoch {epoch}/{config.epochs}: loss {record['train_loss']:.4f} "
                    f"penalty {record['train_penalty']:.3g} train acc {record.get('train_accuracy', float('nan')):.4f}"
                    f"{_extra_metrics(record)} test acc {record['test_accuracy']:.4f}{_running_note(record)}"
                )
    finally:
        if manager is not None:
            manager.close()
    if not history:
        raise ValueError("no epoch was run: nothing to resume from, or epochs already complete")
    final = steps.host_state(placed)
    last = history[-1]
    if config.bn_reestimate_batches and reestimated is None:
        last, reestimated = _reestimated_record(config, dataset, steps, final, last)
        if log is not None:
            log(
                f"BatchNorm statistics re-estimated over {last['bn_reestimate_batches']} training batches: test acc "
                f"{last['test_accuracy']:.4f}{_running_note(last)}"
            )
    best = max(history, key=lambda r: r["test_accuracy"])
    return FitResult(history, last, best, final, config, dataset.num_classes, reestimated)


def _extra_metrics(record: dict) -> str:
    """The objective's own training metrics beyond loss, CE, penalty and accuracy (e.g. a domain loss)."""
    common = {"train_loss", "train_ce", "train_penalty", "train_accuracy", "train_seconds"}
    extra = [k for k in record if k.startswith("train_") and k not in common]
    return "".join(f" {k[len('train_'):].replace('_', ' ')} {record[k]:.3g}" for k in extra)


def _running_note(record: dict) -> str:
    if record.get("bn_statistics") != REESTIMATED:
        return ""
    return f" (BN re-estimated; running statistics: {record['test_accuracy_running_stats']:.4f})"


def reestimate_for_fit(config: TrainConfig, dataset, params, batch_stats, epoch: int) -> tuple[Any, int]:
    """BatchNorm statistics of ``params`` re-estimated as ``fit`` does after epoch ``epoch`` (1-based).

    Batches: the first ``min(config.bn_reestimate_batches, steps_per_epoch)`` training batches in the data order of
    epoch ``epoch``, through the training pipeline as is (augmentation included, when the data set has any): the
    statistics are meant to replace the noisy running average of what training normalised with, not to adapt the
    model to another input distribution (unaugmented images would be AdaBN toward the test pipeline); this is also
    what precise-BN implementations do. The order depends only on (seed, epoch), so a resumed run re-estimates
    exactly as an uninterrupted one. With several processes each passes its own rows and the results are combined.

    Returns (batch_stats, number of batches used).
    """
    n = min(config.bn_reestimate_batches, dataset.steps_per_epoch(config.batch_size))
    if n < 1:
        raise ValueError("BatchNorm re-estimation needs at least one training batch")
    model = make_model(config, dataset.num_classes)
    batches = process_train_batches(config, dataset, epoch - 1)
    # Every image batch of the first n training batches that training normalised (one per forward pass).
    passes = (p for batch in itertools.islice(batches, n) for p in config.objective.statistics_batches(batch))
    try:
        stats = reestimate_batch_stats(
            model, {"params": params, "batch_stats": batch_stats}, passes, across_processes=jax.process_count() > 1,
        )
    finally:
        close_if_closable(batches)
    return stats, n


def _reestimated_record(config: TrainConfig, dataset, steps: Steps, host: TrainState, record: dict):
    """(``record`` with the test metrics measured after BatchNorm re-estimation and the running-statistics ones
    kept under ``*_running_stats``, the re-estimated batch_stats)."""
    start = time.perf_counter()
    stats, n = reestimate_for_fit(config, dataset, host.params, host.batch_stats, record["epoch"])
    # Only params and batch_stats are read by the eval step.
    placed = steps.place_state(host.replace(batch_stats=stats, opt_state=None, admm_state=None))
    metrics = evaluate(steps, placed, dataset, config.eval_batch_size)
    running = {k: v for k, v in record.items() if k not in ("test_accuracy", "test_loss", "bn_statistics")}
    return {
        **running,
        **metrics,
        "test_accuracy_running_stats": record["test_accuracy"],
        "test_loss_running_stats": record["test_loss"],
        "bn_statistics": REESTIMATED,
        "bn_reestimate_batches": n,
        "bn_reestimate_seconds": time.perf_counter() - start,
    }, stats


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _show_progress() -> bool:
    """Progress bars by default only where they redraw in place: a terminal, or a notebook (tqdm's widget)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def _run_epoch(config, dataset, steps: Steps, placed, epoch, steps_per_epoch, workdir, progress):
    """Epoch ``epoch`` (1-based) of training, then evaluation. Returns (placed state, history record)."""
    from tqdm.auto import tqdm

    sums: dict[str, float] = {}  # the step's metrics ("loss", "penalty" and the objective's), summed
    n = 0
    start = time.perf_counter()
    # The data order is a function of (seed, epoch - 1): epoch indices of the data pipeline count from 0.
    batches = process_train_batches(config, dataset, epoch - 1)
    bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", disable=not progress, leave=False)
    step_log = open(workdir / "steps.jsonl", "a") if workdir is not None else None

    def record_step(metrics):
        nonlocal n
        metrics = {k: float(v) for k, v in metrics.items()}  # waits for that step to finish
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss became {metrics['loss']} at epoch {epoch}, step {n + 1}")
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
        bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()})
        if step_log is not None:
            step_log.write(json.dumps({"epoch": epoch, "step": (epoch - 1) * steps_per_epoch + n, **metrics}) + "\n")

    try:
        # Metrics are read one step late, so the next step is already dispatched while the host waits.
        pending = None
        for batch in bar:
            placed, metrics = steps.train(placed, steps.place_batch(batch))
            if pending is not None:
                record_step(pending)
            pending = metrics
        if pending is not None:
            record_step(pending)
    finally:
        bar.close()
        if step_log is not None:
            step_log.close()
    if n != steps_per_epoch:
        # The LR schedule counts steps_per_epoch steps per epoch; with several processes a different count
        # would also leave the processes' collectives unmatched.
        raise ValueError(f"epoch {epoch} yielded {n} training batches but steps_per_epoch is {steps_per_epoch}")
    train_seconds = time.perf_counter() - start
    record = {
        "epoch": epoch,
        **{f"train_{k}": v / max(n, 1) for k, v in sums.items()},
        "train_seconds": train_seconds,
        "images_per_second": n * config.batch_size / max(train_seconds, 1e-9),
    }
    record.update(evaluate(steps, placed, dataset, config.eval_batch_size))
    return placed, record


@dataclasses.dataclass(frozen=True)
class BatchStreams:
    """Adapter for data that comes as iterators of batches rather than arrays (e.g. your own loader).

    Attributes:
      train: ``train(epoch) -> iterable`` of {"image": (B, H, W, C) float32 (already normalised), "label": (B,)
        int} with exactly ``batch_size`` rows each (with several processes: this process's
        ``batch_size // jax.process_count()`` rows of each global batch); called once per epoch (from 0).
      test: ``test() -> iterable`` of batches of any size (this process's share of the test set), optionally
        with a boolean "mask" (False marks padding rows).
      steps_per_epoch_: number of training batches ``train(epoch)`` yields.
      image_shape: (H, W, C). num_classes: number of classes.
    """

    train: Callable[[int], Any]
    test: Callable[[], Any]
    steps_per_epoch_: int
    image_shape: tuple[int, int, int]
    num_classes: int

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.steps_per_epoch_

    def train_batches(self, batch_size, *, seed=0, epoch=0, num_shards=1, shard_index=0):
        # Sharding over processes is the user's iterator's job (see ``train``); ``batch_size`` is per process.
        for batch in self.train(epoch):
            if len(batch["label"]) != batch_size:
                raise ValueError(f"train batches must have exactly batch_size={batch_size} rows; got {len(batch['label'])}")
            yield batch

    def test_batches(self, batch_size, *, num_shards=1, shard_index=0):
        for batch in self.test():
            if "mask" not in batch:
                batch = {**batch, "mask": np.ones(len(batch["label"]), bool)}
            yield batch


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    d["milestones"] = list(config.milestones)
    d["objective"] = config.objective.describe()
    d["lr_multipliers"] = [list(rule) for rule in config.lr_multipliers]
    rules = getattr(config.quant, "rules", None)  # QuantRules: (regex, config) pairs and a default
    pairs = [(config.quant, d["quant"])] if rules is None else [
        *((c, r[1]) for (_, c), r in zip(rules, d["quant"]["rules"])), (config.quant.default, d["quant"]["default"])]
    for quant, record in pairs:
        if not isinstance(quant.method, str):  # a method object: asdict keeps its options but not which method it is
            record["method"] = {"name": quant.method.name, **dataclasses.asdict(quant.method)}
    return d


def train_on_arrays(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    config: TrainConfig,
    *,
    num_classes: int | None = None,
    augment: str = "none",
    **fit_kwargs,
) -> FitResult:
    """Quantization-aware training on in-memory numpy arrays (NHWC images, integer labels).

    Images are uint8 (0..255) or float in [0, 1]; they are normalised with the training mean/std. Returns the
    history and final metrics (``FitResult``). Extra keyword arguments go to :func:`fit`.
    """
    labels = np.asarray(train_labels)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    dataset = ArrayDataset(train_images, train_labels, test_images, test_labels, num_classes, augment=augment)
    return fit(config, dataset, **fit_kwargs)
