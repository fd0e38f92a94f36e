"""Flax integration: ``QuantConfig``, per-layer ``QuantRules``, and quantized layers for Linen (primary) and NNX.

Import as ``from alignq_jax import quantize``. The modules hold no math: they call the pure functions of a
quantization method (``alignq_jax.methods``) and of ``alignq_jax.correlation`` (see docs/design.md).

Configuration
  * :class:`QuantConfig`: bits, method (a name or a method object), AlignQ's options and the correlation term.
  * :class:`QuantRules`: per-layer configs by regular expressions on module paths (first match wins); every layer
    takes a ``QuantConfig`` or a ``QuantRules`` as its ``config`` and resolves its own config from its path.
    :func:`layer_report` lists which config each quantized layer got and which rules matched nothing.

Linen
  * :class:`QuantConv`, :class:`QuantDense`: ``nn.Conv`` / ``nn.Dense`` whose conv/dot op is a quantizer module
    (:class:`ConvQuantizer` / :class:`DotQuantizer`, plugged into Flax's ``conv_general_dilated_cls`` /
    ``dot_general_cls``). It sees the kernel and the layer input: it quantizes the kernel, and for methods placed on
    conv inputs (LSQ, PACT, ...) the input, and owns the method's learned parameters and running statistics.
  * :class:`QuantBatchNorm`: BatchNorm, then (for methods placed there: AlignQ, uniform) the activation quantizer,
    then the ReLU, fused. :class:`QuantActivation`: the activation quantizer alone.
  * Correlation gaps: with ``config.correlation`` on and the collection ``GAP_COLLECTION`` mutable, the
    activation quantizers record their B x B gaps there (a tuple per layer, one gap per call); :func:`gap_shapes`
    gives their shapes for ``ADMM.init``.
  * :func:`calibrate`: create the learned parameters and statistics of a quantized model from trained
    full-precision variables and a real batch. :func:`intercept_convs` / :func:`quantized_apply`: quantize the
    convs of an existing Linen model without editing its source.

NNX
  * :class:`NNXQuantConv`, :class:`NNXQuantLinear`, :class:`NNXQuantActivation` with identical numerics; the gap
    is stored in a :class:`CorrelationGap` variable (``nnx.state(model, CorrelationGap)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import promote_dtype as linen_promote_dtype
from flax.nnx.nn.dtypes import promote_dtype as nnx_promote_dtype

from alignq_jax import correlation as _correlation
from alignq_jax import quantizers as _q
from alignq_jax.methods import BN_OUTPUT, CONV_INPUT, METHODS, BNOutputMethod, QuantMethod, get_method

GAP_COLLECTION = "correlation_gaps"
BN_MOMENTS_COLLECTION = "bn_moments"  # train-mode (mean, biased var) of every BatchNorm input, when mutable
LAYERS_COLLECTION = "quantized_layers"  # a marker per quantization-aware layer, for layer_report
CORRELATION_RNG = "correlation"  # RNG stream for the sampled-feature estimate of the gap
CORRELATION_TARGETS = ("aligned", "quantized")
_ALIGNQ_OPTIONS = ("levels", "act_range", "stop_stats_grad", "surrogate")  # QuantConfig fields of BN-output methods


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how; validated at construction. bits=32 means full precision.

    Attributes:
      w_bits: weight bits of quantized convs/dense layers, 1..8 or 32.
      a_bits: activation bits, 1..8 or 32.
      method: a method name from ``alignq_jax.methods.METHODS`` ("alignq", "uniform", "absmax", "lsq", "pact",
        "dorefa", "apot") or a method object with its own options (e.g. ``AbsMax(per_channel=True)``). Where the
        activation quantizer sits is the method's ``placement``: after BatchNorm before the ReLU (alignq, uniform)
        or on the input of every conv that follows a ReLU (the others).
      levels, act_range, stop_stats_grad, surrogate: the options of alignq and uniform (docs/method.md §1-3):
        "exact" (k bits = at most 2^k levels, default) or "paper" levels; A of the activation grid (-A, A), official
        2.0; weight mean/std as constants in the gradient; None or (lam, lam2) for the soft-step weight gradient.
        A method object of those two classes is normalised to its name plus these fields.
      correlation: record the correlation gap of every quantized activation (for the ADMM term): True, False, or
        None (default: whatever the training run decides, i.e. on with ADMM). Only methods placed after
        BatchNorm define the term.
      correlation_target: "aligned" compares x with the unrounded aligned output (official code) or
        "quantized" with the rounded output (the paper's Theorem 3.2 is about X vs Q(X)).
      correlation_eps: stabiliser of the per-feature batch std.
      correlation_features: None (exact gap) or K: estimate each gap from at least K random feature columns per
        step: every channel, each at its own random grid of positions (an unbiased estimate of the gap, not of the
        ADMM penalty; the Flax layer then needs the RNG stream "correlation").
    """

    w_bits: int = 32
    a_bits: int = 32
    method: str | QuantMethod = "alignq"
    levels: str = "exact"
    act_range: float = 2.0
    correlation: bool | None = None
    correlation_target: str = "aligned"
    correlation_eps: float = 1e-5
    correlation_features: int | None = None
    stop_stats_grad: bool = False
    surrogate: tuple[float, float] | None = None

    def __post_init__(self):
        _q.check_bits(self.w_bits)
        _q.check_bits(self.a_bits)
        method = self.method
        if isinstance(method, BNOutputMethod):
            self._absorb_options(method)
            method = method.name
            object.__setattr__(self, "method", method)
        if isinstance(method, str):
            if method not in METHODS:
                raise ValueError(f"method must be one of {tuple(METHODS)} or a QuantMethod; got {method!r}")
        elif not isinstance(method, QuantMethod):
            raise ValueError(f"method must be a name or a QuantMethod; got {type(method).__name__}")
        _q.check_levels(self.levels)
        object.__setattr__(self, "act_range", _q.check_act_range(self.act_range))
        if self.surrogate is not None:
            object.__setattr__(self, "surrogate", _q._check_surrogate(self.surrogate))
        quantizer = self._build()
        object.__setattr__(self, "_quantizer", quantizer)
        if not isinstance(quantizer, BNOutputMethod):
            defaults = {f.name: f.default for f in dataclasses.fields(QuantConfig)}
            given = [name for name in _ALIGNQ_OPTIONS if getattr(self, name) != defaults[name]]
            if given:
                raise ValueError(
                    f"{', '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of alignq and uniform; "
                    f"{quantizer.name} has its own options (fields of its method object)"
                )
        for bits in (self.w_bits, self.a_bits):
            if bits < 32:
                quantizer.check_bits(bits)
        if self.correlation not in (None, True, False):
            raise ValueError(f"correlation must be True, False or None; got {self.correlation!r}")
        if self.correlation and quantizer.placement != BN_OUTPUT:
            raise ValueError(
                f"the correlation term is defined for methods quantizing the BatchNorm output (alignq, uniform); "
                f"{self.method_name} quantizes conv inputs"
            )
        if self.correlation_target not in CORRELATION_TARGETS:
            raise ValueError(f"correlation_target must be one of {CORRELATION_TARGETS}; got {self.correlation_target!r}")
        if not self.correlation_eps > 0:
            raise ValueError(f"correlation_eps must be positive; got {self.correlation_eps!r}")
        cf = self.correlation_features
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, int) or cf < 2):
            raise ValueError(f"correlation_features must be None or an int >= 2; got {cf!r}")

    def _absorb_options(self, method: BNOutputMethod) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(QuantConfig)}
        for name in _ALIGNQ_OPTIONS:
            given, own = getattr(self, name), getattr(method, name)
            if given != defaults[name] and given != own:
                raise ValueError(f"QuantConfig.{name}={given!r} contradicts the method's {name}={own!r}")
            object.__setattr__(self, name, own)

    def _build(self) -> QuantMethod:
        if not isinstance(self.method, str):
            return self.method
        if issubclass(METHODS[self.method], BNOutputMethod):
            return get_method(self.method, **{name: getattr(self, name) for name in _ALIGNQ_OPTIONS})
        return get_method(self.method)

    # What the layers ask ------------------------------------------------------------------------------------
    @property
    def quantizer(self) -> QuantMethod:
        """The method object (its options and pure functions)."""
        return self._quantizer

    @property
    def method_name(self) -> str:
        return self._quantizer.name

    @property
    def placement(self) -> str:
        return self._quantizer.placement

    @property
    def quantizes_bn_output(self) -> bool:
        return self.a_bits < 32 and self.placement == BN_OUTPUT

    @property
    def quantizes_conv_input(self) -> bool:
        return self.a_bits < 32 and self.placement == CONV_INPUT

    @property
    def records_correlation(self) -> bool:
        return bool(self.correlation) and self.quantizes_bn_output

    # The config and rules interface (a single config is the rules with one default) ----------------------------
    def resolve(self, path: str) -> "QuantConfig":
        """The config of the layer at ``path``: this one."""
        return self

    def configs(self) -> tuple["QuantConfig", ...]:
        return (self,)

    def map(self, fn: Callable[["QuantConfig"], "QuantConfig"]) -> "QuantConfig":
        return fn(self)

    # The pure calls of the layers (BN-output methods: alignq, uniform) ----------------------------------------
    def quantize_weight(self, w, params=None):
        """Quantized kernel (any shape; output channel last) with the method's learned ``params`` (if any)."""
        return self._quantizer.quantize_weight(params or {}, w, self.w_bits)

    def quantize_activation(self, x, relu=False):
        """Quantized activations of a BN-output method; ``relu`` fuses the ReLU that follows."""
        return self._bn_method().quantize_activation({}, x, self.a_bits, relu=relu)

    def quantize_activation_affine(self, h, scale, shift, relu=False):
        """``quantize_activation(h * scale + shift)`` with the per-channel affine folded in (less memory)."""
        return self._bn_method().quantize_activation_affine(h, scale, shift, self.a_bits, relu=relu)

    def _bn_method(self) -> BNOutputMethod:
        if not isinstance(self._quantizer, BNOutputMethod):
            raise ValueError(f"{self.method_name} quantizes conv inputs, not the BatchNorm output")
        return self._quantizer

    def correlation_gap(self, x, key=None, axis_name=None):
        """B x B gap between the quantizer input x (B, ...) and its aligned (or rounded, pre-ReLU) output.

        With ``correlation_features`` the feature columns are sampled first (every channel, each at its own random
        grid of positions, see ``alignq_jax.correlation.draw_feature_sample``; ``key``: a fresh PRNG key per
        step, the same on every device when ``axis_name`` is set), so only the sampled columns are transformed and
        kept for the backward. The sampled gap is an unbiased estimate of the exact gap; the ADMM penalty of it is
        not an unbiased estimate of the penalty of the exact gap (it is nonlinear in the gap). ``axis_name``:
        all-gather the (sampled) batch over this device axis first, for the global correlation. The target and the
        (B, B) gap are computed in float32 whatever x's dtype.
        """
        if self._samples(x, key):
            (x,) = _correlation.sample_features((x,), key, self.correlation_features)
        return self._gap_of(x, axis_name)

    def correlation_gap_affine(self, h, scale, shift, key=None, axis_name=None):
        """``correlation_gap(h * scale + shift)`` for per-channel (C,) scale/shift (BatchNorm folded in); with
        sampling, only the sampled columns of h are normalised."""
        dtype = _correlation.gap_dtype(h.dtype)
        scale, shift = scale.astype(dtype), shift.astype(dtype)
        if not self._samples(h, key):
            return self._gap_of(h.astype(dtype) * scale + shift, axis_name)
        offsets, strides = _correlation.draw_feature_sample(h.shape[1:], key, self.correlation_features)
        hs = _correlation.take_features(h, offsets, strides).astype(dtype)  # (B, ..., C') with C' kept channels
        scale = _correlation.take_channels(scale, offsets[1], strides[-1])
        shift = _correlation.take_channels(shift, offsets[1], strides[-1])
        return self._gap_of(hs * scale + shift, axis_name)

    def _samples(self, x, key) -> bool:
        if self.correlation_features is None:
            return False
        if key is None:
            raise ValueError("correlation_features needs a PRNG key (the 'correlation' RNG stream)")
        return self.correlation_features < x[0].size

    def _gap_of(self, x, axis_name):
        # The target and the gap in float32 whatever the compute dtype (a bf16 target would change the term).
        x = x.astype(_correlation.gap_dtype(x.dtype))
        if self.correlation_target == "quantized":
            target = self.quantize_activation(x)
        else:
            target = self._bn_method().align_activation(x)
        if axis_name is not None:
            x = jax.lax.all_gather(x, axis_name, tiled=True)
            target = jax.lax.all_gather(target, axis_name, tiled=True)
        return _correlation.correlation_gap(x, target, self.correlation_eps)


