"""Quantizer numerics do not depend on the input dtype: a bfloat16 input gives exactly the float32 result cast to
bfloat16, and its gradient is the float32 gradient cast to bfloat16 (statistics, CDF, threshold compares and
rounding all run in float32)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax import quantizers as q

BF16, F32 = jnp.bfloat16, jnp.float32
LEVELS = ("exact", "paper")
ALL_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _bf16(x):
    return jnp.asarray(x, F32).astype(BF16)


def _same(got, ref):
    """Same dtype (bfloat16) and the same value everywhere, bit for bit."""
    assert got.dtype == BF16 and ref.dtype == BF16, (got.dtype, ref.dtype)
    got, ref = np.asarray(got.astype(F32)), np.asarray(ref.astype(F32))
    bad = got != ref
    assert not bad.any(), f"{bad.mean():.2%} differ; got {got[bad][:5]}, float32 result {ref[bad][:5]}"


# Dense data: about 2/3 of these land within a bfloat16 step of some float32 level boundary at 8 bits, so the
# old bfloat16 arithmetic changed many codes.
_RNG = np.random.default_rng(0)
X = _bf16(1.3 * _RNG.standard_normal(4096))
W = _bf16(0.05 * _RNG.standard_normal((4, 4, 16, 16)) + 0.01)


def _weight_fns(method, levels):
    fn = {"alignq": q.alignq_weight, "uniform": q.uniform_weight}[method]
    scale = 1.0 if method == "alignq" else 20.0  # uniform: spread the raw weights over its [-1, 1] grid
    return functools.partial(fn, levels=levels), scale


@pytest.mark.parametrize("method", ["alignq", "uniform"])
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_weight_bf16_equals_float32_cast(method, levels, bits):
    fn, scale = _weight_fns(method, levels)
    w = (W.astype(F32) * scale).astype(BF16)
    _same(fn(w, bits), fn(w.astype(F32), bits).astype(BF16))
    if method == "alignq":  # stop_stats_grad does not change the forward
        _same(fn(w, bits, stop_stats_grad=True), fn(w.astype(F32), bits).astype(BF16))


@pytest.mark.parametrize("method", ["alignq", "uniform"])
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_activation_bf16_equals_float32_cast(method, levels, relu, bits):
    fn = q.get_quantizers(method).activation
    for a in (2.0, 1.5):
        f = functools.partial(fn, bits=bits, act_range=a, levels=levels, relu=relu)
        _same(f(X), f(X.astype(F32)).astype(BF16))


@pytest.mark.parametrize("method", ["alignq", "uniform"])
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 4, 6, 8, 32])
@pytest.mark.parametrize("param_dtype", [F32, BF16])
def test_activation_affine_bf16_equals_float32_cast(method, levels, relu, bits, param_dtype):
    fn = q.get_quantizers(method).activation_affine
    h = X.reshape(64, 4, 16)
    scale = jnp.linspace(0.3, 2.7, 16, dtype=F32).astype(param_dtype)
    shift = jnp.linspace(-1.1, 0.9, 16, dtype=F32).astype(param_dtype)
    f = functools.partial(fn, bits=bits, levels=levels, relu=relu)
    got = f(h, scale, shift)
    # The output takes h's dtype; the affine map itself runs in float32 too.
    _same(got, f(h.astype(F32), scale.astype(F32), shift.astype(F32)).astype(BF16))


def test_align_functions_bf16_equal_float32_cast():
    _same(q.cdf_align_weight(W), q.cdf_align_weight(W.astype(F32)).astype(BF16))
    for method in ("alignq", "uniform"):
        align = q.get_quantizers(method).align_activation
        for a in (2.0, 0.75):
            _same(align(X, act_range=a), align(X.astype(F32), act_range=a).astype(BF16))


def _grad(f, x, up):
    return jax.grad(lambda t: jnp.sum((f(t) * up).astype(F32)))(x)


@pytest.mark.parametrize("method", ["alignq", "uniform"])
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_weight_bf16_gradient_is_float32_gradient_cast(method, levels, bits):
    fn, scale = _weight_fns(method, levels)
    w = (W.astype(F32) * scale).astype(BF16)
    up = _bf16(_RNG.standard_normal(w.shape))
    kwargs = [{}] if method == "uniform" else [{}, {"stop_stats_grad": True}, {"surrogate": (1.0, 4.0)}]
    for kw in kwargs:
        f = functools.partial(fn, bits=bits, **kw)
        _same(_grad(f, w, up), _grad(f, w.astype(F32), up.astype(F32)).astype(BF16))


@pytest.mark.parametrize("method", ["alignq", "uniform"])
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_activation_bf16_gradient_is_float32_gradient_cast(method, levels, relu, bits):
    f = functools.partial(q.get_quantizers(method).activation, bits=bits, levels=levels, relu=relu)
    up = _bf16(_RNG.standard_normal(X.shape))
    _same(_grad(f, X, up), _grad(f, X.astype(F32), up.astype(F32)).astype(BF16))


@pytest.mark.parametrize("method", ["alignq", "uniform"])
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("param_dtype", [F32, BF16])
def test_activation_affine_bf16_gradients(method, levels, relu, param_dtype):
    fn = q.get_quantizers(method).activation_affine
    h = X.reshape(64, 4, 16)
    scale = jnp.linspace(0.3, 2.7, 16, dtype=F32).astype(param_dtype)
    shift = jnp.linspace(-1.1, 0.9, 16, dtype=F32).astype(param_dtype)
    up = _bf16(_RNG.standard_normal(h.shape))

    def loss(h, scale, shift):
        return jnp.sum((fn(h, scale, shift, 4, levels=levels, relu=relu) * up).astype(F32))

    got = jax.grad(loss, (0, 1, 2))(h, scale, shift)
    ref = jax.grad(loss, (0, 1, 2))(h.astype(F32), scale.astype(F32), shift.astype(F32))
    assert [g.dtype for g in got] == [BF16, param_dtype, param_dtype]
    _same(got[0], ref[0].astype(BF16))
    for g, r in zip(got[1:], ref[1:]):
        np.testing.assert_array_equal(np.asarray(g.astype(F32)), np.asarray(r.astype(param_dtype).astype(F32)))


@pytest.mark.parametrize("method", ["alignq", "uniform"])
def test_jit_bf16_equals_eager(method):
    pair = q.get_quantizers(method)
    for fn, x in ((pair.weight, W), (pair.activation, X)):
        f = functools.partial(fn, bits=4)
        _same(jax.jit(f)(x), f(x))


@pytest.mark.parametrize("name", ["alignq_weight", "alignq_activation", "uniform_weight", "uniform_activation",
                                  "cdf_align_weight", "cdf_align_activation"])
def test_integer_input_raises(name):
    fn = getattr(q, name)
    args = () if name.startswith("cdf") else (4,)
    with pytest.raises(ValueError, match="floating"):
        fn(jnp.arange(8), *args)
