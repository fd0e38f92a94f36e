"""Pure train and eval steps, and their single-device / data-parallel (shard_map over a Mesh, or pmap) forms.

One iteration (docs/method.md §6): forward in train mode (quantized weights and activations, correlation gaps
recorded), loss = the objective's loss (cross-entropy for classification, ``alignq_jax.training.objectives``) +
admm_weight * ADMM penalty, gradients (averaged over the device axis), optax update, then
the ADMM update with this step's gaps (computed before the weight update, as the official code does).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alignq_jax.quantize import CORRELATION_RNG, GAP_COLLECTION
from alignq_jax.training.objectives import CLASSIFICATION
from alignq_jax.training.state import DATA_AXIS, TrainConfig, TrainState, make_model, make_optimizer


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model,
    tx,
    admm,
    admm_weight: float,
    axis_name: str | None = None,
    same_rng_on_devices: bool = False,
    objective=CLASSIFICATION,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
):
    """One optimisation step on the local batch. Returns (new state, metrics averaged over ``axis_name``).

    ``objective`` (``alignq_jax.training.objectives``) computes the task loss from the batch (its layout is the
    objective's: {"image": (B, H, W, C) float, "label": (B,) int} for classification) through forward passes of
    ``model``; the step adds ``admm_weight`` * the ADMM penalty of the gaps those passes recorded. ``schedule``:
    a function of the step counter whose traced value reaches the objective as ``coefficient`` and the metrics as
    "coefficient". Metrics: "loss", "penalty" and the objective's. ``same_rng_on_devices``: every device draws the
    same sampled features (needed when the correlation is all-gathered over devices).
    """
    mutable = ["batch_stats", GAP_COLLECTION] if admm is not None else ["batch_stats"]

    # Split before use: one half is this step's key, the other is carried to the next state, so no key is both
    # consumed and split. A fresh key per step (and per device) for the sampled-feature correlation estimate.
    step_key, next_rng = jax.random.split(state.rng)
    if axis_name is not None and not same_rng_on_devices:
        step_key = jax.random.fold_in(step_key, jax.lax.axis_index(axis_name))
    coefficient = schedule(state.step) if schedule is not None else None

    def loss_fn(params):
        def forward(batch_stats, images, key, **kwargs):
            outputs, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=mutable,
                rngs={CORRELATION_RNG: key}, **kwargs,
            )
            return outputs, updates["batch_stats"], updates.get(GAP_COLLECTION, {})

        terms = objective.loss(forward, state.batch_stats, batch, coefficient, step_key)
        penalty = admm.penalty(terms.gaps, state.admm_state) if admm is not None else jnp.zeros(())
        return terms.loss + admm_weight * penalty, (terms, penalty)

    (loss, (terms, penalty)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    admm_state = admm.update(terms.gaps, state.admm_state) if admm is not None else state.admm_state
    metrics = {"loss": loss, "penalty": penalty, **terms.metrics}
    if coefficient is not None:
        metrics["coefficient"] = jnp.asarray(coefficient, jnp.float32)
    if axis_name is not None:
        metrics = jax.lax.pmean(metrics, axis_name)
    new_state = state.replace(
        params=params,
        batch_stats=terms.batch_stats,
        opt_state=opt_state,
        admm_state=admm_state,
        step=state.step + 1,
        rng=next_rng,
    )
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model, axis_name: str | None = None):
    """Sums over the (masked) local batch: {"correct", "loss_sum", "count"}; psum over ``axis_name``."""
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    sums = {
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
        "loss_sum": jnp.sum(ce * mask),
        "count": jnp.sum(mask),
    }
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    return sums


# --------------------------------------------------------------------------------------------------------------
# Parallel forms


@dataclasses.dataclass(frozen=True)
class Steps:
    """Compiled step functions plus how to lay state and batches out on the devices.

    ``train(state, batch)`` and ``evaluate(state, batch)`` take a state from ``place_state`` and batches from
    ``place_batch``: host numpy arrays holding this process's rows of the global batch (all of it with one
    process; ``batch_size // process_count`` rows each with several). States travel in a canonical layout (no
    device axis, except a leading one of size ``num_devices`` on the ADMM leaves when every device keeps its own
    ADMM state): ``canonical_state`` makes it from a fresh state, ``place_state`` puts it on the devices,
    ``host_state`` brings it back (checkpoints), the same on every process.

    ``num_devices`` counts the devices of all processes, ``local_devices`` those of this process (the rows of a
    host batch are split over these); ``process_count`` is the number of processes feeding data.
    """

    mode: str
    num_devices: int
    train: Callable
    evaluate: Callable
    place_state: Callable
    place_batch: Callable
    host_state: Callable
    mesh: Mesh | None = None
    per_device_admm: bool = False
    gap_batch: int = 0  # batch size of the correlation gaps: per device, or global (one device / all-gather)
    local_devices: int = 1
    process_count: int = 1

    def process_batch_size(self, global_batch_size: int) -> int:
        """Rows of a global training batch that this process feeds (``global_batch_size // process_count``)."""
        return process_batch_size(global_batch_size, self.process_count)

    def eval_batch_size(self, requested: int) -> int:
        """Rows per process of an evaluation batch: ``requested`` split over the processes, rounded up to a
        multiple of the local device count. Evaluation batches are padded and masked, so any ``requested``
        works on any number of devices and gives the same sums."""
        per_process = -(-requested // self.process_count)
        return -(-per_process // self.local_devices) * self.local_devices


def process_batch_size(global_batch_size: int, process_count: int) -> int:
    """``global_batch_size // process_count``: the rows of every global batch one process feeds."""
    if global_batch_size % process_count:
        raise ValueError(
            f"batch_size={global_batch_size} must be divisible by the number of processes ({process_count}): "
            "every process feeds batch_size // process_count rows of each global batch"
        )
    return global_batch_size // process_count


def resolve_parallel(config: TrainConfig) -> tuple[str, list]:
    devices = jax.devices()
    if config.num_devices is not None:
        if config.num_devices > len(devices):
            raise ValueError(f"num_devices={config.num_devices} but only {len(devices)} devices are visible")
        devices = devices[: config.num_devices]
    mode = config.parallel
    if mode == "auto":
        mode = "shard_map" if len(devices) > 1 else "none"
    if mode == "none" and jax.process_count() > 1:
        raise ValueError(
            f"parallel='none' runs on one device of one process; with {jax.process_count()} processes use "
            "'shard_map', 'pmap' or 'auto'"
        )
    if mode == "none" and len(devices) > 1 and config.num_devices not in (None, 1):
        raise ValueError("parallel='none' runs on one device; use num_devices=1 or shard_map/pmap")
    if mode == "none":
        devices = devices[:1]
    return mode, devices


def _local_positions(devices) -> list[int]:
    """Positions in ``devices`` of this process's devices (every process must own the same number)."""
    counts = {}
    for d in devices:
        counts[d.process_index] = counts.get(d.process_index, 0) + 1
    if len(counts) != jax.process_count() or len(set(counts.values())) != 1:
        raise ValueError(
            f"every one of the {jax.process_count()} processes must own the same number of the devices used; "
            f"devices per process: {dict(sorted(counts.items()))} (leave num_devices unset on several processes)"
        )
    return [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]


def per_device_admm(config: TrainConfig, mode: str) -> bool:
    """True when every device keeps its own ADMM state (per-device correlations)."""
    return config.admm and mode != "none" and not config.global_correlation


def make_steps(config: TrainConfig, num_classes: int, steps_per_epoch: int) -> Steps:
    """Builds the jitted train/eval steps for ``config.parallel`` over ``config.num_devices`` devices."""
    mode, devices = resolve_parallel(config)
    n = len(devices)
    if config.batch_size % n:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the number of devices ({n})")
    processes = jax.process_count()
    process_batch_size(config.batch_size, processes)  # raises unless divisible
    local = _local_positions(devices)
    n_local = len(local)
    tx = make_optimizer(config, steps_per_epoch)
    admm = config.make_admm() if config.admm else None
    axis = None if mode == "none" else DATA_AXIS
    model = make_model(config, num_classes, axis_name=axis)
    local_train = partial(
        train_step, model=model, tx=tx, admm=admm, admm_weight=config.admm_weight, axis_name=axis,
        same_rng_on_devices=config.global_correlation, objective=config.objective,
        schedule=config.objective.schedule(steps_per_epoch, config.epochs),
    )
    local_eval = partial(eval_step, model=model, axis_name=axis)

    if mode == "none":
        device = devices[0]
        put = lambda tree: jax.device_put(tree, device)  # noqa: E731
        return Steps(
            mode, 1, jax.jit(local_train, donate_argnums=0), jax.jit(local_eval), put, put, jax.device_get,
            gap_batch=config.batch_size, local_devices=1, process_count=1,
        )

    split_admm = per_device_admm(config, mode)
    gap_batch = config.batch_size if config.global_correlation else config.batch_size // n

    if mode == "pmap":
        # pmap maps the leading axis of its inputs over this process's devices among ``devices``.
        def place_state(state):
            if split_admm:  # this process's devices' entries of the canonical (num_devices, ...) states
                take = np.array(local)
                state = state.replace(admm_state=jax.tree.map(lambda x: jnp.asarray(x)[take], state.admm_state))
            return _broadcast_shared(state, n_local, split_admm)

        def place_batch(batch):
            return jax.tree.map(lambda x: _split_rows(x, n_local), batch)

        train = jax.pmap(local_train, axis_name=DATA_AXIS, devices=devices, donate_argnums=0)
        evaluate = jax.pmap(local_eval, axis_name=DATA_AXIS, devices=devices)

        def train_fn(state, batch):
            state, metrics = train(state, batch)
            return state, jax.tree.map(lambda m: m[0], metrics)

        def eval_fn(state, batch):
            return jax.tree.map(lambda m: m[0], evaluate(state, batch))

        def host_state(state):
            state = jax.device_get(state)
            plain = jax.tree.map(lambda x: x[0], state.replace(admm_state=None))
            admm_state = state.admm_state if split_admm else jax.tree.map(lambda x: x[0], state.admm_state)
            if split_admm and processes > 1:
                admm_state = jax.tree.map(lambda x: _gather_per_device(x, devices), admm_state)
            return plain.replace(admm_state=admm_state)

        return Steps(
            mode, n, train_fn, eval_fn, place_state, place_batch, host_state, None, split_admm, gap_batch, n_local,
            processes,
        )

    # shard_map over a 1-D Mesh: the default data-parallel path. check_vma=False gives pmap's semantics (no
    # implicit psum of gradients of replicated parameters), so the same explicit pmean serves both forms.
    mesh = Mesh(np.array(devices), (DATA_AXIS,))
    admm_spec = P(DATA_AXIS) if split_admm else P()

    def state_specs(state):
        specs = jax.tree.map(lambda _: P(), state.replace(admm_state=None))
        if state.admm_state is not None:
            specs = specs.replace(admm_state=jax.tree.map(lambda _: admm_spec, state.admm_state))
        return specs

    def sharded_train(state, batch):
        def body(state, batch):
            if split_admm:
                state = state.replace(admm_state=jax.tree.map(lambda x: x[0], state.admm_state))
            state, metrics = local_train(state, batch)
            if split_admm:
                state = state.replace(admm_state=jax.tree.map(lambda x: x[None], state.admm_state))
            return state, metrics

        specs = state_specs(state)
        return jax.shard_map(
            body, mesh=mesh, in_specs=(specs, P(DATA_AXIS)), out_specs=(specs, P()), check_vma=False
        )(state, batch)

    def sharded_eval(state, batch):
        specs = state_specs(state)
        return jax.shard_map(
            local_eval, mesh=mesh, in_specs=(specs, P(DATA_AXIS)), out_specs=P(), check_vma=False
        )(state, batch)

    def place_state(state):
        shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs(state))
        return jax.device_put(state, shardings)

    batch_sharding = NamedSharding(mesh, P(DATA_AXIS))

    def place_batch(batch):
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, x), batch)

    def host_state(state):
        return jax.tree.map(_fetch_global, state)  # the global view is already the canonical layout

    return Steps(
        mode, n, jax.jit(sharded_train, donate_argnums=0), jax.jit(sharded_eval), place_state, place_batch,
        host_state, mesh, split_admm, gap_batch, n_local, processes,
    )