@dataclasses.dataclass(frozen=True)
class QuantRules:
    """Per-layer configs: ``rules`` is a sequence of (regex, QuantConfig); a layer takes the config of the first
    rule whose regex is found (``re.search``) in its module path ("stage0_block0/conv0"), else ``default``.

    Example: keep the stem conv at 8 bits and the rest at 4::

        QuantRules([("stem_conv|stem_bn", QuantConfig(8, 8)), ], default=QuantConfig(4, 4))

    :func:`layer_report` says which layer got which config and which rules matched no layer.
    """

    rules: tuple[tuple[str, QuantConfig], ...] = ()
    default: QuantConfig = QuantConfig()

    def __post_init__(self):
        rules = []
        for rule in self.rules:
            if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
                raise ValueError(f"each rule must be a (regex, QuantConfig) pair; got {rule!r}")
            pattern, config = rule
            if not isinstance(pattern, str):
                raise ValueError(f"a rule's pattern must be a string; got {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"rule pattern {pattern!r} is not a regular expression: {e}") from None
            if not isinstance(config, QuantConfig):
                raise ValueError(f"rule {pattern!r}: config must be a QuantConfig; got {type(config).__name__}")
            rules.append((pattern, config))
        if not isinstance(self.default, QuantConfig):
            raise ValueError(f"default must be a QuantConfig; got {type(self.default).__name__}")
        object.__setattr__(self, "rules", tuple(rules))

    def match(self, path: str) -> int | None:
        """Index of the first rule matching ``path``, None for the default."""
        for i, (pattern, _) in enumerate(self.rules):
            if re.search(pattern, path):
                return i
        return None

    def resolve(self, path: str) -> QuantConfig:
        i = self.match(path)
        return self.default if i is None else self.rules[i][1]

    def configs(self) -> tuple[QuantConfig, ...]:
        return (*(c for _, c in self.rules), self.default)

    def map(self, fn: Callable[[QuantConfig], QuantConfig]) -> "QuantRules":
        """The same rules with every config replaced by ``fn(config)``."""
        return QuantRules(tuple((p, fn(c)) for p, c in self.rules), fn(self.default))


def _check_config(config) -> None:
    if not isinstance(config, (QuantConfig, QuantRules)):
        raise ValueError(f"config must be a QuantConfig or QuantRules; got {type(config).__name__}")


def module_path(module: nn.Module) -> str:
    """A Linen module's path as the rules see it: names joined by "/" ("stage0_block0/conv0")."""
    return "/".join(str(p) for p in module.path)


def _mark_layer(module: nn.Module) -> None:
    if module.is_mutable_collection(LAYERS_COLLECTION) and not module.is_initializing():
        module.sow(LAYERS_COLLECTION, "layer", jnp.zeros((), jnp.int8))


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """What :func:`layer_report` returns: each quantization-aware layer's path and config, and the patterns of
    rules that matched no layer (a typo, or a layer that is not quantization-aware, such as a plain nn.Dense)."""

    layers: dict[str, QuantConfig]
    unmatched: tuple[str, ...]


def layer_report(model: nn.Module, variables, *args, rngs=None, **kwargs) -> LayerReport:
    """Which config each quantization-aware layer of ``model`` resolves to in ``model.apply(variables, *args,
    **kwargs)``, and which rules of ``model.config`` matched none (computed abstractly: nothing runs)."""
    rngs = {CORRELATION_RNG: jax.random.key(0), "params": jax.random.key(0), **(rngs or {})}

    def run(variables):
        return model.apply(variables, *args, mutable=True, rngs=rngs, **kwargs)[1].get(LAYERS_COLLECTION, {})

    marks = jax.eval_shape(run, variables)
    paths = []
    for keys, _ in jax.tree_util.tree_flatten_with_path(marks)[0]:
        names = [k.key for k in keys if isinstance(k, jax.tree_util.DictKey)][:-1]  # drop the "layer" name
        if names and _is_quantizer_key(names[-1]):
            names = names[:-1]  # a conv/dot op reports as its layer
        paths.append("/".join(names))
    config = model.config
    layers = {path: config.resolve(path) for path in paths}
    unmatched: tuple[str, ...] = ()
    if isinstance(config, QuantRules):
        used = {config.match(path) for path in paths}
        unmatched = tuple(p for i, (p, _) in enumerate(config.rules) if i not in used)
    return LayerReport(layers, unmatched)


# --------------------------------------------------------------------------------------------------------------
# Linen: quantizer state owned by the layer that uses it


def _learned(module: nn.Module, kind: str, names: tuple[str, ...], init: Callable[[], dict]) -> dict:
    """The method's learned parameters as one Flax param ``kind`` (a dict), initialised from the tensor."""
    if not names:
        return {}

    def make(_rng):
        values = init()
        if set(values) != set(names):
            raise ValueError(f"{kind} parameters {sorted(values)} differ from the method's declared {sorted(names)}")
        return {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}

    return module.param(kind, make)


def _activation_state(module: nn.Module, method: QuantMethod, x, bits: int, use_running_average: bool,
                      momentum: float, axis_name: str | None = None) -> dict:
    """Learned activation parameters plus running statistics (batch ones in training, running ones in evaluation;
    the running average follows ``momentum`` like BatchNorm's and is updated only while "batch_stats" is mutable;
    with ``axis_name`` the batch statistics are the global batch's, combined by the method over the devices)."""
    params = _learned(module, "activation", method.activation_params, lambda: method.init_activation(x, bits))
    if not method.activation_stats:
        return params

    def batch_stats():
        stats = jax.lax.stop_gradient(method.activation_batch_stats(x, bits))
        stats = {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}
        if axis_name is not None and not module.is_initializing():
            stats = method.reduce_activation_stats(stats, axis_name)
        return stats

    running = module.variable("batch_stats", "activation", batch_stats)
    if use_running_average:
        return {**params, **running.value}
    stats = batch_stats()
    if not module.is_initializing() and module.is_mutable_collection("batch_stats"):
        running.value = jax.tree.map(lambda r, b: momentum * r + (1.0 - momentum) * b, running.value, stats)
    return {**params, **stats}


def keep_kernel_dtype(inputs, kernel, bias=None, *, dtype=None, inexact=True):
    """A ``promote_dtype`` for quantized layers: inputs and bias go to the compute dtype as Flax's would, the kernel
    stays in its parameter dtype, so it is quantized from the float32 master weight (the quantizer op casts it)."""
    if dtype is None:
        dtype = jnp.result_type(*(a for a in (inputs, kernel, bias) if a is not None))
    inputs, bias = linen_promote_dtype(inputs, bias, dtype=dtype, inexact=inexact)
    return inputs, kernel, bias


class _OperandQuantizer(nn.Module):
    """Quantizes the operands of its parent layer's conv/dot: the kernel, and the input for methods placed on conv
    inputs. Flax instantiates it inside the layer (``*_cls()``), so it reads its config from the parent and owns the
    method's learned parameters ("weight", "activation") and statistics (batch_stats "activation")."""

    _op_field: ClassVar[str]  # the parent's field holding a plain op function (None: ``_default_op``)
    _default_op: ClassVar[Callable]

    @nn.compact
    def __call__(self, lhs, rhs, *args, **kwargs):
        lhs, rhs = self._quantize(lhs, rhs)
        return self.op(lhs, rhs, *args, **kwargs)

    def op(self, lhs, rhs, *args, **kwargs):
        """The conv/dot on the quantized operands: the layer's own function if it was given one."""
        fn = getattr(self.parent, self._op_field) or self._default_op
        return fn(lhs, rhs, *args, **kwargs)

    def _quantize(self, lhs, rhs):
        layer = self.parent
        config = layer.config.resolve(module_path(layer))
        _mark_layer(self)
        method = config.quantizer
        if config.w_bits < 32:
            params = _learned(self, "weight", method.weight_params, lambda: method.init_weight(rhs, config.w_bits))
            rhs = method.quantize_weight(params, rhs, config.w_bits)
        if config.quantizes_conv_input and layer.quantize_input:
            state = _activation_state(self, method, lhs, config.a_bits, layer.use_running_average,
                                      layer.stats_momentum, layer.stats_axis_name)
            lhs = method.quantize_activation(state, lhs, config.a_bits)
        return lhs, rhs.astype(lhs.dtype)


class ConvQuantizer(_OperandQuantizer):
    """The ``conv_general_dilated_cls`` of :class:`QuantConv`. Subclass and override :meth:`op` to run another
    convolution on the quantized operands."""

    _op_field: ClassVar[str] = "conv_general_dilated"
    _default_op: ClassVar[Callable] = staticmethod(jax.lax.conv_general_dilated)


class DotQuantizer(_OperandQuantizer):
    """The ``dot_general_cls`` of :class:`QuantDense` (override :meth:`op` as for :class:`ConvQuantizer`)."""

    _op_field: ClassVar[str] = "dot_general"
    _default_op: ClassVar[Callable] = staticmethod(jax.lax.dot_general)


def _check_op_cls(cls, base, field: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(
            f"{field} is where the quantizer plugs in; give a subclass of {base.__name__} (override its op) or a "
            f"plain function as {field.removesuffix('_cls')}; got {cls!r}"
        )


class QuantConv(nn.Conv):
    """``nn.Conv`` (same arguments and parameter names) with ``config``: its conv op is a :class:`ConvQuantizer`.

    The kernel is quantized on every forward from the parameter dtype (float32 master weights in a bfloat16 layer;
    only the quantized kernel is cast); for methods placed on conv inputs the input is quantized too, unless
    ``quantize_input`` is False (the first conv, whose input is the image). A ``conv_general_dilated`` function
    given to the layer receives the quantized operands.

    Extra attributes:
      config: a QuantConfig or QuantRules (resolved by this layer's path).
      quantize_input: quantize the input for methods placed on conv inputs.
      use_running_average: evaluation mode for the method's running statistics (absmax ranges).
      stats_momentum: momentum of those running statistics (the model's BatchNorm momentum).
      stats_axis_name: device axis over which their batch values are combined (data parallel, as BatchNorm's).
    """

    config: QuantConfig | QuantRules = QuantConfig()
    quantize_input: bool = True
    use_running_average: bool = False
    stats_momentum: float = 0.9
    stats_axis_name: str | None = None
    promote_dtype: Any = keep_kernel_dtype
    conv_general_dilated_cls: Any = ConvQuantizer

    def __post_init__(self):
        _check_config(self.config)
        _check_op_cls(self.conv_general_dilated_cls, ConvQuantizer, "conv_general_dilated_cls")
        super().__post_init__()


class QuantDense(nn.Dense):
    """``nn.Dense`` with ``config`` and a :class:`DotQuantizer` as its dot op (as :class:`QuantConv`)."""

    config: QuantConfig | QuantRules = QuantConfig()
    quantize_input: bool = True
    use_running_average: bool = False
    stats_momentum: float = 0.9
    stats_axis_name: str | None = None
    promote_dtype: Any = keep_kernel_dtype
    dot_general_cls: Any = DotQuantizer

    def __post_init__(self):
        _check_config(self.config)
        _check_op_cls(self.dot_general_cls, DotQuantizer, "dot_general_cls")
        super().__post_init__()


def _record_gap(module: nn.Module, config: QuantConfig, compute: Callable[[Any], Any]) -> None:
    """Appends the B x B gap ``compute(key)`` to the layer's tuple "gap" in ``GAP_COLLECTION`` if it records gaps.

    A tuple with one gap per call (Flax's ``sow``), so a layer called on several batches in one ``apply`` (source
    and target domains) keeps every gap. ``init`` records none, as Flax's init does not return intermediates:
    initialisation works with any batch (one sample has no batch correlation), and the variables it returns can
    be passed to ``apply`` without gaps from init accumulating there. :func:`gap_shapes` gives the gaps' shapes.
    """
    if not (config.records_correlation and module.is_mutable_collection(GAP_COLLECTION)):
        return
    if module.is_initializing():
        return
    key = module.make_rng(CORRELATION_RNG) if config.correlation_features else None
    module.sow(GAP_COLLECTION, "gap", compute(key))


def gap_shapes(model: nn.Module, variables, *args, rngs=None, **kwargs):
    """The gaps ``model.apply(variables, *args, **kwargs)`` records, as a pytree of ``jax.ShapeDtypeStruct``
    (nothing is computed): what :meth:`alignq_jax.admm.ADMM.init` needs to size its state.

    Every collection is mutable in that abstract call; ``rngs`` may add streams the model needs (a "correlation"
    key is provided). Example: ``admm.init(gap_shapes(model, variables, x, train=True))``.
    """
    rngs = {CORRELATION_RNG: jax.random.key(0), **(rngs or {})}

    def run(variables):
        return model.apply(variables, *args, mutable=True, rngs=rngs, **kwargs)[1].get(GAP_COLLECTION, {})

    return jax.eval_shape(run, variables)


def calibrate(model: nn.Module, variables: dict, *args, rng=None, **kwargs) -> dict:
    """``variables`` completed with every quantizer parameter and statistic they lack, initialised from the tensors
    they quantize in ``model.apply(variables, *args, **kwargs)``: the kernels as they are in ``variables`` and
    the activations of this real batch. Entries already in ``variables`` are returned unchanged in either mode
    (train mode's BatchNorm updates are discarded).

    The mode decides which activations the quantizers are fitted to:
    - ``train=True`` (what quantization-aware training from a full-precision model should use): BatchNorm
      normalises with this batch's statistics, as every training step will. Methods whose quantized weights are
      on another scale than the kernel (DoReFa and PACT weights on [-1, 1], APoT's standardised weights) change
      every conv output's scale, and only batch statistics absorb that.
    - ``train=False``: BatchNorm uses the stored statistics, e.g. ``calibrate(model, fp_variables, images,
      train=False)`` for post-training quantization with a method that keeps the kernel's scale (absmax).
    """
    rngs = {"params": rng if rng is not None else jax.random.key(0), CORRELATION_RNG: jax.random.key(0)}
    _, created = model.apply(variables, *args, mutable=["params", "batch_stats"], rngs=rngs, **kwargs)
    return {**variables, **{name: _add_missing(variables.get(name, {}), tree) for name, tree in created.items()}}


def _add_missing(kept: dict, new: dict) -> dict:
    """``kept`` with the entries of ``new`` that it lacks (nested dicts merged; existing leaves win)."""
    out = dict(kept)
    for key, value in new.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _add_missing(out[key], value)
    return out


def _is_quantizer_key(key: str) -> bool:
    return key.startswith(("ConvQuantizer_", "DotQuantizer_"))


def without_quantizer_state(variables: dict) -> dict:
    """``variables`` without the quantizer parameters and statistics of QuantConv/QuantDense layers (their
    ``ConvQuantizer_*``/``DotQuantizer_*`` subtrees), so that :func:`calibrate` (or ``fit`` with these as
    ``init_variables``) initialises them afresh: needed when the bit-width changes (an 8-bit LSQ step is far too
    small for 4 bits). Subtrees left empty are dropped."""

    def strip(tree):
        if not isinstance(tree, dict):
            return tree
        out = {}
        for key, value in tree.items():
            if _is_quantizer_key(key):
                continue
            value = strip(value)
            if isinstance(value, dict) and not value and isinstance(tree[key], dict) and tree[key]:
                continue
            out[key] = value
        return out

    return {collection: strip(tree) for collection, tree in variables.items()}


class QuantActivation(nn.Module):
    """The activation quantizer of ``config``'s method alone (BN-output methods: place after BatchNorm, before the
    ReLU, docs/method.md §7; other methods: on a non-negative input).

    Records the B x B correlation gap into ``GAP_COLLECTION`` when ``config.correlation`` is on, a_bits < 32 and
    that collection is mutable (so evaluation does not pay for it): under the name "gap", a tuple with one gap per
    call in this ``apply``. ``init`` records none (so a model initialises with any batch; see :func:`gap_shapes`).

    ``relu``: also apply the ReLU that follows (fused for BN-output methods; the correlation gap still uses the
    pre-ReLU values; before the quantizer for the others).
    ``axis_name``: inside ``shard_map``/``pmap``, all-gather the batch over this device axis first, so the gap is
    the global (B_global x B_global) one; None (default) keeps per-device correlations of the local batch.
    """

    config: QuantConfig | QuantRules = QuantConfig()
    axis_name: str | None = None
    relu: bool = False
    use_running_average: bool = False
    stats_momentum: float = 0.9
    stats_axis_name: str | None = None

    @nn.compact
    def __call__(self, x):
        _check_config(self.config)
        config = self.config.resolve(module_path(self))
        _mark_layer(self)
        if config.a_bits == 32:
            return jax.nn.relu(x) if self.relu else x
        if config.quantizes_bn_output:
            q = config.quantize_activation(x, relu=self.relu)
            _record_gap(self, config, lambda key: config.correlation_gap(x, key, self.axis_name))
            return q
        if self.relu:
            x = jax.nn.relu(x)
        state = _activation_state(self, config.quantizer, x, config.a_bits, self.use_running_average,
                                  self.stats_momentum, self.stats_axis_name)
        return config.quantizer.quantize_activation(state, x, config.a_bits)


class QuantBatchNorm(nn.Module):
    """BatchNorm -> activation quantizer (-> ReLU) in one module: AlignQ's placement.

    Same values as ``nn.BatchNorm`` followed by :class:`QuantActivation`, but the normalisation is folded into
    the quantizer's custom VJP, so the backward keeps the BN input instead of an extra copy of the BN output
    (about one activation tensor less per quantized layer). For methods placed on conv inputs (and at a_bits=32)
    it is a plain BatchNorm (-> ReLU). Parameters ``scale``/``bias`` and statistics ``mean``/``var`` have
    nn.BatchNorm's names. Running statistics follow PyTorch: ``momentum`` 0.9 here is PyTorch's 0.1, and ``var``
    keeps the unbiased batch variance (normalisation uses the biased one, as PyTorch does). With ``momentum=0``
    the statistics are the last batch's, which is what :func:`alignq_jax.training.reestimate_batch_stats`
    averages over batches.

    Attributes:
      config: a QuantConfig or QuantRules (resolved by this layer's path).
      use_running_average: evaluation mode (may also be passed at call time).
      relu: apply ReLU after the quantizer (fused).
      momentum, epsilon: running-statistics momentum and variance epsilon.
      axis_name: device axis over which batch statistics are averaged (data parallel).
      correlation_axis_name: all-gather the batch over this axis for the correlation gap (global correlation).

    The gap is recorded as by :class:`QuantActivation` (a tuple with one gap per call; none during ``init``). In
    training mode, with the collection ``BN_MOMENTS_COLLECTION`` mutable, the batch's (mean, biased variance) are
    recorded under "moments" (data-free calibration matches them to the running statistics).
    """

    config: QuantConfig | QuantRules = QuantConfig()
    use_running_average: bool | None = None
    relu: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None
    correlation_axis_name: str | None = None
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, h, use_running_average: bool | None = None):
        _check_config(self.config)
        config = self.config.resolve(module_path(self))
        _mark_layer(self)
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        c = h.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = self.param("scale", self.scale_init, (c,), jnp.float32)
        bias = self.param("bias", self.bias_init, (c,), jnp.float32)
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(h.ndim - 1))
            hf = h.astype(jnp.float32)
            mean, mean_sq = jnp.mean(hf, axes), jnp.mean(hf * hf, axes)
            count = hf.size // c
            if self.axis_name is not None:
                mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name)
                count = count * jax.lax.psum(1, self.axis_name)
            var = jnp.maximum(mean_sq - mean * mean, 0.0)
            if not self.is_initializing():
                unbiased = var * count / max(count - 1, 1)
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
                ra_var.value = m * ra_var.value + (1.0 - m) * jax.lax.stop_gradient(unbiased)
                if self.is_mutable_collection(BN_MOMENTS_COLLECTION):
                    self.sow(BN_MOMENTS_COLLECTION, "moments", (mean, var))
        # mul/shift stay float32 for any compute dtype: the quantizer then normalises and rounds in float32 and
        # only its result is cast back (a bf16 model quantizes exactly as float32 would, then casts).
        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        shift = bias - mean * mul
        if not config.quantizes_bn_output:
            y = h.astype(jnp.float32) * mul + shift
            return (jax.nn.relu(y) if self.relu else y).astype(h.dtype)
        axis = self.correlation_axis_name
        _record_gap(self, config, lambda key: config.correlation_gap_affine(h, mul, shift, key, axis))
        return config.quantize_activation_affine(h, mul, shift, relu=self.relu).astype(h.dtype)


