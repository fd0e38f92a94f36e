"""Flax integration: ``QuantConfig`` and quantized layers for Linen (primary) and NNX.

Import as ``from alignq_jax import quantize``. The modules hold no math: they call the pure functions of
``alignq_jax.quantizers`` and ``alignq_jax.correlation`` (see design.md, layer 3).

Linen
  * :class:`QuantConv`, :class:`QuantDense`: ``nn.Conv`` / ``nn.Dense`` with the same constructor arguments plus
    ``config``; the kernel is quantized on every forward (the stored parameter stays full precision).
  * :class:`QuantActivation`: the activation quantizer; when ``config.correlation`` is on and the collection
    ``GAP_COLLECTION`` is mutable, it records its B x B correlation gap there, so a train step collects every
    layer's gap as one pytree with ``mutable=["batch_stats", GAP_COLLECTION]``.
  * :func:`intercept_convs` / :func:`quantized_apply`: quantize the convs of an existing Linen model without
    editing its source (Flax method interception).

NNX
  * :class:`NNXQuantConv`, :class:`NNXQuantLinear`, :class:`NNXQuantActivation` with identical numerics; the gap
    is stored in a :class:`CorrelationGap` variable (``nnx.state(model, CorrelationGap)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
from flax import nnx
from jax import lax

from alignq_jax import correlation as _correlation
from alignq_jax import quantizers as _q

GAP_COLLECTION = "correlation_gaps"
CORRELATION_RNG = "correlation"  # RNG stream for the sampled-feature estimate of the gap
CORRELATION_TARGETS = ("aligned", "quantized")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how; validated at construction. bits=32 means full precision.

    Attributes:
      w_bits: weight bits of quantized convs/dense layers, 1..8 or 32.
      a_bits: activation bits, 1..8 or 32.
      method: "alignq" (Gaussian-CDF alignment) or "uniform" (plain uniform baseline, reference section 9).
      levels: "exact" (k bits = at most 2^k levels, default) or "paper" (official grid, about one bit more).
      act_range: A of the activation grid (-A, A); official 2.0.
      correlation: record the correlation gap of every quantized activation (for the ADMM term).
      correlation_target: "aligned" compares x with the unrounded aligned output (official code) or
        "quantized" with the rounded output (the paper's Theorem 3.2 is about X vs Q(X)).
      correlation_eps: stabiliser of the per-feature batch std.
      correlation_features: None (exact gap) or K: estimate each gap from K random features per step (unbiased;
        the Flax layer then needs the RNG stream "correlation").
      stop_stats_grad: treat the weight mean/std as constants in the gradient (official: False).
      surrogate: None (straight-through rounding) or (lam, lam2) for the paper's soft-step weight gradient
        (opt-in; reference section 3).
    """

    w_bits: int = 32
    a_bits: int = 32
    method: str = "alignq"
    levels: str = "exact"
    act_range: float = 2.0
    correlation: bool = False
    correlation_target: str = "aligned"
    correlation_eps: float = 1e-5
    correlation_features: int | None = None
    stop_stats_grad: bool = False
    surrogate: tuple[float, float] | None = None

    def __post_init__(self):
        _q.check_bits(self.w_bits)
        _q.check_bits(self.a_bits)
        _q.get_quantizers(self.method)
        _q.check_levels(self.levels)
        object.__setattr__(self, "act_range", _q.check_act_range(self.act_range))
        if not isinstance(self.correlation, bool):
            raise ValueError(f"correlation must be True or False; got {self.correlation!r}")
        if self.correlation_target not in CORRELATION_TARGETS:
            raise ValueError(f"correlation_target must be one of {CORRELATION_TARGETS}; got {self.correlation_target!r}")
        if not self.correlation_eps > 0:
            raise ValueError(f"correlation_eps must be positive; got {self.correlation_eps!r}")
        cf = self.correlation_features
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, int) or cf < 2):
            raise ValueError(f"correlation_features must be None or an int >= 2; got {cf!r}")
        if self.surrogate is not None:
            object.__setattr__(self, "surrogate", _q._check_surrogate(self.surrogate))

    # The pure calls the layers make -------------------------------------------------------------------------
    @property
    def records_correlation(self) -> bool:
        return self.correlation and self.a_bits < 32

    def quantize_weight(self, w):
        """Quantized kernel (any shape), per tensor."""
        fn = _q.get_quantizers(self.method).weight
        return fn(w, self.w_bits, levels=self.levels, stop_stats_grad=self.stop_stats_grad, surrogate=self.surrogate)

    def quantize_activation(self, x, relu=False):
        """Quantized activations; ``relu`` fuses the ReLU that follows (same values, less backward memory)."""
        fn = _q.get_quantizers(self.method).activation
        return fn(x, self.a_bits, act_range=self.act_range, levels=self.levels, relu=relu)

    def pre_relu_output(self, x, q, relu):
        """The quantized output before a fused ReLU, when the gap compares against it (else ``q`` as is)."""
        if relu and self.correlation_target == "quantized":
            return self.quantize_activation(x)
        return q

    def correlation_gap(self, x, quantized, key=None):
        """B x B gap between x and the configured target (aligned or quantized output).

        ``key`` is required when ``correlation_features`` is set (a fresh key per step).
        """
        if self.correlation_target == "quantized":
            target = quantized
        else:
            target = _q.get_quantizers(self.method).align_activation(x, self.act_range)
        return _correlation.correlation_gap(
            x, target, self.correlation_eps, num_features=self.correlation_features, key=key
        )


