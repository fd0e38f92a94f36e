"""ADMM correlation-preservation solver (docs/method.md §5), optax-style: init / penalty / update.

The problem: min_W L(W) + mu*||Z||_1 subject to D(W) = Z, where D is the correlation gap of each quantized
activation layer (``alignq_jax.correlation.correlation_gap``). ``gaps`` is any pytree of B x B matrices (one per
layer); the state ``ADMMState(z, gamma)`` holds two pytrees that mirror it.

Two modes:

* ``"textbook"`` (default): scaled ADMM (docs/method.md §5.6). Zero init; penalty
  mu*mean|Z| + mean(Gamma*(D - Z)) + (rho/2)*mean((D - Z)^2); Z <- S_{mu/rho}(D + Gamma/rho) (elementwise soft
  threshold), Gamma <- Gamma + rho*(D - Z). The whole augmented Lagrangian is divided by the number of entries
  B^2 so its size does not grow with the batch; that is the same ADMM on a rescaled objective, so the Z and Gamma
  steps are the standard ones.
* ``"paper"``: the official code's equations exactly (docs/method.md §5.1-5.3): U[0,1) init of size dim x dim,
  penalty mu*mean|Zb| + (rho/2)*RMS(D - Zb) + mean(Gammab*|D - Zb|) on the top-left B x B corner, Frobenius-norm
  group shrinkage of the whole matrix for Z, zero padding of D to dim x dim in the update.

In both modes Z and Gamma are held constant (stop_gradient) in the penalty; ``update`` is one jitted call for the
whole tree and is meant to run after the optimizer step with the gaps of the same forward pass.

The state is float32 whatever the gaps' dtype (float64 for float64 gaps): a bfloat16 dual would stop
accumulating small steps. Gaps are upcast before the penalty and the update.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

MODES = ("textbook", "paper")
# Keeps d/dx sqrt(x) finite when D equals Z exactly; changes the RMS by < 1e-6.
_RMS_FLOOR = 1e-12


class ADMMState(NamedTuple):
    """Auxiliary variable Z and scaled dual Gamma, each a pytree mirroring the gaps."""

    z: Any
    gamma: Any


def _state_dtype(dtype):
    """float32 for float32 and narrower gaps (bfloat16, float16), float64 for float64 gaps."""
    return jnp.promote_types(dtype, jnp.float32)


def _check_square(d):
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"every correlation gap must be a square B x B matrix; got shape {d.shape}")


def _corner(m, b):
    if b > m.shape[0]:
        raise ValueError(
            f"batch size {b} exceeds the ADMM state size {m.shape[0]} (paper mode: dim = training batch size); "
            "evaluate with batches no larger than the training batch, or init with a larger dim"
        )
    return m[:b, :b]


def _pad_to(d, dim):
    b = d.shape[0]
    if b > dim:
        _corner(jnp.zeros((dim, dim)), b)  # raises the explanatory error
    return jnp.pad(d, ((0, dim - b), (0, dim - b)))


def soft_threshold(v, threshold):
    """Elementwise soft threshold S_t(v) = sign(v) * max(|v| - t, 0), the prox of t*||.||_1."""
    return jnp.sign(v) * jnp.maximum(jnp.abs(v) - threshold, 0.0)


def group_shrink(v, threshold):
    """Frobenius-norm shrinkage of a whole matrix (official code): (1 - t/||v||_F) v if ||v||_F > t, else 0."""
    norm = jnp.sqrt(jnp.sum(v * v))
    safe_norm = jnp.where(norm > threshold, norm, 1.0)
    return jnp.where(norm > threshold, (1.0 - threshold / safe_norm) * v, jnp.zeros_like(v))


def _paper_penalty(d, z, gamma, mu, rho):
    b = d.shape[0]
    zb, gb = _corner(z, b), _corner(gamma, b)
    r = d - zb
    return mu * jnp.mean(jnp.abs(zb)) + 0.5 * rho * jnp.sqrt(jnp.mean(r * r) + _RMS_FLOOR) + jnp.mean(gb * jnp.abs(r))


def _textbook_penalty(d, z, gamma, mu, rho):
    if d.shape != z.shape:
        raise ValueError(
            f"textbook ADMM state has shape {z.shape} but the gap has shape {d.shape}; use fixed-size batches "
            "(drop_last) for training"
        )
    r = d - z
    return mu * jnp.mean(jnp.abs(z)) + jnp.mean(gamma * r) + 0.5 * rho * jnp.mean(r * r)


def _paper_update(d, z, gamma, mu, rho):
    dpad = _pad_to(d, z.shape[0])
    z_new = group_shrink(dpad + gamma / rho, mu / rho)
    return z_new, gamma + rho * (dpad - z_new)


def _textbook_update(d, z, gamma, mu, rho):
    if d.shape != z.shape:
        _textbook_penalty(d, z, gamma, mu, rho)  # raises the explanatory error
    z_new = soft_threshold(d + gamma / rho, mu / rho)
    return z_new, gamma + rho * (d - z_new)


_PENALTY = {"paper": _paper_penalty, "textbook": _textbook_penalty}
_UPDATE = {"paper": _paper_update, "textbook": _textbook_update}


@partial(jax.jit, static_argnames=("mode", "mu", "rho"))
def _update_tree(gaps, state, *, mode, mu, rho):
    leaves, treedef = jax.tree_util.tree_flatten(gaps)
    z_leaves = treedef.flatten_up_to(state.z)
    g_leaves = treedef.flatten_up_to(state.gamma)
    new = []
    for d, z, g in zip(leaves, z_leaves, g_leaves):
        dtype = _state_dtype(jnp.result_type(d, z, g))
        new.append(_UPDATE[mode](d.astype(dtype), z.astype(dtype), g.astype(dtype), mu, rho))
    return ADMMState(
        z=jax.tree_util.tree_unflatten(treedef, [zn for zn, _ in new]),
        gamma=jax.tree_util.tree_unflatten(treedef, [gn for _, gn in new]),
    )


@dataclasses.dataclass(frozen=True)
class ADMM:
    """ADMM correlation-preservation solver (see the module docstring for the two modes).

    Attributes:
      mode: "textbook" (default) or "paper" (official code, docs/method.md §5.1-5.3).
      mu: sparsity weight of ||Z||_1 (official: 0.2).
      rho: augmented-Lagrangian penalty (official: 0.3).
    """

    mode: str = "textbook"
    mu: float = 0.2
    rho: float = 0.3

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"ADMM mode must be one of {MODES}; got {self.mode!r}")
        for name in ("mu", "rho"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ADMM {name} must be a positive number; got {value!r}")
            object.__setattr__(self, name, float(value))

    def init(self, gaps, *, key=None, dim=None) -> ADMMState:
        """Initial state for a pytree of B x B gaps (only their shapes are used).

        textbook: Z = Gamma = 0 with the gaps' shapes. paper: U[0,1) matrices of size dim x dim (dim = the
        training batch size), an independent draw for every leaf and for Z and Gamma; needs ``key`` and ``dim``.
        The state is float32 (float64 for float64 gaps) whatever the gaps' dtype.
        """
        leaves, treedef = jax.tree_util.tree_flatten(gaps)
        for d in leaves:
            _check_square(d)
        if self.mode == "textbook":
            def zeros():  # separate buffers for Z and Gamma (a train step may donate both)
                return jax.tree_util.tree_unflatten(
                    treedef, [jnp.zeros(d.shape, _state_dtype(jnp.result_type(d))) for d in leaves]
                )

            return ADMMState(zeros(), zeros())
        if key is None or dim is None:
            raise ValueError("paper-mode ADMM.init needs key (a PRNG key) and dim (the training batch size)")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int (the training batch size); got {dim!r}")
        for d in leaves:
            if d.shape[0] > dim:
                raise ValueError(f"gap of size {d.shape[0]} exceeds dim={dim}")
        keys = jax.random.split(key, 2 * max(len(leaves), 1))
        z = [jax.random.uniform(keys[2 * i], (dim, dim)) for i in range(len(leaves))]
        g = [jax.random.uniform(keys[2 * i + 1], (dim, dim)) for i in range(len(leaves))]
        return ADMMState(jax.tree_util.tree_unflatten(treedef, z), jax.tree_util.tree_unflatten(treedef, g))

    def penalty(self, gaps, state: ADMMState):
        """Scalar sum over layers of the per-layer ADMM loss; differentiable in the gaps, Z and Gamma constant."""
        leaves, treedef = jax.tree_util.tree_flatten(gaps)
        z_leaves = treedef.flatten_up_to(jax.lax.stop_gradient(state.z))
        g_leaves = treedef.flatten_up_to(jax.lax.stop_gradient(state.gamma))
        fn = _PENALTY[self.mode]
        terms = [
            fn(d.astype(_state_dtype(d.dtype)), z, g, self.mu, self.rho) for d, z, g in zip(leaves, z_leaves, g_leaves)
        ]
        return sum(terms, jnp.zeros((), jnp.float32))

    def update(self, gaps, state: ADMMState) -> ADMMState:
        """One Z (proximal) and Gamma (dual ascent) step for every layer, as a single jitted call."""
        gaps = jax.lax.stop_gradient(gaps)
        return _update_tree(gaps, state, mode=self.mode, mu=self.mu, rho=self.rho)