_HOOK_FIELDS = ("promote_dtype", "conv_general_dilated_cls", "dot_general_cls")


def _interceptor(config: QuantConfig, include_dense: bool):
    targets = {nn.Conv: QuantConv}
    if include_dense:
        targets[nn.Dense] = QuantDense

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        quantized_cls = targets.get(type(module))
        if quantized_cls is None or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if module.is_initializing():
            next_fun(*args, **kwargs)  # creates the full-precision parameters under the original names
        fields = {
            f.name: getattr(module, f.name)
            for f in dataclasses.fields(module)
            if f.init and f.name not in ("parent", "name", *_HOOK_FIELDS)
        }
        quantized = quantized_cls(**fields, config=config)
        return quantized.apply({"params": module.variables["params"]}, *args, **kwargs)

    return intercept


def _check_stateless(config: QuantConfig) -> None:
    _check_config(config)
    for c in config.configs():
        m = c.quantizer
        if m.weight_params or m.activation_params or m.activation_stats:
            raise ValueError(
                f"intercept_convs cannot keep the learned parameters or statistics of {c.method_name}; build the "
                f"model from QuantConv layers instead"
            )


@contextlib.contextmanager
def intercept_convs(config: QuantConfig, *, include_dense: bool = False):
    """Context manager: every plain ``nn.Conv`` (and ``nn.Dense`` if asked) called inside runs quantized.

    The parameters keep their names and full-precision values; only the forward uses the quantized kernel (and
    input, for methods placed on conv inputs), so an existing model trains quantization-aware without editing its
    source. Methods that learn parameters or keep statistics need QuantConv layers in the model (ValueError).
    BatchNorm outputs are not touched (place :class:`QuantActivation` for those).
    """
    _check_stateless(config)
    with nn.intercept_methods(_interceptor(config, include_dense)):
        yield


