"""The data-driven ("mse") start of PACT's and APoT's learned clips: the chosen clip minimises the quantization
error over the candidate grid (checked against float64 numpy written here, independent of the library), the
2-bit outputs keep far more non-zero values than with the papers' constants, zero tensors and bad options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax.methods import get_method
from alignq_jax.methods.apot import APoT, apot_levels
from alignq_jax.methods.base import MSE_CANDIDATES, mse_clip
from alignq_jax.methods.pact import PACT


def _relu_batch(seed, shape=(16, 6, 6, 8)):
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(0.0, 1.0, shape), 0.0).astype(np.float32)


def _numpy_pact(x, a, bits):
    n = 2.0**bits - 1.0
    return np.round(np.clip(x, 0.0, a) * n / a) * a / n


def _numpy_project(v, levels):
    """Nearest level of each v (a tie goes to the smaller level), float64."""
    levels = np.sort(levels)
    d = np.abs(v[..., None] - levels)
    return levels[np.argmin(d, axis=-1)]


def _numpy_apot_activation(x, a, bits):
    return a * _numpy_project(np.clip(x / a, 0.0, 1.0), apot_levels(bits, signed=False))


def _numpy_standardise(w):
    return (w - w.mean()) / w.std(ddof=1)


def _numpy_apot_weight(w, a, bits):
    v = _numpy_standardise(w) / a
    return a * np.sign(v) * _numpy_project(np.minimum(np.abs(v), 1.0), apot_levels(bits - 1, signed=False))


def _assert_is_grid_minimiser(alpha, error_at, top):
    """alpha is on the grid top*j/K and no grid clip has a smaller error (float64, tolerance for float32)."""
    grid = top * np.arange(1, MSE_CANDIDATES + 1) / MSE_CANDIDATES
    assert np.min(np.abs(grid - alpha)) <= 1e-5 * top
    errors = np.array([error_at(c) for c in grid])
    assert error_at(alpha) <= errors.min() * (1 + 1e-4) + 1e-12


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pact_mse_init_is_the_error_minimising_grid_clip(bits):
    x = _relu_batch(bits)
    alpha = float(PACT(alpha_init="mse").init_activation(jnp.asarray(x), bits)["alpha"])
    x64 = x.astype(np.float64)
    _assert_is_grid_minimiser(alpha, lambda c: np.mean((_numpy_pact(x64, c, bits) - x64) ** 2), x64.max())


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_apot_activation_mse_init_is_the_error_minimising_grid_clip(bits):
    x = _relu_batch(10 + bits)
    m = APoT(activation_alpha_init="mse")
    alpha = float(m.init_activation(jnp.asarray(x), bits)["alpha"])
    x64 = x.astype(np.float64)
    _assert_is_grid_minimiser(alpha, lambda c: np.mean((_numpy_apot_activation(x64, c, bits) - x64) ** 2),
                              x64.max())


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_apot_weight_mse_init_is_the_error_minimising_grid_clip_on_the_standardised_kernel(bits):
    rng = np.random.default_rng(bits)
    w = (0.05 * rng.standard_t(5, (3, 3, 8, 16)) + 0.01).astype(np.float32)
    alpha = float(APoT(weight_alpha_init="mse").init_weight(jnp.asarray(w), bits)["alpha"])
    w64 = w.astype(np.float64)
    z = _numpy_standardise(w64)
    _assert_is_grid_minimiser(alpha, lambda c: np.mean((_numpy_apot_weight(w64, c, bits) - z) ** 2),
                              np.abs(z).max())
    # The library's quantizer at that threshold is the numpy one (same scale: standard deviations).
    got = APoT().quantize_weight({"alpha": jnp.float32(alpha)}, jnp.asarray(w), bits)
    np.testing.assert_allclose(np.asarray(got), _numpy_apot_weight(w64, alpha, bits), atol=1e-4)


def test_two_bit_mse_start_keeps_most_activations_off_the_zero_level():
    # The reason for the option: with the papers' constants (PACT 10, APoT 8) a 2-bit grid on ReLU(N(0, 1)) sends
    # most positive values to 0 (PACT: over 90%, APoT: about 70%); the MSE clip keeps the non-zero levels in use.
    x = jnp.asarray(_relu_batch(0, (32, 8, 8, 16)))
    positive = float(jnp.mean(x > 0))
    for paper, mse in ((PACT(), PACT(alpha_init="mse")),
                       (APoT(), APoT(activation_alpha_init="mse"))):
        nonzero = {}
        for name, m in (("paper", paper), ("mse", mse)):
            q = m.quantize_activation(m.init_activation(x, 2), x, 2)
            nonzero[name] = float(jnp.mean(q > 0))
        assert nonzero["paper"] < 0.35 * positive
        assert nonzero["mse"] > 0.6 * positive


def test_two_bit_apot_weights_mse_start_keeps_most_weights_nonzero():
    w = jax.random.normal(jax.random.key(0), (3, 3, 16, 16))
    paper, mse = APoT(), APoT(weight_alpha_init="mse")
    nonzero = {n: float(jnp.mean(m.quantize_weight(m.init_weight(w, 2), w, 2) != 0))
               for n, m in (("paper", paper), ("mse", mse))}
    assert nonzero["paper"] < 0.2 and nonzero["mse"] > 0.4


def test_mse_init_under_jit_equals_eager():
    x = jnp.asarray(_relu_batch(3))
    for m in (PACT(alpha_init="mse"), APoT(weight_alpha_init="mse", activation_alpha_init="mse")):
        for init in (m.init_activation, m.init_weight):
            if init == m.init_weight and isinstance(m, PACT):
                continue
            eager = init(x, 2)["alpha"]
            jitted = jax.jit(init, static_argnums=1)(x, 2)["alpha"]
            assert jitted.dtype == jnp.float32 and jitted.shape == ()
            np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))


def test_mse_clip_of_a_zero_tensor_is_one_and_has_no_gradient():
    x = jnp.zeros((4, 5))
    assert float(mse_clip(x, lambda c: jnp.clip(x, 0, c))) == 1.0
    assert float(PACT(alpha_init="mse").init_activation(x, 2)["alpha"]) == 1.0
    g = jax.grad(lambda s: mse_clip(s * jnp.arange(6.0), lambda c: jnp.clip(s * jnp.arange(6.0), 0, c)))(1.0)
    assert float(g) == 0.0


def test_mse_clip_custom_target_and_candidate_count():
    # "Quantizer" c -> c everywhere, target 0.75: of the grid 0.2, 0.4, ..., 2.0 (top 2, K = 10) the nearest is 0.8.
    x = jnp.asarray([0.0, -2.0])
    got = mse_clip(x, lambda c: jnp.full((2,), c), target=jnp.full((2,), 0.75), candidates=10)
    assert float(got) == pytest.approx(0.8)


@pytest.mark.parametrize("make", [
    lambda v: PACT(alpha_init=v),
    lambda v: APoT(weight_alpha_init=v),
    lambda v: APoT(activation_alpha_init=v),
])
@pytest.mark.parametrize("value", ["MSE", "max", "", 0.0, -2.0, float("nan"), True])
def test_bad_clip_init_raises(make, value):
    with pytest.raises(ValueError, match="positive finite number or 'mse'"):
        make(value)


def test_options_reach_the_methods_through_get_method():
    assert get_method("pact", alpha_init="mse") == PACT(alpha_init="mse")
    assert get_method("apot", activation_alpha_init="mse").activation_alpha_init == "mse"