def _split_rows(x, parts: int):
    """(B, ...) host rows -> (parts, B // parts, ...) for pmap over ``parts`` local devices."""
    if x.shape[0] % parts:
        raise ValueError(f"a batch of {x.shape[0]} rows does not split over {parts} local devices")
    return np.reshape(x, (parts, x.shape[0] // parts) + x.shape[1:])


def _gather_per_device(local_values, devices):
    """pmap, several processes: this process's (local, ...) per-device values -> the (len(devices), ...) array
    ordered like ``devices`` (every process contributes its own devices' entries)."""
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(local_values)))  # (processes, local, ...)
    out = np.empty((len(devices),) + gathered.shape[2:], gathered.dtype)
    for p in range(gathered.shape[0]):
        out[[i for i, d in enumerate(devices) if d.process_index == p]] = gathered[p]
    return out


def _fetch_global(x):
    """A global array as one host value on every process (device_get cannot fetch other processes' shards)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            x = jax.jit(lambda a: a, out_shardings=NamedSharding(x.sharding.mesh, P()))(x)
        x = x.addressable_data(0)
    return jax.device_get(x)


def _broadcast_shared(state: TrainState, n: int, split_admm: bool) -> TrainState:
    """Adds a leading device axis of size n to every leaf that does not have one yet."""
    plain = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), state.replace(admm_state=None))
    admm_state = state.admm_state
    if admm_state is not None and not split_admm:
        admm_state = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), admm_state)
    return plain.replace(admm_state=admm_state)


def canonical_state(steps: Steps, state: TrainState) -> TrainState:
    """Fresh state (no device axis) -> the layout ``steps.place_state`` expects: per-device ADMM states get a
    leading device axis (all devices start from the same state and diverge with their own gaps)."""
    if steps.per_device_admm and state.admm_state is not None:
        n = steps.num_devices
        state = state.replace(admm_state=jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), state.admm_state))
    return state