def quantized_apply(model: nn.Module, config: QuantConfig, *, include_dense: bool = False) -> Callable[..., Any]:
    """``model.apply`` with its convs quantized (see :func:`intercept_convs`); a pure function to jit."""
    _check_stateless(config)

    def apply(variables, *args, **kwargs):
        with intercept_convs(config, include_dense=include_dense):
            return model.apply(variables, *args, **kwargs)

    return apply


# --------------------------------------------------------------------------------------------------------------
# NNX


class CorrelationGap(nnx.Variable):
    """Holds the B x B correlation gap of the last call of an :class:`NNXQuantActivation` (read it after each call
    when a layer sees several batches per step)."""


class QuantizerStat(nnx.BatchStat):
    """A running statistic of a method's activation quantizer (absmax ranges) in an NNX layer."""


@dataclasses.dataclass(frozen=True)
class _QuantizedKernel:
    """An NNX layer's ``promote_dtype`` with the kernel (second array) quantized first, in its parameter dtype
    (float32 master weights even in a bfloat16 layer), with this call's learned parameters."""

    base: Callable
    config: QuantConfig
    params: Any = None

    def __call__(self, arrays, *args, **kwargs):
        arrays = list(arrays)
        if arrays[1] is not None:
            arrays[1] = self.config.quantize_weight(arrays[1], self.params)
        return self.base(tuple(arrays), *args, **kwargs)


