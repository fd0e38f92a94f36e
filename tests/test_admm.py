"""Reference tests for alignq_jax.admm (docs/method.md §5, worked example 3, and textbook ADMM §5.6)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtr

from alignq_jax.admm import ADMM, ADMMState

MU, RHO = 0.2, 0.3

# Worked example 3 (docs/method.md §5.4).
X3 = np.array([[0.5, -1.0, 1.2, 0.0], [-0.3, 0.4, 2.0, -1.5], [1.1, 0.9, -0.7, 0.6]])
D3_REF = np.array([[0.0361, 0.0119, -0.0479], [0.0119, -0.0479, 0.0361], [-0.0479, 0.0361, 0.0119]])
ZNEW3_REF = np.array([[0.1853, 0.1731, 0.1432], [0.1731, 0.1432, 0.1853], [0.1432, 0.1853, 0.1731]])
GNEW3_REF = np.array([[0.0552, 0.0516, 0.0427], [0.0516, 0.0427, 0.0552], [0.0427, 0.0552, 0.0516]])


# ----------------------------------------------------------------------------------------------
# independent float64 numpy implementations
# ----------------------------------------------------------------------------------------------
def _np_corr(x, eps=1e-5):
    m = np.asarray(x, np.float64).reshape(len(x), -1)
    ms = (m - m.mean(0)) / np.sqrt(m.var(0, ddof=1) + eps**2)
    return ms @ ms.T / m.shape[1]


def _example3_gap():
    return _np_corr(2.0 * (2.0 * ndtr(X3) - 1.0)) - _np_corr(X3)


def np_paper_penalty(d, z, g, mu=MU, rho=RHO):
    b = d.shape[0]
    zb, gb = z[:b, :b], g[:b, :b]
    r = d - zb
    return mu * np.mean(np.abs(zb)) + rho / 2 * np.sqrt(np.mean(r**2)) + np.mean(gb * np.abs(r))


def np_paper_update(d, z, g, mu=MU, rho=RHO):
    dim = z.shape[0]
    b = d.shape[0]
    dp = np.zeros((dim, dim))
    dp[:b, :b] = d
    v = dp + g / rho
    nv = np.linalg.norm(v)  # Frobenius
    z_new = (1 - (mu / rho) / nv) * v if nv > mu / rho else np.zeros_like(v)
    return z_new, g + rho * (dp - z_new)


def np_soft(v, t):
    return np.sign(v) * np.maximum(np.abs(v) - t, 0.0)


def np_text_penalty(d, z, g, mu=MU, rho=RHO):
    r = d - z
    return mu * np.mean(np.abs(z)) + np.mean(g * r) + rho / 2 * np.mean(r**2)


def np_text_update(d, z, g, mu=MU, rho=RHO):
    z_new = np_soft(d + g / rho, mu / rho)
    return z_new, g + rho * (d - z_new)


def _f32(a):
    return jnp.asarray(a, jnp.float32)


def _example3_state():
    return ADMMState(z=jnp.full((4, 4), 0.5, jnp.float32), gamma=jnp.full((4, 4), 0.1, jnp.float32))


# ----------------------------------------------------------------------------------------------
# paper mode: worked example 3
# ----------------------------------------------------------------------------------------------
def test_example3_gap_sanity():
    # guards the test's own numpy helper against docs/method.md §5.4's D
    np.testing.assert_allclose(_example3_gap(), D3_REF, atol=1e-4)


def test_paper_example3_penalty():
    admm = ADMM(mode="paper")  # defaults mu = 0.2, rho = 0.3
    d = _f32(_example3_gap())
    st = _example3_state()
    np.testing.assert_allclose(float(admm.penalty(d, st)), 0.225187, atol=1e-5)
    # per-term structure: 0.100000 (mu) + 0.075187 (rho/2 RMS) + 0.050000 (gamma |D-Z|)
    np.testing.assert_allclose(float(ADMM(mode="paper", mu=0.4).penalty(d, st)), 0.325187, atol=1e-5)
    np.testing.assert_allclose(float(ADMM(mode="paper", rho=0.6).penalty(d, st)), 0.300374, atol=1e-5)
    st2 = ADMMState(z=st.z, gamma=2 * st.gamma)
    np.testing.assert_allclose(float(admm.penalty(d, st2)), 0.275187, atol=1e-5)
    # same numbers when the gaps are a dict (a pytree of layers)
    st_dict = ADMMState(z={"l1": st.z}, gamma={"l1": st.gamma})
    np.testing.assert_allclose(float(admm.penalty({"l1": d}, st_dict)), 0.225187, atol=1e-5)


def test_paper_example3_update():
    admm = ADMM(mode="paper")
    d = _f32(_example3_gap())
    st = _example3_state()
    new = admm.update(d, st)
    assert isinstance(new, ADMMState)
    z_new, g_new = np.asarray(new.z), np.asarray(new.gamma)
    assert z_new.shape == (4, 4) and g_new.shape == (4, 4)
    # Z_new = shrink factor * V with docs/method.md §5.4's factor 0.501569 (= 1 - (mu/rho)/||V||_F, ||V||_F = 1.337531)
    v = np.full((4, 4), 0.1 / 0.3)
    v[:3, :3] += _example3_gap()
    np.testing.assert_allclose(z_new / v, 0.501569, atol=1e-5)
    np.testing.assert_allclose(z_new[:3, :3], ZNEW3_REF, atol=1e-4)
    np.testing.assert_allclose(z_new[3, :], 0.1672, atol=1e-4)
    np.testing.assert_allclose(z_new[:, 3], 0.1672, atol=1e-4)
    np.testing.assert_allclose(g_new[:3, :3], GNEW3_REF, atol=1e-4)
    np.testing.assert_allclose(g_new[3, :], 0.0498, atol=1e-4)
    np.testing.assert_allclose(g_new[:, 3], 0.0498, atol=1e-4)
    ez, eg = np_paper_update(_example3_gap(), np.full((4, 4), 0.5), np.full((4, 4), 0.1))
    np.testing.assert_allclose(z_new, ez, atol=1e-6)
    np.testing.assert_allclose(g_new, eg, atol=1e-6)


def test_paper_example3_with_module_gap():
    """End to end with the library's own correlation gap (docs/method.md §5.4)."""
    from alignq_jax.correlation import correlation_gap
    from alignq_jax.quantizers import cdf_align_activation

    x = _f32(X3)
    d = correlation_gap(x, cdf_align_activation(x, 2.0))
    admm = ADMM(mode="paper")
    np.testing.assert_allclose(float(admm.penalty(d, _example3_state())), 0.225187, atol=1e-5)
    new = admm.update(d, _example3_state())
    np.testing.assert_allclose(np.asarray(new.z)[:3, :3], ZNEW3_REF, atol=1e-4)
    np.testing.assert_allclose(np.asarray(new.gamma)[:3, :3], GNEW3_REF, atol=1e-4)