@dataclasses.dataclass(frozen=True)
class _QuantizedKernel:
    """Wraps a conv/dot function so that its second operand (the kernel) is quantized first.

    Hashable (Linen module fields must be), and unwrappable so a clone with another config does not wrap twice.
    """

    base: Callable
    config: QuantConfig

    def __call__(self, lhs, rhs, *args, **kwargs):
        return self.base(lhs, self.config.quantize_weight(rhs), *args, **kwargs)

    @classmethod
    def wrap(cls, fn, default, config):
        base = fn.base if isinstance(fn, cls) else (fn or default)
        return cls(base, config)


# --------------------------------------------------------------------------------------------------------------
# Linen


class QuantConv(nn.Conv):
    """``nn.Conv`` whose kernel goes through ``config.quantize_weight`` (per tensor) on every forward."""

    config: QuantConfig = QuantConfig()

    def __post_init__(self):
        if self.config.w_bits < 32:
            wrapped = _QuantizedKernel.wrap(self.conv_general_dilated, lax.conv_general_dilated, self.config)
            object.__setattr__(self, "conv_general_dilated", wrapped)
        super().__post_init__()


class QuantDense(nn.Dense):
    """``nn.Dense`` whose kernel goes through ``config.quantize_weight`` on every forward."""

    config: QuantConfig = QuantConfig()

    def __post_init__(self):
        if self.config.w_bits < 32:
            wrapped = _QuantizedKernel.wrap(self.dot_general, lax.dot_general, self.config)
            object.__setattr__(self, "dot_general", wrapped)
        super().__post_init__()


