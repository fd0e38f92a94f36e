"""Training configuration, the TrainState pytree, optimizer and ADMM construction (docs/method.md §6 and §8)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from alignq_jax.admm import ADMM, MODES as ADMM_MODES
from alignq_jax.models import MODELS
from alignq_jax.quantize import CORRELATION_RNG, QuantConfig, QuantRules, calibrate, gap_shapes
from alignq_jax.training.objectives import CLASSIFICATION

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
      model: a key of ``alignq_jax.models.MODELS`` ("resnet20", "resnet56", "small_cnn", "small_resnet").
      quant: a QuantConfig (bits, method, levels, ...) or QuantRules (per-layer configs). ``admm=True`` switches
        correlation recording on in every config that leaves it open (``correlation=None``) and quantizes
        BatchNorm outputs; ``correlation=False`` in a rule keeps the term off that layer.
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
      bn_reestimate_batches: after the last epoch, re-estimate the BatchNorm (and quantizer) running statistics
        with the final weights over this many training batches (at most one epoch's; 0 = off) and report the test
        accuracy with them as the headline, next to the one with the training-time statistics
        (``alignq_jax.training.reestimate_batch_stats``).
      bn_reestimate_every_epoch: re-estimate after every epoch too, so the history (and the best epoch) are
        measured with re-estimated statistics (needs ``bn_reestimate_batches`` > 0).
      objective: what the step minimises and the network around the backbone ``model``
        (``alignq_jax.training.objectives.Classification``, or a domain-adaptation objective of
        ``alignq_jax.adaptation``); it also fixes the batch layout the data set must yield.
      lr_multipliers: parameter groups: ((regex, multiplier), ...) on "/"-joined parameter paths (``re.search``),
        first match wins; a matched parameter trains with multiplier * the learning rate (weight decay and momentum
        as everyone's), e.g. (("^backbone/", 0.1),) for a pretrained backbone at a tenth of the heads' rate. A
        rule that matches no parameter is an error.
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
    bn_reestimate_batches: int = 50
    bn_reestimate_every_epoch: bool = False
    objective: Any = CLASSIFICATION
    lr_multipliers: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {tuple(MODELS)}; got {self.model!r}")
        if not isinstance(self.quant, (QuantConfig, QuantRules)):
            raise ValueError(f"quant must be a QuantConfig or QuantRules; got {type(self.quant).__name__}")
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
        n = self.bn_reestimate_batches
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"bn_reestimate_batches must be an int >= 0 (0 = off); got {n!r}")
        if not isinstance(self.bn_reestimate_every_epoch, bool):
            raise ValueError(f"bn_reestimate_every_epoch must be True or False; got {self.bn_reestimate_every_epoch!r}")
        if self.bn_reestimate_every_epoch and n == 0:
            raise ValueError("bn_reestimate_every_epoch=True needs bn_reestimate_batches > 0 (the batches to "
                             "re-estimate from)")
        if self.admm and not any(c.quantizes_bn_output for c in self.quant.configs()):
            raise ValueError(
                "admm=True needs activations quantized after BatchNorm (a_bits < 32 with alignq or uniform): the "
                "term compares them"
            )
        for attr in ("network", "loss", "schedule", "gap_tree", "images", "statistics_batches", "describe"):
            if not callable(getattr(self.objective, attr, None)):
                raise ValueError(
                    f"objective must be a training objective (alignq_jax.training.objectives); "
                    f"{type(self.objective).__name__} has no {attr}()"
                )
        object.__setattr__(self, "lr_multipliers", _check_lr_multipliers(self.lr_multipliers))
        object.__setattr__(self, "quant", self.quant.map(self._with_correlation))

    def _with_correlation(self, config: QuantConfig) -> QuantConfig:
        if self.admm and config.correlation is None and config.quantizes_bn_output:
            return dataclasses.replace(config, correlation=True)
        if not self.admm and config.correlation:
            return dataclasses.replace(config, correlation=False)  # gaps nobody uses only cost time
        return config

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


def _check_lr_multipliers(rules) -> tuple[tuple[str, float], ...]:
    checked = []
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise ValueError(f"lr_multipliers entries must be (regex, multiplier) pairs; got {rule!r}")
        pattern, multiplier = rule
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"lr_multipliers regex {pattern!r} does not compile: {e}") from None
        if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not multiplier >= 0:
            raise ValueError(f"lr_multipliers multiplier for {pattern!r} must be a number >= 0; got {multiplier!r}")
        checked.append((str(pattern), float(multiplier)))
    return tuple(checked)


def parameter_groups(config: TrainConfig, params) -> Any:
    """The group label of every parameter ("default", or "group{i}" for the i-th rule of
    ``config.lr_multipliers`` that matches its "/"-joined path first). Raises ValueError for a rule that gets no
    parameter (a misspelt path would otherwise silently train everything at one rate)."""
    used = set()

    def label(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        for i, (pattern, _) in enumerate(config.lr_multipliers):
            if re.search(pattern, name):
                used.add(i)
                return f"group{i}"
        return "default"

    labels = jax.tree_util.tree_map_with_path(label, params)
    unused = [config.lr_multipliers[i][0] for i in range(len(config.lr_multipliers)) if i not in used]
    if unused:
        names = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
        raise ValueError(
            f"lr_multipliers rules {unused} get no parameter (they match none, or only parameters an earlier rule "
            f"took); parameter paths look like {names[:4]}"
        )
    return labels


def _sgd(config: TrainConfig, steps_per_epoch: int, multiplier: float = 1.0) -> optax.GradientTransformation:
    schedule = lr_schedule(config, steps_per_epoch)
    if multiplier != 1.0:
        schedule = lambda step, base=schedule: multiplier * base(step)  # noqa: E731
    sgd = optax.sgd(schedule, momentum=config.momentum or None)
    if config.weight_decay:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), sgd)
    return sgd


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """PyTorch SGD: buf = momentum*buf + (g + wd*w); w -= lr*buf (plain momentum SGD; docs/method.md, quirk 5).

    With ``config.lr_multipliers``, one such SGD per parameter group (``optax.multi_transform``), each at its
    multiple of the learning rate schedule.
    """
    if not config.lr_multipliers:
        return _sgd(config, steps_per_epoch)
    transforms = {"default": _sgd(config, steps_per_epoch)}
    for i, (_, multiplier) in enumerate(config.lr_multipliers):
        transforms[f"group{i}"] = _sgd(config, steps_per_epoch, multiplier)
    return optax.multi_transform(transforms, lambda params: parameter_groups(config, params))


def make_model(config: TrainConfig, num_classes: int, *, axis_name: str | None = None):
    """The network the objective builds around ``config.model``; ``axis_name`` set inside data-parallel steps (BN
    statistics, global correlation)."""
    fields = {
        "config": config.quant,
        "bn_axis_name": axis_name,
        "correlation_axis_name": axis_name if config.global_correlation else None,
        "dtype": DTYPES[config.dtype],
    }
    return config.objective.network(config.model, num_classes, fields)


def create_train_state(
    config: TrainConfig,
    image_shape: tuple[int, int, int],
    num_classes: int,
    steps_per_epoch: int,
    *,
    gap_batch: int,
    init_variables: dict | None = None,
    init_images=None,
) -> TrainState:
    """Fresh state (no device axis). ``gap_batch`` = batch size the correlation gaps have (per device or global).

    ``init_images``: a real training batch (N, H, W, C), N >= 1: methods with learned quantizer parameters or
    statistics (LSQ steps, PACT clips, absmax ranges) initialise them from the tensors of this batch. None: a batch
    of zeros, which only methods without such state accept.
    ``init_variables``: {"params", "batch_stats"} to start from (e.g. the FP32 run before quantization-aware
    training); names must match, which they do between bit-widths of the same model. Quantizer parameters and
    statistics that ``init_variables`` lack (a full-precision run has none) are initialised from its kernels and
    from ``init_images`` passed through it in training mode, BatchNorm using the batch's statistics as every
    training step will (``alignq_jax.quantize.calibrate``); the loaded BatchNorm statistics are kept.
    """
    key = jax.random.key(config.seed)
    init_key, admm_key, rng = jax.random.split(key, 3)
    model = make_model(config, num_classes)
    dummy = jnp.zeros((gap_batch, *image_shape), jnp.float32)
    if init_images is None:
        _check_no_quantizer_state(config.quant)
        images = dummy
    else:
        images = jnp.asarray(init_images, jnp.float32)
        if images.ndim != 4 or images.shape[1:] != tuple(image_shape) or images.shape[0] < 1:
            raise ValueError(f"init_images must be (N, {', '.join(map(str, image_shape))}); got {images.shape}")
    variables = jax.jit(lambda k, x: model.init({"params": k, CORRELATION_RNG: k}, x, train=True))(init_key, images)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    if init_variables is not None:
        params, batch_stats = _restore_and_calibrate(
            model, params, batch_stats, init_variables, images, init_key
        )
    tx = make_optimizer(config, steps_per_epoch)
    admm_state = None
    if config.admm:
        # init records no gaps; shapes only. The objective lays out one step's gaps (e.g. one tree per domain).
        gaps = config.objective.gap_tree(gap_shapes(model, variables, dummy, train=True))
        admm_state = config.make_admm().init(gaps, key=admm_key, dim=gap_batch)
    return TrainState(
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        admm_state=admm_state,
        step=jnp.zeros((), jnp.int32),
        rng=rng,
    )


def _has_quantizer_state(quant) -> bool:
    return any(
        c.quantizer.weight_params or c.quantizer.activation_params or c.quantizer.activation_stats
        for c in quant.configs()
        if c.w_bits < 32 or c.a_bits < 32
    )


def _check_no_quantizer_state(quant) -> None:
    if _has_quantizer_state(quant):
        names = sorted({c.method_name for c in quant.configs()})
        raise ValueError(f"{', '.join(names)} initialise quantizer parameters from data: pass init_images")


def _restore_and_calibrate(model, params, batch_stats, init_variables, images, key):
    """``init_variables`` restored onto the model's variables; quantizer state they lack (only that may be
    missing) is initialised from them on ``images`` (evaluation mode)."""
    loaded_params = init_variables["params"]
    loaded_stats = init_variables.get("batch_stats", {})
    if _structure(params) == _structure(loaded_params) and _structure(batch_stats) == _structure(loaded_stats):
        return _restore_like(params, loaded_params, "params"), _restore_like(batch_stats, loaded_stats, "batch_stats")
    restored = {
        "params": _restore_subset(params, loaded_params, "params"),
        "batch_stats": _restore_subset(batch_stats, loaded_stats, "batch_stats"),
    }
    # Training mode: the quantizers are fitted to the activations the training steps will see. With the stored FP32
    # statistics, methods whose quantized weights change a conv's output scale (DoReFa/PACT, APoT) would blow the
    # activations up layer by layer, and data-driven clips would start hundreds of times too wide.
    full = jax.jit(lambda v, x: calibrate(model, v, x, rng=key, train=True))(restored, images)
    return full["params"], full.get("batch_stats", {})


def _structure(tree):
    return jax.tree.structure(jax.tree.map(lambda x: 0, tree))


def _quantizer_key(key: str) -> bool:
    return key.startswith(("ConvQuantizer_", "DotQuantizer_")) or key == "activation"


def _only_quantizer_state(key: str, value) -> bool:
    """Whether the entry ``key`` of a variables tree holds nothing but quantizer state."""
    if _quantizer_key(key):
        return True
    return isinstance(value, dict) and bool(value) and all(_only_quantizer_state(k, v) for k, v in value.items())


def _restore_subset(template: dict, loaded: dict, what: str, path: str = "") -> dict:
    """``loaded`` checked against ``template``: every entry of ``loaded`` must exist there with its shape, and
    entries missing from ``loaded`` must be quantizer state (they are then left out, to be calibrated)."""
    out = {}
    for key, value in template.items():
        where = f"{path}/{key}" if path else key
        if key not in loaded:
            if not _only_quantizer_state(key, value):
                raise ValueError(f"init checkpoint {what} lack {where!r}: was it trained with another model?")
            continue
        if isinstance(value, dict):
            if not isinstance(loaded[key], dict):
                raise ValueError(f"init checkpoint {what} {where!r} is an array where the model has a subtree")
            out[key] = _restore_subset(value, loaded[key], what, where)
        else:
            out[key] = _restore_like(value, loaded[key], what)
    extra = sorted(set(loaded) - set(template))
    if extra:
        raise ValueError(f"init checkpoint {what} have {extra} under {path or 'the root'!r}, which the model lacks")
    return out


def _restore_like(template, loaded, what):
    if jax.tree.structure(template) != jax.tree.structure(loaded):
        raise ValueError(f"init checkpoint {what} do not match the model's: was it trained with another model?")

    def check(t, l):
        if t.shape != l.shape:
            raise ValueError(f"init checkpoint {what} shape {l.shape} does not match the model's {t.shape}")
        return jnp.asarray(l, t.dtype)

    return jax.tree.map(check, template, loaded)