def test_paper_sparse_branch_gives_exact_zero():
    rng = np.random.default_rng(0)
    d = 1e-3 * rng.standard_normal((3, 3))
    st = ADMMState(z=jnp.full((4, 4), 0.5, jnp.float32), gamma=jnp.zeros((4, 4), jnp.float32))
    new = ADMM(mode="paper").update(_f32(d), st)
    assert np.all(np.asarray(new.z) == 0.0)
    dp = np.zeros((4, 4))
    dp[:3, :3] = d
    np.testing.assert_allclose(np.asarray(new.gamma), RHO * dp, atol=1e-7)


def test_paper_batch_larger_than_dim_raises():
    admm = ADMM(mode="paper")
    st = _example3_state()  # dim = 4
    d = jnp.zeros((5, 5), jnp.float32)
    with pytest.raises(ValueError):
        admm.penalty(d, st)
    with pytest.raises(ValueError):
        admm.update(d, st)


# ----------------------------------------------------------------------------------------------
# paper mode: init, pytrees, gradients, several steps
# ----------------------------------------------------------------------------------------------
def _gaps_tree(rng, sizes=(("conv1", 3), ("block", 4))):
    out = {}
    for name, b in sizes:
        a = 0.05 * rng.standard_normal((b, b))
        out[name] = (a + a.T) / 2
    return out


