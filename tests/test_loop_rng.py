"""The training RNG: every step consumes a key that is never carried to the next state and never reused."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignq_jax.quantize import CORRELATION_RNG
from alignq_jax.training import TrainState, train_step


class _KeyRecordingModel:
    """Stands in for a Flax model: linear logits, and the correlation key it was given returned as 'batch_stats'
    (train_step stores the returned batch_stats in the new state, so the key used inside a jitted step is visible)."""

    def apply(self, variables, x, *, train, mutable, rngs):
        logits = x.reshape(x.shape[0], -1) @ variables["params"]["w"]
        return logits, {"batch_stats": {"key": jax.random.key_data(rngs[CORRELATION_RNG])}}


def _state(seed=0):
    params = {"w": jnp.zeros((4, 3))}
    tx = optax.sgd(0.1)
    return tx, TrainState(
        params=params, batch_stats={"key": jnp.zeros((2,), jnp.uint32)}, opt_state=tx.init(params), admm_state=None,
        step=jnp.zeros((), jnp.int32), rng=jax.random.key(seed),
    )


def _batch(n=6):
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(n, 2, 2, 1)).astype(np.float32), "label": rng.integers(0, 3, n).astype(np.int32)}


def _key_bytes(key_data):
    return np.asarray(key_data).tobytes()


def test_step_key_is_never_the_carried_key_nor_reused():
    tx, state = _state()
    step = jax.jit(lambda s, b: train_step(s, b, model=_KeyRecordingModel(), tx=tx, admm=None, admm_weight=1.0))
    batch = _batch()
    seen = {_key_bytes(jax.random.key_data(state.rng))}  # keys that were carried in a state
    used = set()
    for _ in range(4):
        incoming = _key_bytes(jax.random.key_data(state.rng))
        state, _ = step(state, batch)
        key_used = _key_bytes(state.batch_stats["key"])
        carried = _key_bytes(jax.random.key_data(state.rng))
        assert key_used != incoming, "the step consumed the key it also splits for the next state"
        assert key_used != carried
        assert key_used not in seen and key_used not in used
        assert carried not in seen and carried not in used
        used.add(key_used)
        seen.add(carried)


def test_per_device_step_keys_are_distinct_and_never_carried():
    """Data-parallel form (a named axis, here vmap): every device draws its own key; none is the carried key."""
    tx, state = _state(1)
    n = 4
    step = jax.vmap(
        lambda s, b: train_step(s, b, model=_KeyRecordingModel(), tx=tx, admm=None, admm_weight=1.0, axis_name="d"),
        in_axes=(None, 0), axis_name="d",
    )
    batch = jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), _batch(8))
    new, _ = step(state, batch)
    keys = [_key_bytes(k) for k in np.asarray(new.batch_stats["key"])]
    carried = {_key_bytes(k) for k in np.asarray(jax.random.key_data(new.rng))}
    assert len(carried) == 1  # all devices carry the same key
    assert len(set(keys)) == n
    assert not carried & set(keys)
    assert _key_bytes(jax.random.key_data(state.rng)) not in set(keys)
