"""LSQ (Esser et al., 2020): values, levels, the step gradient of eq. 3 with its 1/sqrt(N*Q_P) scale, the
straight-through input gradient, the init rule, dtypes, jit, bits. Expected values are hand-computed or float64
numpy written independently of the library."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax.methods.base import CONV_INPUT
from alignq_jax.methods.lsq import LSQ, MIN_STEP

M = LSQ()
BITS = (2, 3, 4, 5, 6, 7, 8)
BF16, F32 = jnp.bfloat16, jnp.float32


def _bounds(bits, signed):
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _away_from_boundaries(v, s, qn, qp, tol=1e-3):
    """Drops values whose v/s lies within tol of a rounding threshold (j + 1/2) or of a clip end."""
    r = np.asarray(v, np.float64) / s
    frac = np.abs(r - np.floor(r) - 0.5)
    keep = (frac > tol) & (np.abs(r + qn) > tol) & (np.abs(r - qp) > tol)
    return np.asarray(v)[keep]


def _np_lsq_grads(v, s, c, qn, qp, n_features):
    """Eq. 3 of the paper (step) times 1/sqrt(N*Q_P), and the straight-through input gradient, float64."""
    r = np.asarray(v, np.float64) / s
    inside = (r > -qn) & (r < qp)
    ds = np.where(inside, np.round(r) - r, np.where(r <= -qn, -qn, qp))
    c = np.asarray(c, np.float64)
    return c * inside, np.sum(c * ds) / np.sqrt(n_features * qp)


def test_method_attributes_and_param_keys():
    w = jnp.asarray(np.linspace(-1, 1, 12).reshape(3, 4), F32)
    assert M.name == "lsq" and M.placement == CONV_INPUT
    assert tuple(M.init_weight(w, 4)) == M.weight_params == ("step",)
    assert tuple(M.init_activation(w, 4)) == M.activation_params == ("step",)
    assert M.activation_stats == ()


# Hand-computed: s = 0.2. w/s = [-5, -2.25, -0.65, 0, 0.6, 1.65, 3.5].
W_HAND = np.array([-1.0, -0.45, -0.13, 0.0, 0.12, 0.33, 0.7], np.float32)


@pytest.mark.parametrize(
    "bits, expected",
    [
        # Q_N = 2, Q_P = 1: clip to [-2, 1] -> round -> [-2, -2, -1, 0, 1, 1, 1]
        (2, [-0.4, -0.4, -0.2, 0.0, 0.2, 0.2, 0.2]),
        # Q_N = 4, Q_P = 3: [-4, -2, -1, 0, 1, 2, 3]
        (3, [-0.8, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6]),
    ],
)
def test_weight_values_hand_computed(bits, expected):
    got = M.quantize_weight({"step": jnp.float32(0.2)}, jnp.asarray(W_HAND), bits)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)


def test_activation_values_hand_computed():
    # s = 0.2, 2 bits: Q_P = 3. x/s = [-2.5, 0, 0.35, 1.3, 2.65, 15] -> clip [0, 3] -> round [0, 0, 0, 1, 3, 3]
    x = jnp.asarray([[-0.5, 0.0, 0.07, 0.26, 0.53, 3.0]], F32)
    got = M.quantize_activation({"step": jnp.float32(0.2)}, x, 2)
    np.testing.assert_allclose(np.asarray(got), [[0.0, 0.0, 0.0, 0.2, 0.6, 0.6]], atol=1e-6)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_levels_all_reachable_and_at_most_2_pow_k(bits, signed):
    qn, qp = _bounds(bits, signed)
    s = 0.37
    v = jnp.asarray(np.linspace(-(qn + 2) * s - 0.5, (qp + 2) * s, 40 * 2**bits), F32)
    params = {"step": jnp.float32(s)}
    out = M.quantize_weight(params, v, bits) if signed else M.quantize_activation(params, v[None], bits)[0]
    values = np.unique(np.asarray(out))
    assert len(values) == 2**bits
    np.testing.assert_allclose(values, s * np.arange(-qn, qp + 1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", BITS)
def test_weight_gradients_eq3_closed_form(bits):
    qn, qp = _bounds(bits, True)
    rng = np.random.default_rng(bits)
    s = 0.05
    w = rng.normal(0.0, 0.7 * qp * s + 0.05, 600).astype(np.float32)  # a fair share clipped on both sides
    w = _away_from_boundaries(w, s, qn, qp).reshape(-1, 1)
    c = rng.normal(size=w.shape).astype(np.float32)
    fn = lambda p, v: jnp.sum(jnp.asarray(c) * M.quantize_weight(p, v, bits))
    gp, gw = jax.grad(fn, argnums=(0, 1))({"step": jnp.float32(s)}, jnp.asarray(w))
    ref_w, ref_s = _np_lsq_grads(w, s, c, qn, qp, n_features=w.size)
    assert 0 < ref_w.astype(bool).mean() < 1  # both branches exercised
    np.testing.assert_array_equal(np.asarray(gw), ref_w)
    np.testing.assert_allclose(float(gp["step"]), ref_s, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("batch", [1, 5])
def test_activation_gradients_eq3_closed_form_scale_per_sample(bits, batch):
    # N is the number of features of ONE sample (3*3*4 = 36), not the batch size times that.
    qn, qp = _bounds(bits, False)
    rng = np.random.default_rng(10 * bits + batch)
    s = 0.1
    x = (rng.normal(0.2, 0.4 * qp * s + 0.3, (batch, 3, 3, 4))).astype(np.float32)
    r = x.astype(np.float64) / s
    x = np.where(np.abs(r - np.floor(r) - 0.5) < 1e-3, x + 0.01 * s, x).astype(np.float32)  # off the ties
    c = rng.normal(size=x.shape).astype(np.float32)
    fn = lambda p, v: jnp.sum(jnp.asarray(c) * M.quantize_activation(p, v, bits))
    gp, gx = jax.grad(fn, argnums=(0, 1))({"step": jnp.float32(s)}, jnp.asarray(x))
    ref_x, ref_s = _np_lsq_grads(x, s, c, qn, qp, n_features=36)
    np.testing.assert_array_equal(np.asarray(gx), ref_x)
    np.testing.assert_allclose(float(gp["step"]), ref_s, rtol=2e-4, atol=1e-6)


def test_step_gradient_branches_by_hand():
    # 2-bit weights, s = 0.2, one weight per branch: w/s = -3 (clipped low: -Q_N = -2), 0.6 (inside:
    # round(0.6) - 0.6 = 0.4), 2 (clipped high: Q_P = 1). N = 3, Q_P = 1: g = 1/sqrt(3).
    w = jnp.asarray([-0.6, 0.12, 0.4], F32)
    g = jax.grad(lambda p: jnp.sum(M.quantize_weight(p, w, 2)))({"step": jnp.float32(0.2)})
    np.testing.assert_allclose(float(g["step"]), (-2 + 0.4 + 1) / np.sqrt(3.0), rtol=1e-5)


@pytest.mark.parametrize("bits", BITS)
def test_init_rule(bits):
    rng = np.random.default_rng(bits)
    w = rng.normal(0.01, 0.1, (3, 3, 8, 16)).astype(np.float32)
    x = np.maximum(rng.normal(0.3, 1.0, (4, 5, 5, 8)), 0).astype(np.float32)
    sw = M.init_weight(jnp.asarray(w), bits)["step"]
    sa = M.init_activation(jnp.asarray(x), bits)["step"]
    assert sw.shape == () and sw.dtype == F32 and sa.shape == () and sa.dtype == F32
    mean_w, mean_x = np.abs(w.astype(np.float64)).mean(), np.abs(x.astype(np.float64)).mean()
    np.testing.assert_allclose(float(sw), 2 * mean_w / np.sqrt(2 ** (bits - 1) - 1), rtol=1e-5)
    np.testing.assert_allclose(float(sa), 2 * mean_x / np.sqrt(2**bits - 1), rtol=1e-5)


def test_zero_init_and_non_positive_step_stay_finite():
    # An all-zero tensor initialises the step to 0: the quantizer uses the floor and stays finite.
    zeros = jnp.zeros((4, 3), F32)
    p = M.init_weight(zeros, 4)
    assert float(p["step"]) == 0.0
    out, grads = jax.value_and_grad(lambda p, v: jnp.sum(M.quantize_weight(p, v, 4)), argnums=(0, 1))(p, zeros)
    assert float(out) == 0.0 and np.isfinite(float(grads[0]["step"])) and np.all(np.isfinite(np.asarray(grads[1])))
    # A negative step (an optimizer overshoot): every nonzero weight is clipped at the floor, so eq. 3 gives
    # -Q_N or Q_P per weight, and that gradient reaches the raw step unchanged (training can move it back up).
    w = jnp.asarray([-0.3, -0.1, 0.0, 0.2, 0.5], F32)
    c = np.array([1.0, 2.0, 3.0, -1.0, 0.5])
    out = M.quantize_weight({"step": jnp.float32(-0.1)}, w, 3)
    assert np.all(np.abs(np.asarray(out)) <= 4 * MIN_STEP * 1.001)
    g = jax.grad(lambda p: jnp.sum(jnp.asarray(c, F32) * M.quantize_weight(p, w, 3)))({"step": jnp.float32(-0.1)})
    expected = (1.0 * -4 + 2.0 * -4 + 3.0 * 0 + -1.0 * 3 + 0.5 * 3) / np.sqrt(5 * 3)
    np.testing.assert_allclose(float(g["step"]), expected, rtol=1e-5)


@pytest.mark.parametrize("bits", (2, 4, 8))
def test_bfloat16_equals_float32_then_cast(bits):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(0, 0.1, (3, 3, 4, 8)), BF16)
    x = jnp.asarray(np.maximum(rng.normal(0.2, 1, (2, 4, 4, 4)), 0), BF16)
    pw = M.init_weight(w, bits)
    pa = M.init_activation(x, bits)
    assert float(pw["step"]) == float(M.init_weight(w.astype(F32), bits)["step"])
    assert float(pa["step"]) == float(M.init_activation(x.astype(F32), bits)["step"])
    for fn, p, v in ((M.quantize_weight, pw, w), (M.quantize_activation, pa, x)):
        got = fn(p, v, bits)
        ref = fn(p, v.astype(F32), bits).astype(BF16)
        assert got.dtype == BF16
        np.testing.assert_array_equal(np.asarray(got.astype(F32)), np.asarray(ref.astype(F32)))
        # bfloat16-representable cotangents, so the bfloat16 output's cotangent is the same as the float32 one's
        c = jnp.asarray(rng.normal(size=v.shape), BF16).astype(F32)
        gp16, gv16 = jax.grad(lambda p, v: jnp.sum(c * fn(p, v, bits).astype(F32)), argnums=(0, 1))(p, v)
        gp32, gv32 = jax.grad(lambda p, v: jnp.sum(c * fn(p, v, bits)), argnums=(0, 1))(p, v.astype(F32))
        assert gv16.dtype == BF16
        np.testing.assert_array_equal(np.asarray(gv16.astype(F32)), np.asarray(gv32.astype(BF16).astype(F32)))
        np.testing.assert_allclose(float(gp16["step"]), float(gp32["step"]), rtol=1e-6)


def test_jit_equals_no_jit():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(0, 0.1, (3, 3, 4, 8)), F32)
    x = jnp.asarray(np.maximum(rng.normal(0.2, 1, (2, 4, 4, 4)), 0), F32)
    for bits in (2, 4):
        for fn, init, v in ((M.quantize_weight, M.init_weight, w), (M.quantize_activation, M.init_activation, x)):
            p = init(v, bits)
            loss = lambda p, v: jnp.sum(jnp.sin(fn(p, v, bits)))
            jitted = jax.jit(lambda p, v: fn(p, v, bits))(p, v)
            np.testing.assert_array_equal(np.asarray(jitted), np.asarray(fn(p, v, bits)))
            g_jit = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, v)
            g = jax.grad(loss, argnums=(0, 1))(p, v)
            np.testing.assert_allclose(float(g_jit[0]["step"]), float(g[0]["step"]), rtol=1e-6)
            np.testing.assert_array_equal(np.asarray(g_jit[1]), np.asarray(g[1]))
            p_jit = jax.jit(lambda v: init(v, bits))(v)
            np.testing.assert_allclose(float(p_jit["step"]), float(p["step"]), rtol=1e-6)


@pytest.mark.parametrize("bits", [0, 1, 9, 32, 2.0, True, "4", None])
def test_bad_bits_raise(bits):
    w = jnp.ones((2, 2), F32)
    with pytest.raises(ValueError, match="lsq: bits must be an int in 2..8"):
        M.check_bits(bits)
    with pytest.raises(ValueError, match="bits"):
        M.init_weight(w, bits)
    with pytest.raises(ValueError, match="bits"):
        M.quantize_weight({"step": jnp.float32(0.1)}, w, bits)
    with pytest.raises(ValueError, match="bits"):
        M.quantize_activation({"step": jnp.float32(0.1)}, w, bits)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="scalar"):
        M.quantize_weight({"step": jnp.ones((2,), F32)}, jnp.ones((2, 2), F32), 4)
    with pytest.raises(ValueError, match="floating"):
        M.init_weight(jnp.ones((2, 2), jnp.int32), 4)
    with pytest.raises(ValueError, match="batch axis"):
        M.quantize_activation({"step": jnp.float32(0.1)}, jnp.ones((4,), F32), 4)