def test_paper_init():
    rng = np.random.default_rng(1)
    gaps = {k: _f32(v) for k, v in _gaps_tree(rng).items()}
    admm = ADMM(mode="paper")
    st = admm.init(gaps, key=jax.random.PRNGKey(0), dim=6)
    assert isinstance(st, ADMMState)
    assert set(st.z) == set(gaps) and set(st.gamma) == set(gaps)
    for k in gaps:
        for leaf in (st.z[k], st.gamma[k]):
            leaf = np.asarray(leaf)
            assert leaf.shape == (6, 6)
            assert leaf.min() >= 0.0 and leaf.max() < 1.0
            assert leaf.std() > 0.1  # U[0,1) has std 0.289
        assert not np.allclose(np.asarray(st.z[k]), np.asarray(st.gamma[k]))
    assert not np.allclose(np.asarray(st.z["conv1"]), np.asarray(st.z["block"]))
    assert not np.allclose(np.asarray(st.gamma["conv1"]), np.asarray(st.gamma["block"]))
    # deterministic in the key, and the key matters
    st_again = admm.init(gaps, key=jax.random.PRNGKey(0), dim=6)
    np.testing.assert_array_equal(np.asarray(st_again.z["block"]), np.asarray(st.z["block"]))
    st_other = admm.init(gaps, key=jax.random.PRNGKey(1), dim=6)
    assert not np.allclose(np.asarray(st_other.z["block"]), np.asarray(st.z["block"]))


def test_paper_init_requires_key_and_dim():
    admm = ADMM(mode="paper")
    gaps = {"a": jnp.zeros((3, 3), jnp.float32)}
    with pytest.raises(ValueError):
        admm.init(gaps, dim=4)
    with pytest.raises(ValueError):
        admm.init(gaps, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError):
        admm.init(gaps)


@pytest.mark.parametrize("mu,rho", [(MU, RHO), (0.05, 1.3)])
def test_paper_steps_vs_numpy(mu, rho):
    """Three penalty/update iterations from a random init, two layers of different batch size."""
    rng = np.random.default_rng(2)
    admm = ADMM(mode="paper", mu=mu, rho=rho)
    gaps0 = {k: _f32(v) for k, v in _gaps_tree(rng).items()}
    st = admm.init(gaps0, key=jax.random.PRNGKey(3), dim=5)
    z = {k: np.asarray(v, np.float64) for k, v in st.z.items()}
    g = {k: np.asarray(v, np.float64) for k, v in st.gamma.items()}
    for _ in range(3):
        gaps = _gaps_tree(rng)
        expected_pen = sum(np_paper_penalty(gaps[k], z[k], g[k], mu, rho) for k in gaps)
        gj = {k: _f32(v) for k, v in gaps.items()}
        np.testing.assert_allclose(float(admm.penalty(gj, st)), expected_pen, rtol=1e-5, atol=1e-6)
        st = admm.update(gj, st)
        for k in gaps:
            z[k], g[k] = np_paper_update(gaps[k], z[k], g[k], mu, rho)
            np.testing.assert_allclose(np.asarray(st.z[k]), z[k], atol=2e-5)
            np.testing.assert_allclose(np.asarray(st.gamma[k]), g[k], atol=2e-5)


def test_paper_penalty_gradients():
    """d penalty / dD matches the analytic derivative; z and gamma get no gradient (stop_gradient)."""
    rng = np.random.default_rng(4)
    d = 0.05 * rng.standard_normal((3, 3))
    z = rng.uniform(-0.2, 0.2, (4, 4))
    g = rng.uniform(-0.5, 0.5, (4, 4))
    st = ADMMState(z=_f32(z), gamma=_f32(g))
    admm = ADMM(mode="paper")
    grad = np.asarray(jax.grad(admm.penalty)(_f32(d), st))
    r = d - z[:3, :3]
    b2 = 9.0
    expected = RHO / 2 * r / (b2 * np.sqrt(np.mean(r**2))) + g[:3, :3] * np.sign(r) / b2
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)
    gst = jax.grad(lambda s: admm.penalty(_f32(d), s))(st)
    assert np.all(np.asarray(gst.z) == 0.0) and np.all(np.asarray(gst.gamma) == 0.0)


# ----------------------------------------------------------------------------------------------
# textbook mode
# ----------------------------------------------------------------------------------------------
def test_textbook_init_zeros():
    rng = np.random.default_rng(5)
    gaps = {k: _f32(v) for k, v in _gaps_tree(rng).items()}
    st = ADMM(mode="textbook").init(gaps)
    assert isinstance(st, ADMMState)
    for k, v in gaps.items():
        assert np.asarray(st.z[k]).shape == v.shape and np.asarray(st.gamma[k]).shape == v.shape
        assert np.all(np.asarray(st.z[k]) == 0.0) and np.all(np.asarray(st.gamma[k]) == 0.0)