class _NNXQuantized:
    """What NNXQuantConv and NNXQuantLinear share: quantizer parameters as ``weight_<name>`` / ``activation_<name>``
    Params and ``activation_<name>`` QuantizerStats of the layer. Weight parameters are initialised from the kernel
    at construction; activation parameters and statistics from the first input (call the layer once on a real
    batch outside a transform first). ``use_running_average`` (set by ``model.eval()``) selects the running
    statistics."""

    def _setup(self, config: QuantConfig, quantize_input: bool, stats_momentum: float):
        _check_config(config)
        if isinstance(config, QuantRules):
            raise ValueError("NNX layers take a QuantConfig (rules resolve module paths, a Linen notion)")
        self.config = config
        self.quantize_input = quantize_input
        self.stats_momentum = stats_momentum
        self.use_running_average = False
        method = config.quantizer
        if config.w_bits < 32:
            for name, value in method.init_weight(self.kernel.get_value(), config.w_bits).items():
                setattr(self, f"weight_{name}", nnx.Param(jnp.asarray(value, jnp.float32)))

    def _values(self, kind: str, names) -> dict:
        return {name: getattr(self, f"{kind}_{name}").get_value() for name in names}

    def _quantize_input(self, x):
        config, method = self.config, self.config.quantizer
        if not (config.quantizes_conv_input and self.quantize_input):
            return x
        bits = config.a_bits
        names = (*method.activation_params, *method.activation_stats)
        if names and not hasattr(self, f"activation_{names[0]}"):
            for name, value in method.init_activation(x, bits).items():
                setattr(self, f"activation_{name}", nnx.Param(jnp.asarray(value, jnp.float32)))
            for name, value in method.activation_batch_stats(x, bits).items():
                setattr(self, f"activation_{name}", QuantizerStat(jnp.asarray(value, jnp.float32)))
        state = self._values("activation", method.activation_params)
        if method.activation_stats:
            if self.use_running_average:
                state.update(self._values("activation", method.activation_stats))
            else:
                batch = jax.lax.stop_gradient(method.activation_batch_stats(x, bits))
                m = self.stats_momentum
                for name, value in batch.items():
                    stat = getattr(self, f"activation_{name}")
                    stat.set_value(m * stat.get_value() + (1.0 - m) * value)
                state.update(batch)
        return method.quantize_activation(state, x, bits)

    def _forward(self, base_call, x):
        x = self._quantize_input(x)
        if self.config.w_bits == 32:
            return base_call(self, x)
        params = self._values("weight", self.config.quantizer.weight_params)
        plain = self.promote_dtype
        self.promote_dtype = _QuantizedKernel(plain, self.config, params)
        try:
            return base_call(self, x)
        finally:
            self.promote_dtype = plain


