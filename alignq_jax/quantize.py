"""Flax integration: ``QuantConfig`` and quantized layers for Linen (primary) and NNX.

Import as ``from alignq_jax import quantize``. The modules hold no math: they call the pure functions of
``alignq_jax.quantizers`` and ``alignq_jax.correlation`` (see docs/design.md).

Linen
  * :class:`QuantConv`, :class:`QuantDense`: ``nn.Conv`` / ``nn.Dense`` with the same constructor arguments plus
    ``config``; the kernel is quantized on every forward (the stored parameter stays full precision).
  * :class:`QuantActivation`: the activation quantizer; when ``config.correlation`` is on and the collection
    ``GAP_COLLECTION`` is mutable, it records its B x B correlation gap there (a tuple, one gap per call), so a
    train step collects every layer's gaps as one pytree with ``mutable=["batch_stats", GAP_COLLECTION]``;
    :func:`gap_shapes` gives that pytree's shapes for ``ADMM.init`` (``init`` records no gaps).
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
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import promote_dtype as linen_promote_dtype
from flax.nnx.nn.dtypes import promote_dtype as nnx_promote_dtype

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
      method: "alignq" (Gaussian-CDF alignment) or "uniform" (plain uniform baseline, docs/method.md §9).
      levels: "exact" (k bits = at most 2^k levels, default) or "paper" (official grid, about one bit more).
      act_range: A of the activation grid (-A, A); official 2.0.
      correlation: record the correlation gap of every quantized activation (for the ADMM term).
      correlation_target: "aligned" compares x with the unrounded aligned output (official code) or
        "quantized" with the rounded output (the paper's Theorem 3.2 is about X vs Q(X)).
      correlation_eps: stabiliser of the per-feature batch std.
      correlation_features: None (exact gap) or K: estimate each gap from at least K random feature columns per
        step: every channel, each at its own random grid of positions (an unbiased estimate of the gap, not of the
        ADMM penalty; the Flax layer then needs the RNG stream "correlation").
      stop_stats_grad: treat the weight mean/std as constants in the gradient (official: False).
      surrogate: None (straight-through rounding) or (lam, lam2) for the paper's soft-step weight gradient
        (opt-in; docs/method.md §3).
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

    def quantize_activation_affine(self, h, scale, shift, relu=False):
        """``quantize_activation(h * scale + shift)`` with the per-channel affine folded in (less memory)."""
        fn = _q.get_quantizers(self.method).activation_affine
        return fn(h, scale, shift, self.a_bits, act_range=self.act_range, levels=self.levels, relu=relu)

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
            target = _q.get_quantizers(self.method).align_activation(x, self.act_range)
        if axis_name is not None:
            x = jax.lax.all_gather(x, axis_name, tiled=True)
            target = jax.lax.all_gather(target, axis_name, tiled=True)
        return _correlation.correlation_gap(x, target, self.correlation_eps)


@dataclasses.dataclass(frozen=True)
class _QuantizedKernel:
    """A layer's ``promote_dtype`` with the kernel (its second argument) quantized first.

    Flax layers call ``promote_dtype(inputs, kernel, bias, dtype=self.dtype)`` right before the conv/dot, so the
    kernel is quantized in its parameter dtype (float32 master weights even in a bfloat16 model) and only the
    quantized values are cast to the compute dtype. Every conv/dot function (``conv_general_dilated``,
    ``dot_general`` and the ``*_cls`` injection points) then receives the quantized kernel.
    Hashable (Linen module fields must be), and unwrappable so a clone with another config does not wrap twice.
    """

    base: Callable
    config: QuantConfig
    packed: bool = False  # NNX passes the arrays as one tuple, Linen as separate arguments

    def __call__(self, *args, **kwargs):
        arrays = list(args[0] if self.packed else args)
        if arrays[1] is not None:
            arrays[1] = self.config.quantize_weight(arrays[1])
        if self.packed:
            return self.base(tuple(arrays), *args[1:], **kwargs)
        return self.base(*arrays, **kwargs)

    @classmethod
    def wrap(cls, fn, config, *, nnx_layer=False):
        """``fn`` (a promote_dtype function; None: Flax's default) with the kernel quantized by ``config``. An
        existing wrapper is replaced, and 32-bit weights get the unwrapped function back."""
        base = fn.base if isinstance(fn, cls) else fn
        if base is None:
            base = nnx_promote_dtype if nnx_layer else linen_promote_dtype
        if config.w_bits == 32:
            return base
        return cls(base, config, nnx_layer)


def _install_kernel_quantizer(module: nn.Module) -> None:
    """Sets a Linen layer's ``promote_dtype`` field to the quantizing wrapper for ``module.config`` (frozen)."""
    object.__setattr__(module, "promote_dtype", _QuantizedKernel.wrap(module.promote_dtype, module.config))


# --------------------------------------------------------------------------------------------------------------
# Linen


class QuantConv(nn.Conv):
    """``nn.Conv`` whose kernel goes through ``config.quantize_weight`` (per tensor) on every forward.

    The kernel is quantized in its parameter dtype before the cast to ``dtype`` (a bfloat16 layer convolves with
    the float32-quantized kernel cast to bfloat16), through the layer's ``promote_dtype`` hook, so a custom
    ``conv_general_dilated`` or ``conv_general_dilated_cls`` receives the quantized kernel too.
    """

    config: QuantConfig = QuantConfig()

    def __post_init__(self):
        _install_kernel_quantizer(self)
        super().__post_init__()


class QuantDense(nn.Dense):
    """``nn.Dense`` whose kernel goes through ``config.quantize_weight`` on every forward (as in
    :class:`QuantConv`: quantized in the parameter dtype, and ``dot_general``/``dot_general_cls`` see it)."""

    config: QuantConfig = QuantConfig()

    def __post_init__(self):
        _install_kernel_quantizer(self)
        super().__post_init__()


def _record_gap(module: nn.Module, compute: Callable[[Any], Any]) -> None:
    """Appends the B x B gap ``compute(key)`` to the layer's tuple "gap" in ``GAP_COLLECTION`` if it records gaps.

    A tuple with one gap per call (Flax's ``sow``), so a layer called on several batches in one ``apply`` (source
    and target domains) keeps every gap. ``init`` records none, as Flax's init does not return intermediates:
    initialisation works with any batch (one sample has no batch correlation), and the variables it returns can
    be passed to ``apply`` without gaps from init accumulating there. :func:`gap_shapes` gives the gaps' shapes.
    """
    config = module.config
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


class QuantActivation(nn.Module):
    """Activation quantizer (place after BatchNorm, before ReLU; docs/method.md §7).

    Records the B x B correlation gap into ``GAP_COLLECTION`` when ``config.correlation`` is on, a_bits < 32 and
    that collection is mutable (so evaluation does not pay for it): under the name "gap", a tuple with one gap per
    call in this ``apply``. ``init`` records none (so a model initialises with any batch; see :func:`gap_shapes`).

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
        _record_gap(self, lambda key: self.config.correlation_gap(x, key, self.axis_name))
        return q


class QuantBatchNorm(nn.Module):
    """BatchNorm -> activation quantizer (-> ReLU) in one module: the placement of every AlignQ model.

    Same values as ``nn.BatchNorm`` followed by :class:`QuantActivation`, but the normalisation is folded into
    the quantizer's custom VJP, so the backward keeps the BN input instead of an extra copy of the BN output
    (about one activation tensor less per quantized layer). Parameters ``scale``/``bias`` and statistics
    ``mean``/``var`` have nn.BatchNorm's names. Running statistics follow PyTorch: momentum 0.1 (0.9 here) and
    the unbiased batch variance for ``var`` (normalisation uses the biased one, as PyTorch does).

    Attributes:
      config: the QuantConfig (a_bits=32 gives a plain BN, with ReLU if ``relu``).
      use_running_average: evaluation mode (may also be passed at call time).
      relu: apply ReLU after the quantizer (fused).
      axis_name: device axis over which batch statistics are averaged (data parallel).
      correlation_axis_name: all-gather the batch over this axis for the correlation gap (global correlation).

    The gap is recorded as by :class:`QuantActivation` (a tuple with one gap per call; none during ``init``).
    """

    config: QuantConfig = QuantConfig()
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
        # mul/shift stay float32 for any compute dtype: the quantizer then normalises and rounds in float32 and
        # only its result is cast back (a bf16 model quantizes exactly as float32 would, then casts).
        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        shift = bias - mean * mul
        axis = self.correlation_axis_name
        _record_gap(self, lambda key: self.config.correlation_gap_affine(h, mul, shift, key, axis))
        return self.config.quantize_activation_affine(h, mul, shift, relu=self.relu).astype(h.dtype)


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
    """Holds the B x B correlation gap of the last call of an :class:`NNXQuantActivation` (read it after each call
    when a layer sees several batches per step)."""


class NNXQuantConv(nnx.Conv):
    """``nnx.Conv`` (same arguments) plus ``config``: the kernel is quantized on every forward, in its parameter
    dtype, through the ``promote_dtype`` hook (a ``promote_dtype`` passed in is wrapped)."""

    def __init__(self, *args, config: QuantConfig = QuantConfig(), promote_dtype=None, **kwargs):
        super().__init__(*args, promote_dtype=_QuantizedKernel.wrap(promote_dtype, config, nnx_layer=True), **kwargs)
        self.config = config


class NNXQuantLinear(nnx.Linear):
    """``nnx.Linear`` (same arguments) plus ``config``: the kernel is quantized on every forward, as in
    :class:`NNXQuantConv`."""

    def __init__(self, *args, config: QuantConfig = QuantConfig(), promote_dtype=None, **kwargs):
        super().__init__(*args, promote_dtype=_QuantizedKernel.wrap(promote_dtype, config, nnx_layer=True), **kwargs)
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
            self.gap.set_value(self.config.correlation_gap(x, key))
        return q