def test_textbook_default_mode():
    st = ADMM().init({"a": jnp.ones((3, 3), jnp.float32)})
    assert np.asarray(st.z["a"]).shape == (3, 3) and np.all(np.asarray(st.z["a"]) == 0.0)


@pytest.mark.parametrize("mu,rho", [(MU, RHO), (0.15, 0.8)])
def test_textbook_penalty_and_update_vs_numpy(mu, rho):
    rng = np.random.default_rng(6)
    admm = ADMM(mode="textbook", mu=mu, rho=rho)
    gaps = {k: 0.5 * v for k, v in _gaps_tree(rng, (("a", 3), ("b", 5))).items()}
    z = {k: rng.uniform(-0.3, 0.3, v.shape) for k, v in gaps.items()}
    g = {k: rng.uniform(-0.3, 0.3, v.shape) for k, v in gaps.items()}
    st = ADMMState(z={k: _f32(v) for k, v in z.items()}, gamma={k: _f32(v) for k, v in g.items()})
    gj = {k: _f32(v) for k, v in gaps.items()}
    expected = sum(np_text_penalty(gaps[k], z[k], g[k], mu, rho) for k in gaps)
    np.testing.assert_allclose(float(admm.penalty(gj, st)), expected, rtol=1e-5, atol=1e-6)
    new = admm.update(gj, st)
    for k in gaps:
        ez, eg = np_text_update(gaps[k], z[k], g[k], mu, rho)
        assert np.any(ez != 0) and np.any(ez == 0)  # both branches of the soft threshold exercised
        np.testing.assert_allclose(np.asarray(new.z[k]), ez, atol=1e-6)
        np.testing.assert_allclose(np.asarray(new.gamma[k]), eg, atol=1e-6)
    # gradient w.r.t. D: (gamma + rho (D - Z)) / B^2; none w.r.t. the state
    grad = jax.grad(admm.penalty)(gj, st)
    for k in gaps:
        expected_g = (g[k] + rho * (gaps[k] - z[k])) / gaps[k].size
        np.testing.assert_allclose(np.asarray(grad[k]), expected_g, rtol=1e-5, atol=1e-7)
    gst = jax.grad(lambda s: admm.penalty(gj, s))(st)
    for leaf in jax.tree_util.tree_leaves(gst):
        assert np.all(np.asarray(leaf) == 0.0)


def test_textbook_example3_is_elementwise():
    """docs/method.md §5.4: elementwise soft thresholding S_{mu/rho}(V) of example 3 gives all zeros."""
    d = _example3_gap()
    st = ADMMState(z=jnp.full((3, 3), 0.5, jnp.float32), gamma=jnp.full((3, 3), 0.1, jnp.float32))
    new = ADMM(mode="textbook").update(_f32(d), st)
    assert np.all(np.asarray(new.z) == 0.0)
    np.testing.assert_allclose(np.asarray(new.gamma), 0.1 + RHO * d, atol=1e-6)


def test_textbook_converges_to_soft_threshold():
    """ADMM on min 0.5 mean((D - D0)^2) + mu mean|D| (D itself the free variable, one gradient step per
    iteration): Z -> S_mu(D0) elementwise and the primal residual D - Z -> 0."""
    d0 = np.array([[0.9, -0.5, 0.1], [-0.05, 0.3, -1.2], [0.15, -0.19, 0.6]])
    target = np_soft(d0, MU)
    assert np.any(target == 0) and np.any(target != 0)
    admm = ADMM(mode="textbook")
    d0j = _f32(d0)
    lr = 0.2 * d0.size  # per-entry step 0.2 (the loss is a mean over entries)

    def objective(d, st):
        return 0.5 * jnp.mean((d - d0j) ** 2) + admm.penalty(d, st)

    def step(carry, _):
        d, st = carry
        d = d - lr * jax.grad(objective)(d, st)
        return (d, admm.update(d, st)), None

    @jax.jit
    def run(d_init):
        (d, st), _ = jax.lax.scan(step, (d_init, admm.init(d_init)), None, length=300)
        return d, st

    d, st = run(jnp.zeros((3, 3), jnp.float32))
    z = np.asarray(st.z)
    np.testing.assert_allclose(z, target, atol=1e-3)
    assert np.abs(np.asarray(d) - z).max() < 1e-3
    np.testing.assert_array_equal(z == 0, target == 0)  # the sparsity pattern is exact