class QuantActivation(nn.Module):
    """Activation quantizer (place after BatchNorm, before ReLU; reference section 7).

    Records the B x B correlation gap into ``GAP_COLLECTION`` under the name "gap" when ``config.correlation``
    is on, a_bits < 32 and that collection is mutable (so evaluation does not pay for it).

    ``relu``: also apply the ReLU that follows (fused; the correlation gap still uses the pre-ReLU values).
    ``axis_name``: inside ``shard_map``/``pmap``, all-gather the batch over this device axis first, so the gap is
    the global (B_global x B_global) one; None (default) keeps per-device correlations of the local batch.
    """

    config: QuantConfig = QuantConfig()
    axis_name: str | None = None
    relu: bool = False

    @nn.compact
    def __call__(self, x):
        q = self.config.quantize_activation(x, relu=self.relu)
        if self.config.records_correlation and self.is_mutable_collection(GAP_COLLECTION):
            xs, qs = x, self.config.pre_relu_output(x, q, self.relu)
            if self.axis_name is not None:
                xs = jax.lax.all_gather(x, self.axis_name, tiled=True)
                qs = jax.lax.all_gather(q, self.axis_name, tiled=True)
            key = self.make_rng(CORRELATION_RNG) if self.config.correlation_features else None
            gap = self.config.correlation_gap(xs, qs, key)
            self.sow(GAP_COLLECTION, "gap", gap, init_fn=lambda: None, reduce_fn=lambda _, new: new)
        return q


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
            if f.init and f.name not in ("parent", "name")
        }
        quantized = quantized_cls(**fields, config=config)
        return quantized.apply({"params": module.variables["params"]}, *args, **kwargs)

    return intercept


@contextlib.contextmanager
def intercept_convs(config: QuantConfig, *, include_dense: bool = False):
    """Context manager: every plain ``nn.Conv`` (and ``nn.Dense`` if asked) called inside runs quantized.

    The parameters keep their names and full-precision values; only the forward uses the quantized kernel, so
    an existing model trains quantization-aware without editing its source. Activations are not touched (place
    :class:`QuantActivation` for those).
    """
    with nn.intercept_methods(_interceptor(config, include_dense)):
        yield


def quantized_apply(model: nn.Module, config: QuantConfig, *, include_dense: bool = False) -> Callable[..., Any]:
    """``model.apply`` with its convs quantized (see :func:`intercept_convs`); a pure function to jit."""

    def apply(variables, *args, **kwargs):
        with intercept_convs(config, include_dense=include_dense):
            return model.apply(variables, *args, **kwargs)

    return apply


# --------------------------------------------------------------------------------------------------------------
# NNX


class CorrelationGap(nnx.Variable):
    """Holds the last B x B correlation gap of an :class:`NNXQuantActivation`."""


class NNXQuantConv(nnx.Conv):
    """``nnx.Conv`` (same arguments) plus ``config``: the kernel is quantized on every forward."""

    def __init__(self, *args, config: QuantConfig = QuantConfig(), conv_general_dilated=None, **kwargs):
        fn = conv_general_dilated or lax.conv_general_dilated
        if config.w_bits < 32:
            fn = _QuantizedKernel.wrap(fn, lax.conv_general_dilated, config)
        super().__init__(*args, conv_general_dilated=fn, **kwargs)
        self.config = config


class NNXQuantLinear(nnx.Linear):
    """``nnx.Linear`` (same arguments) plus ``config``: the kernel is quantized on every forward."""

    def __init__(self, *args, config: QuantConfig = QuantConfig(), dot_general=None, **kwargs):
        fn = dot_general
        if config.w_bits < 32:
            fn = _QuantizedKernel.wrap(fn, lax.dot_general, config)
        super().__init__(*args, dot_general=fn, **kwargs)
        self.config = config


class NNXQuantActivation(nnx.Module):
    """NNX activation quantizer; stores the correlation gap in ``self.gap`` when ``record_correlation``."""

    def __init__(self, config: QuantConfig = QuantConfig(), *, relu: bool = False, record_correlation: bool = True,
                 rngs=None):
        self.config = config
        self.relu = relu
        self.record_correlation = record_correlation
        self.gap = CorrelationGap(jax.numpy.zeros((0, 0)))
        if config.correlation_features and rngs is None:
            raise ValueError("correlation_features needs rngs (an nnx.Rngs with a 'correlation' stream)")
        self.rngs = rngs

    def __call__(self, x):
        q = self.config.quantize_activation(x, relu=self.relu)
        if self.config.records_correlation and self.record_correlation:
            key = self.rngs[CORRELATION_RNG]() if self.config.correlation_features else None
            self.gap.set_value(self.config.correlation_gap(x, self.config.pre_relu_output(x, q, self.relu), key))
        return q