def _nnx_keep_kernel_dtype(arrays, *, dtype=None, inexact=True):
    inputs, kernel, bias = arrays
    if dtype is None:
        dtype = jnp.result_type(*(a for a in arrays if a is not None))
    inputs, bias = nnx_promote_dtype((inputs, bias), dtype=dtype, inexact=inexact)
    return inputs, kernel, bias


class NNXQuantConv(_NNXQuantized, nnx.Conv):
    """``nnx.Conv`` (same arguments) plus ``config``: the kernel (and, for methods placed on conv inputs, the input
    unless ``quantize_input=False``) is quantized on every forward, the kernel from its parameter dtype."""

    def __init__(self, *args, config: QuantConfig = QuantConfig(), quantize_input: bool = True,
                 stats_momentum: float = 0.9, promote_dtype=None, **kwargs):
        super().__init__(*args, promote_dtype=promote_dtype or _nnx_keep_kernel_dtype, **kwargs)
        self._setup(config, quantize_input, stats_momentum)

    def __call__(self, x):
        return self._forward(nnx.Conv.__call__, x)


class NNXQuantLinear(_NNXQuantized, nnx.Linear):
    """``nnx.Linear`` (same arguments) plus ``config``, quantized as :class:`NNXQuantConv`."""

    def __init__(self, *args, config: QuantConfig = QuantConfig(), quantize_input: bool = True,
                 stats_momentum: float = 0.9, promote_dtype=None, **kwargs):
        super().__init__(*args, promote_dtype=promote_dtype or _nnx_keep_kernel_dtype, **kwargs)
        self._setup(config, quantize_input, stats_momentum)

    def __call__(self, x):
        return self._forward(nnx.Linear.__call__, x)


class NNXQuantActivation(nnx.Module):
    """NNX activation quantizer of a BN-output method (alignq, uniform); stores the correlation gap in
    ``self.gap`` when ``record_correlation``."""

    def __init__(self, config: QuantConfig = QuantConfig(), *, relu: bool = False, record_correlation: bool = True,
                 rngs=None):
        if config.a_bits < 32 and not config.quantizes_bn_output:
            raise ValueError(f"{config.method_name} quantizes conv inputs: use NNXQuantConv(config=...) for it")
        self.config = config
        self.relu = relu
        self.record_correlation = record_correlation
        self.gap = CorrelationGap(jax.numpy.zeros((0, 0)))
        if config.correlation_features and rngs is None:
            raise ValueError("correlation_features needs rngs (an nnx.Rngs with a 'correlation' stream)")
        self.rngs = rngs

    def __call__(self, x):
        if self.config.a_bits == 32:
            return jax.nn.relu(x) if self.relu else x
        q = self.config.quantize_activation(x, relu=self.relu)
        if self.config.records_correlation and self.record_correlation:
            key = self.rngs[CORRELATION_RNG]() if self.config.correlation_features else None
            self.gap.set_value(self.config.correlation_gap(x, key))
        return q