# ----------------------------------------------------------------------------------------------
# both modes: jit, errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["paper", "textbook"])
def test_jit_matches_eager(mode):
    rng = np.random.default_rng(7)
    admm = ADMM(mode=mode)
    gaps = {k: _f32(v) for k, v in _gaps_tree(rng).items()}
    key = jax.random.PRNGKey(11)
    if mode == "paper":
        init = functools.partial(admm.init, dim=4)
        st = init(gaps, key=key)
        st_j = jax.jit(lambda g, k: init(g, key=k))(gaps, key)
    else:
        st = admm.init(gaps)
        st_j = jax.jit(admm.init)(gaps)
    assert jax.tree_util.tree_structure(st_j) == jax.tree_util.tree_structure(st)
    for a, b in zip(jax.tree_util.tree_leaves(st_j), jax.tree_util.tree_leaves(st)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)
    if mode == "textbook":
        # start from a non-trivial state so that update/penalty are exercised
        st = ADMMState(
            z=jax.tree_util.tree_map(lambda a: 0.3 * jnp.ones_like(a) + 0.1 * a, st.z),
            gamma=jax.tree_util.tree_map(lambda a: -0.2 * jnp.ones_like(a), st.gamma),
        )
    np.testing.assert_allclose(
        float(jax.jit(admm.penalty)(gaps, st)), float(admm.penalty(gaps, st)), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(
        np.asarray(jax.jit(jax.grad(admm.penalty))(gaps, st)["block"]),
        np.asarray(jax.grad(admm.penalty)(gaps, st)["block"]),
        rtol=1e-5,
        atol=1e-7,
    )
    new_j = jax.jit(admm.update)(gaps, st)
    new = admm.update(gaps, st)
    assert isinstance(new_j, ADMMState)
    for a, b in zip(jax.tree_util.tree_leaves(new_j), jax.tree_util.tree_leaves(new)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "admm"},
        {"mode": "Paper2022"},
        {"mu": 0.0},
        {"mu": -0.2},
        {"rho": 0.0},
        {"rho": -0.3},
        {"mode": "paper", "rho": 0.0},
    ],
)
def test_invalid_config_raises(kwargs):
    with pytest.raises(ValueError):
        ADMM(**kwargs)


# ----------------------------------------------------------------------------------------------
# dtypes: the state is float32 whatever the gaps' dtype
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["paper", "textbook"])
def test_bfloat16_gaps_give_the_float32_state_and_updates(mode):
    """init/update/penalty from bfloat16 gaps equal those from the same values in float32, with a float32 state
    (a bfloat16 dual would round away rho*(D - Z) steps smaller than 2^-8 of Gamma)."""
    rng = np.random.default_rng(12)
    admm = ADMM(mode=mode)
    gaps32 = [{k: _f32(v) for k, v in _gaps_tree(rng).items()} for _ in range(30)]
    gaps32 = [jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), g) for g in gaps32]
    gaps16 = [jax.tree.map(lambda a: a.astype(jnp.bfloat16), g) for g in gaps32]
    kw = dict(key=jax.random.key(13), dim=5) if mode == "paper" else {}
    st16, st32 = admm.init(gaps16[0], **kw), admm.init(gaps32[0], **kw)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(st16))
    for g16, g32 in zip(gaps16, gaps32):
        np.testing.assert_array_equal(admm.penalty(g16, st16), admm.penalty(g32, st32))
        st16, st32 = admm.update(g16, st16), admm.update(g32, st32)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(st16))
        for a, b in zip(jax.tree.leaves(st16), jax.tree.leaves(st32)):
            np.testing.assert_array_equal(a, b)
    # The penalty's gradient flows back to the bf16 gaps in their own dtype.
    grads = jax.grad(admm.penalty)(gaps16[0], st16)
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))


def test_textbook_dual_keeps_accumulating_small_steps():
    """Dual steps of rho * 1e-3 on Gamma = 1 accumulate (in bfloat16, 1 + 3e-4 rounds back to 1)."""
    admm = ADMM(mode="textbook", mu=1e3, rho=RHO)  # large mu keeps Z at 0, so Gamma += rho * D each step
    d = jnp.full((2, 2), 1e-3, jnp.bfloat16)
    st = admm.init(d)
    st = st._replace(gamma=st.gamma + 1.0)
    for _ in range(50):
        st = admm.update(d, st)
    np.testing.assert_allclose(np.asarray(st.gamma), 1.0 + 50 * RHO * float(d[0, 0]), rtol=1e-5)
