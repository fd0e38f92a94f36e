"""Training configuration, the TrainState pytree, optimizer and ADMM construction (docs/method.md §6 and §8)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from alignq_jax.admm import ADMM, MODES as ADMM_MODES
from alignq_jax.models import MODELS, get_model
from alignq_jax.quantize import CORRELATION_RNG, QuantConfig, gap_shapes

PARALLEL_MODES = ("auto", "none", "shard_map", "pmap")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DATA_AXIS = "data"


def _positive(name, value, kind=(int, float)):
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        raise ValueError(f"{name} must be a positive number; got {value!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; the defaults are the official ResNet-20 CIFAR-10 recipe (docs/method.md §8).

    Attributes:
      model: "resnet20", "resnet56" or "small_cnn".
      quant: the QuantConfig (bits, method, levels, ...). ``admm=True`` switches its correlation recording on.
      epochs, batch_size, eval_batch_size: loop sizes (global batch over all devices).
      lr, momentum, weight_decay, milestones, lr_decay: SGD with PyTorch-style L2 decay added to the gradient
        and a MultiStep schedule (milestones in epochs).
      admm, admm_mode, admm_mu, admm_rho, admm_weight: correlation preservation (docs/method.md §5); the loss
        is CE + admm_weight * penalty.
      seed: parameters, ADMM init and data order.
      parallel: "auto" (shard_map over all devices if more than one, else a plain jit), "none", "shard_map",
        "pmap". num_devices: how many of ``jax.devices()`` to use (None: all).
      global_correlation: all-gather the batch over devices for the correlation term (one global ADMM state)
        instead of per-device correlations and per-device ADMM states.
      dtype: "float32" or "bfloat16" compute.
    """

    model: str = "resnet20"
    quant: QuantConfig = QuantConfig()
    epochs: int = 200
    batch_size: int = 128
    eval_batch_size: int = 100
    lr: float = 0.04
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[int, ...] = (80, 150)
    lr_decay: float = 0.1
    admm: bool = False
    admm_mode: str = "textbook"
    admm_mu: float = 0.2
    admm_rho: float = 0.3
    admm_weight: float = 1.0
    seed: int = 0
    parallel: str = "auto"
    num_devices: int | None = None
    global_correlation: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {tuple(MODELS)}; got {self.model!r}")
        if not isinstance(self.quant, QuantConfig):
            raise ValueError(f"quant must be a QuantConfig; got {type(self.quant).__name__}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            _positive(name, getattr(self, name), int)
        _positive("lr", self.lr)
        _positive("lr_decay", self.lr_decay)
        _positive("admm_weight", self.admm_weight)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {self.momentum!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0; got {self.weight_decay!r}")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if list(self.milestones) != sorted(self.milestones) or any(m < 0 for m in self.milestones):
            raise ValueError(f"milestones must be increasing non-negative epochs; got {self.milestones!r}")
        if self.admm_mode not in ADMM_MODES:
            raise ValueError(f"admm_mode must be one of {ADMM_MODES}; got {self.admm_mode!r}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {PARALLEL_MODES}; got {self.parallel!r}")
        if self.num_devices is not None:
            _positive("num_devices", self.num_devices, int)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}; got {self.dtype!r}")
        if self.admm and self.quant.a_bits == 32:
            raise ValueError("admm=True needs quantized activations (quant.a_bits < 32): the term compares them")
        if self.admm and not self.quant.correlation:
            object.__setattr__(self, "quant", dataclasses.replace(self.quant, correlation=True))
        if not self.admm and self.quant.correlation:
            # Recording gaps nobody uses only costs time.
            object.__setattr__(self, "quant", dataclasses.replace(self.quant, correlation=False))

    def make_admm(self) -> ADMM:
        return ADMM(mode=self.admm_mode, mu=self.admm_mu, rho=self.admm_rho)


@flax.struct.dataclass
class TrainState:
    """All state of a run as one pytree (checkpointed as is)."""

    params: Any
    batch_stats: Any
    opt_state: Any
    admm_state: Any  # ADMMState, or None without ADMM
    step: jax.Array
    rng: jax.Array


def lr_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """MultiStepLR: lr * lr_decay^k after the k-th milestone epoch."""
    boundaries = {int(m * steps_per_epoch): config.lr_decay for m in config.milestones if m > 0}
    return optax.piecewise_constant_schedule(config.lr, boundaries)


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """PyTorch SGD: buf = momentum*buf + (g + wd*w); w -= lr*buf (plain momentum SGD; docs/method.md, quirk 5)."""
    sgd = optax.sgd(lr_schedule(config, steps_per_epoch), momentum=config.momentum or None)
    if config.weight_decay:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), sgd)
    return sgd


def make_model(config: TrainConfig, num_classes: int, *, axis_name: str | None = None):
    """The network; ``axis_name`` set inside data-parallel steps (BN statistics, global correlation)."""
    return get_model(
        config.model,
        config=config.quant,
        num_classes=num_classes,
        bn_axis_name=axis_name,
        correlation_axis_name=axis_name if config.global_correlation else None,
        dtype=DTYPES[config.dtype],
    )


def create_train_state(
    config: TrainConfig,
    image_shape: tuple[int, int, int],
    num_classes: int,
    steps_per_epoch: int,
    *,
    gap_batch: int,
    init_variables: dict | None = None,
) -> TrainState:
    """Fresh state (no device axis). ``gap_batch`` = batch size the correlation gaps have (per device or global).

    ``init_variables``: {"params", "batch_stats"} to start from (e.g. the FP32 run before quantization-aware
    training); names must match, which they do between bit-widths of the same model.
    """
    key = jax.random.key(config.seed)
    init_key, admm_key, rng = jax.random.split(key, 3)
    model = make_model(config, num_classes)
    dummy = jnp.zeros((gap_batch, *image_shape), jnp.float32)
    variables = jax.jit(lambda k: model.init({"params": k, CORRELATION_RNG: k}, dummy, train=True))(init_key)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    if init_variables is not None:
        params = _restore_like(params, init_variables["params"], "params")
        batch_stats = _restore_like(batch_stats, init_variables.get("batch_stats", {}), "batch_stats")
    tx = make_optimizer(config, steps_per_epoch)
    admm_state = None
    if config.admm:
        gaps = gap_shapes(model, variables, dummy, train=True)  # init records no gaps; shapes only
        admm_state = config.make_admm().init(gaps, key=admm_key, dim=gap_batch)
    return TrainState(
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        admm_state=admm_state,
        step=jnp.zeros((), jnp.int32),
        rng=rng,
    )


def _restore_like(template, loaded, what):
    if jax.tree.structure(template) != jax.tree.structure(loaded):
        raise ValueError(f"init checkpoint {what} do not match the model's: was it trained with another model?")

    def check(t, l):
        if t.shape != l.shape:
            raise ValueError(f"init checkpoint {what} shape {l.shape} does not match the model's {t.shape}")
        return jnp.asarray(l, t.dtype)

    return jax.tree.map(check, template, loaded)
