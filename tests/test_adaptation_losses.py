"""Tests of the DANN/DSAN numerics (alignq_jax.adaptation_losses) against independent numpy implementations that
follow the official formulas step by step (docs/method.md §10), and against invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax import adaptation_losses as al

K = 6  # classes in the LMMD tests
# Jitted once per shape: eager calls dispatch (and compile) every small op separately, which is slower.
lmmd_jit = jax.jit(al.lmmd, static_argnums=4)
weights_jit = jax.jit(al.lmmd_weights, static_argnums=2)


# ---------------------------------------------------------------------------------------------------------------
# Independent numpy references (float64), written the way the official code computes them.


def np_kernel(source, target, kernel_mul=2.0, kernel_num=5, fix_sigma=None):
    total = np.concatenate([source, target], axis=0).astype(np.float64)
    n = total.shape[0]
    total0 = np.broadcast_to(total[None, :, :], (n, n, total.shape[1]))
    total1 = np.broadcast_to(total[:, None, :], (n, n, total.shape[1]))
    l2 = ((total0 - total1) ** 2).sum(2)
    bandwidth = fix_sigma if fix_sigma else l2.sum() / (n**2 - n)
    bandwidth /= kernel_mul ** (kernel_num // 2)
    return sum(np.exp(-l2 / (bandwidth * kernel_mul**i)) for i in range(kernel_num)), l2, bandwidth


def np_weights(source_labels, target_probs, num_classes):
    """Per-class loop, as the official weight function: one-hot / column sum (0 -> 100), common classes only."""
    bs, bt = len(source_labels), len(target_probs)
    s_vec = np.eye(num_classes)[np.asarray(source_labels)]
    s_sum = s_vec.sum(0).reshape(1, num_classes)
    s_sum[s_sum == 0] = 100
    s_vec = s_vec / s_sum
    t_sca = np.asarray(target_probs).argmax(1)
    t_vec = np.asarray(target_probs, np.float64)
    t_sum = t_vec.sum(0).reshape(1, num_classes)
    t_sum[t_sum == 0] = 100
    t_vec = t_vec / t_sum
    w_ss, w_tt, w_st = np.zeros((bs, bs)), np.zeros((bt, bt)), np.zeros((bs, bt))
    count = 0
    for c in range(num_classes):
        if c in set(np.asarray(source_labels).tolist()) and c in set(t_sca.tolist()):
            sc, tc = s_vec[:, c : c + 1], t_vec[:, c : c + 1]
            w_ss += sc @ sc.T
            w_tt += tc @ tc.T
            w_st += sc @ tc.T
            count += 1
    if count:
        return w_ss / count, w_tt / count, w_st / count
    return np.zeros((bs, bs)), np.zeros((bt, bt)), np.zeros((bs, bt))


def np_lmmd(xs, xt, ys, pt, num_classes, **kw):
    kernel, _, _ = np_kernel(xs, xt, **kw)
    w_ss, w_tt, w_st = np_weights(ys, pt, num_classes)
    bs = len(xs)
    return np.sum(w_ss * kernel[:bs, :bs]) + np.sum(w_tt * kernel[bs:, bs:]) - 2 * np.sum(w_st * kernel[:bs, bs:])


def np_lmmd_grad(xs, xt, ys, pt, num_classes, kernel_mul=2.0, kernel_num=5):
    """Analytic gradient with the bandwidth and the weights held constant:
    d/dz_a sum_ij M_ij K_ij = sum_j (M_aj + M_ja) * sum_k (-exp(-L2_aj/bw_k)/bw_k) * 2 (z_a - z_j)."""
    z = np.concatenate([xs, xt]).astype(np.float64)
    _, l2, bw = np_kernel(xs, xt, kernel_mul, kernel_num)
    w_ss, w_tt, w_st = np_weights(ys, pt, num_classes)
    m = np.block([[w_ss, -w_st], [-w_st.T, w_tt]])
    dk_dl2 = sum(-np.exp(-l2 / (bw * kernel_mul**i)) / (bw * kernel_mul**i) for i in range(kernel_num))
    coef = (m + m.T) * dk_dl2
    grad = 2 * (coef.sum(1)[:, None] * z - coef @ z)
    return grad[: len(xs)], grad[len(xs) :]


def make_batch(seed, bs, bt, source_classes, target_argmax, f=5):
    """Features, source labels drawn from source_classes, target probabilities whose argmax is drawn from
    target_argmax."""
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(bs, f)).astype(np.float32)
    xt = (rng.normal(size=(bt, f)) + 0.5).astype(np.float32)
    ys = rng.choice(source_classes, size=bs).astype(np.int32)
    top = rng.choice(target_argmax, size=bt)
    logits = rng.normal(size=(bt, K)) + 6.0 * np.eye(K)[top]
    pt = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return xs, xt, ys, pt.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Gradient reversal


def test_gradient_reversal_forward_identity_and_backward():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    assert np.array_equal(al.gradient_reversal(x, 0.7), x)
    g = jax.grad(lambda x: jnp.sum(w * al.gradient_reversal(x, 0.7)))(x)
    np.testing.assert_allclose(g, -0.7 * np.asarray(w), rtol=1e-6)
    out, vjp = jax.vjp(lambda x: al.gradient_reversal(x, 0.25), x)
    (gx,) = vjp(w)
    assert np.array_equal(out, x)
    np.testing.assert_allclose(gx, -0.25 * np.asarray(w), rtol=1e-6)


def test_gradient_reversal_chain_rule_and_traced_coefficient_under_jit():
    # d/dx sum(sin(grl(x^2))) = -c * cos(x^2) * 2x, with c a traced argument of a jitted function.
    x = jnp.linspace(-1.0, 1.0, 7)

    @jax.jit
    def grad_fn(x, c):
        return jax.grad(lambda x: jnp.sum(jnp.sin(al.gradient_reversal(x * x, c))))(x)

    for c in (0.0, 0.3, 1.0):
        np.testing.assert_allclose(grad_fn(x, jnp.float32(c)), -c * np.cos(np.asarray(x) ** 2) * 2 * np.asarray(x),
                                   rtol=1e-5, atol=1e-7)
    # No gradient flows into the coefficient.
    dc = jax.grad(lambda c: jnp.sum(al.gradient_reversal(x, c) ** 2), argnums=0)(jnp.float32(0.5))
    assert float(dc) == 0.0


def test_gradient_reversal_vmap_per_example_coefficient_and_pytree():
    x = jnp.arange(6.0).reshape(3, 2)
    c = jnp.array([0.0, 0.5, 2.0])
    g = jax.vmap(jax.grad(lambda xi, ci: jnp.sum(al.gradient_reversal(xi, ci) * 3.0)))(x, c)
    np.testing.assert_allclose(g, -3.0 * np.asarray(c)[:, None] * np.ones((3, 2)))
    tree = {"a": x, "b": jnp.ones(4)}
    gt = jax.grad(lambda t: sum(jnp.sum(v) for v in al.gradient_reversal(t, 2.0).values()))(tree)
    np.testing.assert_allclose(gt["a"], -2.0 * np.ones((3, 2)))
    np.testing.assert_allclose(gt["b"], -2.0 * np.ones(4))


def test_gradient_reversal_bfloat16_gradient_dtype():
    x = jnp.asarray([0.5, -1.25, 3.0], jnp.bfloat16)
    y = al.gradient_reversal(x, jnp.float32(0.5))
    assert y.dtype == jnp.bfloat16 and np.array_equal(np.asarray(y, np.float32), np.asarray(x, np.float32))
    g = jax.grad(lambda x: jnp.sum(al.gradient_reversal(x, jnp.float32(0.5)).astype(jnp.float32) * 4.0))(x)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g, np.float32), [-2.0, -2.0, -2.0])


def test_gradient_reversal_refuses_non_scalar_coefficient():
    with pytest.raises(ValueError, match="coefficient must be a scalar"):
        al.gradient_reversal(jnp.ones(3), jnp.ones(3))


# ---------------------------------------------------------------------------------------------------------------
# Schedule


@pytest.mark.parametrize("p", [0.0, 0.05, 0.37, 0.5, 0.9, 1.0])
def test_dann_coefficient_matches_numpy(p):
    np.testing.assert_allclose(al.dann_coefficient(p), 2 / (1 + np.exp(-10 * p)) - 1, rtol=1e-6, atol=1e-7)
    official = 2.0 / (1.0 + np.exp(-10 * p) + 1e-6) - 1
    np.testing.assert_allclose(al.dann_coefficient(p, denominator_eps=1e-6), official, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jax.jit(al.dann_coefficient)(jnp.float32(p)), al.dann_coefficient(p), rtol=1e-7)


def test_dann_coefficient_endpoints_and_range_check():
    assert float(al.dann_coefficient(0.0)) == 0.0
    assert float(al.dann_coefficient(0.0, denominator_eps=1e-6)) < 0  # the official value at p = 0 is -5e-7
    np.testing.assert_allclose(al.dann_coefficient(1.0), np.tanh(5.0), rtol=1e-7)
    with pytest.raises(ValueError, match=r"progress must be in \[0, 1\]"):
        al.dann_coefficient(1.5)


def test_training_progress_dann_loop_with_max_nominal_length():
    # Official DANN: N = max(len src, len tgt) in the formula, min of them iterations per epoch, i from 1.
    epochs, n_src, n_tgt = 3, 7, 4
    nominal, run = max(n_src, n_tgt), min(n_src, n_tgt)
    expected = [(nominal * e + i) / (epochs * nominal) for e in range(epochs) for i in range(1, run + 1)]
    fn = jax.jit(lambda s: al.training_progress(s, run, epochs, offset=1, nominal_steps_per_epoch=nominal))
    got = [float(fn(jnp.int32(s))) for s in range(len(expected))]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_training_progress_dsan_loop_from_zero_and_dann_ends_at_one():
    epochs, iters = 4, 5
    expected = [(iters * e + i) / (epochs * iters) for e in range(epochs) for i in range(iters)]
    got = [float(al.training_progress(s, iters, epochs, offset=0)) for s in range(len(expected))]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[0] == 0.0
    assert float(al.training_progress(epochs * iters - 1, iters, epochs, offset=1)) == 1.0


def test_training_progress_validation():
    with pytest.raises(ValueError, match="offset must be 0"):
        al.training_progress(0, 5, 2, offset=2)
    with pytest.raises(ValueError, match="nominal_steps_per_epoch must be >="):
        al.training_progress(0, 5, 2, offset=1, nominal_steps_per_epoch=3)
    with pytest.raises(ValueError, match="step must be a scalar integer"):
        al.training_progress(0.5, 5, 2, offset=1)


# ---------------------------------------------------------------------------------------------------------------
# Domain loss


def test_domain_adversarial_loss_is_sum_of_per_batch_means():
    rng = np.random.default_rng(3)
    ls, lt = rng.normal(size=(5, 2)), rng.normal(size=(3, 2))

    def log_softmax(z):
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    expected = -log_softmax(ls)[:, 0].mean() - log_softmax(lt)[:, 1].mean()
    got = al.domain_adversarial_loss(jnp.asarray(ls, jnp.float32), jnp.asarray(lt, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Multi-kernel Gaussian


@pytest.mark.parametrize("bs,bt", [(4, 4), (3, 5)])
def test_kernel_matches_numpy_and_is_scale_invariant(bs, bt):
    xs, xt, _, _ = make_batch(1, bs, bt, [0], [0])
    ref, _, _ = np_kernel(xs, xt)
    kernel_jit = jax.jit(al.multi_kernel_gaussian, static_argnames=("kernel_mul", "kernel_num", "fix_sigma"))
    got = kernel_jit(jnp.asarray(xs), jnp.asarray(xt))
    assert got.shape == (bs + bt, bs + bt) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)
    # The bandwidth follows the data: scaling every feature leaves the kernel unchanged.
    scaled = kernel_jit(jnp.asarray(3.0 * xs), jnp.asarray(3.0 * xt))
    np.testing.assert_allclose(scaled, got, rtol=2e-5, atol=1e-6)
    ref3, _, _ = np_kernel(xs, xt, kernel_mul=3.0, kernel_num=4, fix_sigma=2.5)
    got3 = kernel_jit(jnp.asarray(xs), jnp.asarray(xt), kernel_mul=3.0, kernel_num=4, fix_sigma=2.5)
    np.testing.assert_allclose(got3, ref3, rtol=2e-5, atol=1e-6)


def test_kernel_identical_rows_finite_value_and_gradient():
    # All rows identical: the data bandwidth is 0 and the official kernel is NaN; here every entry is kernel_num.
    x = jnp.ones((3, 4))
    k = al.multi_kernel_gaussian(x, x)
    np.testing.assert_array_equal(k, 5.0 * np.ones((6, 6)))
    weights = jnp.arange(36.0).reshape(6, 6)
    g = jax.jit(jax.grad(lambda a, b: jnp.sum(al.multi_kernel_gaussian(a, b) * weights), (0, 1)))(x, x)
    assert all(np.array_equal(gi, np.zeros((3, 4))) for gi in g)
    # Some rows identical (a source row repeated in the target): finite gradient.
    xs, xt, _, _ = make_batch(2, 4, 4, [0], [0])
    xt[1] = xs[2]
    grad_fn = jax.jit(jax.grad(lambda a, b: jnp.sum(al.multi_kernel_gaussian(a, b) ** 2), (0, 1)))
    g = grad_fn(jnp.asarray(xs), jnp.asarray(xt))
    assert all(np.isfinite(np.asarray(gi)).all() for gi in g)


def test_kernel_refuses_bad_arguments():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="fix_sigma must be > 0"):
        al.multi_kernel_gaussian(x, x, fix_sigma=0.0)
    with pytest.raises(ValueError, match="same feature size"):
        al.multi_kernel_gaussian(x, jnp.ones((2, 4)))


# ---------------------------------------------------------------------------------------------------------------
# LMMD

PATTERNS = {
    # name: (source classes, target argmax classes, batch sizes)
    "no_common_class": ([0, 1], [2, 3], (6, 6)),
    "one_common_class": ([0, 1, 2], [2, 4, 5], (8, 8)),
    "all_classes": (list(range(K)), list(range(K)), (12, 12)),
    "random_partial": ([0, 1, 3, 4], [1, 3, 4, 5], (8, 8)),
    "unequal_batches": ([0, 1, 2], [1, 2, 3], (5, 7)),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_lmmd_matches_numpy(name):
    src_classes, tgt_classes, (bs, bt) = PATTERNS[name]
    xs, xt, ys, pt = make_batch(sum(map(ord, name)), bs, bt, src_classes, tgt_classes)
    w_ref = np_weights(ys, pt, K)
    w_got = weights_jit(jnp.asarray(ys), jnp.asarray(pt), K)
    for a, b in zip(w_got, w_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    ref = np_lmmd(xs, xt, ys, pt, K)
    got = lmmd_jit(jnp.asarray(xs), jnp.asarray(xt), jnp.asarray(ys), jnp.asarray(pt), K)
    assert got.dtype == jnp.float32
    if name == "no_common_class":
        assert float(got) == 0.0 and ref == 0.0
    else:
        assert abs(ref) > 1e-3  # a case where the loss is not trivially 0
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    if name == "random_partial":  # jit == no-jit, once (eager calls are slow)
        eager = al.lmmd(jnp.asarray(xs), jnp.asarray(xt), jnp.asarray(ys), jnp.asarray(pt), K)
        np.testing.assert_allclose(eager, got, rtol=1e-5, atol=1e-7)


def test_lmmd_weights_zero_sum_replacement_and_one_common_class():
    # Source has classes 0 and 2, target argmax 2 and 3: class 2 alone is common (C = 1). Class 1 has a zero
    # source sum (replaced by 100, then masked).
    ys = np.array([0, 2, 2, 0])
    pt = np.array([[0.1, 0.0, 0.8, 0.1], [0.1, 0.0, 0.1, 0.8], [0.2, 0.0, 0.6, 0.2]], np.float32)
    w_ss, w_tt, w_st = weights_jit(jnp.asarray(ys), jnp.asarray(pt), 4)
    s2 = np.array([0, 0.5, 0.5, 0])
    t2 = pt[:, 2] / pt[:, 2].sum()
    np.testing.assert_allclose(w_ss, np.outer(s2, s2), rtol=1e-6)
    np.testing.assert_allclose(w_tt, np.outer(t2, t2), rtol=1e-6)
    np.testing.assert_allclose(w_st, np.outer(s2, t2), rtol=1e-6)


def test_lmmd_gradient_matches_analytic_with_constant_bandwidth_and_weights():
    xs, xt, ys, pt = make_batch(7, 6, 6, [0, 1, 2], [1, 2, 3])
    args = (jnp.asarray(xs), jnp.asarray(xt), jnp.asarray(ys), jnp.asarray(pt))
    gs, gt, gp = jax.jit(jax.grad(lambda a, b, y, p: al.lmmd(a, b, y, p, K), (0, 1, 3)))(*args)
    rs, rt = np_lmmd_grad(xs, xt, ys, pt, K)
    np.testing.assert_allclose(gs, rs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gt, rt, rtol=1e-4, atol=1e-6)
    assert np.array_equal(gp, np.zeros_like(pt))  # the weights carry no gradient


def test_lmmd_identical_features_zero_and_finite_gradient():
    # All features equal (bandwidth 0 in the official code, NaN kernel): value 0, gradient exactly 0.
    _, _, ys, pt = make_batch(4, 5, 5, [0, 1], [0, 1])
    x = jnp.full((5, 3), 0.25)
    value_and_grad = jax.jit(jax.value_and_grad(lambda a, b, y, p: al.lmmd(a, b, y, p, K), (0, 1)))
    val, grads = value_and_grad(x, x, jnp.asarray(ys), jnp.asarray(pt))
    assert abs(float(val)) < 1e-5
    assert all(np.array_equal(g, np.zeros((5, 3))) for g in grads)
    # Source and target batches equal, target probabilities one-hot of the source labels: LMMD = 0.
    xs, _, ys, _ = make_batch(5, 6, 6, [0, 1, 2], [0])
    onehot = np.eye(K, dtype=np.float32)[ys]
    val, grads = value_and_grad(jnp.asarray(xs), jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(onehot))
    assert abs(float(val)) < 1e-5 and all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_lmmd_swap_symmetry_with_one_hot_target_and_permutation_invariance():
    # With one-hot target probabilities, the roles of source and target are interchangeable.
    xs, xt, ys, _ = make_batch(6, 6, 6, [0, 1, 2, 3], [0])
    yt = np.random.default_rng(6).choice([1, 2, 3, 4], size=6).astype(np.int32)
    a = lmmd_jit(jnp.asarray(xs), jnp.asarray(xt), jnp.asarray(ys), jnp.asarray(np.eye(K, dtype=np.float32)[yt]), K)
    b = lmmd_jit(jnp.asarray(xt), jnp.asarray(xs), jnp.asarray(yt), jnp.asarray(np.eye(K, dtype=np.float32)[ys]), K)
    assert abs(float(a)) > 1e-3
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # Reordering the source batch (features with their labels) changes nothing.
    perm = np.random.default_rng(1).permutation(6)
    c = lmmd_jit(jnp.asarray(xs[perm]), jnp.asarray(xt), jnp.asarray(ys[perm]),
                jnp.asarray(np.eye(K, dtype=np.float32)[yt]), K)
    np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-7)


def test_lmmd_bfloat16_inputs_computed_in_float32():
    xs, xt, ys, pt = make_batch(8, 6, 6, [0, 1, 2], [1, 2])
    xs16, xt16, pt16 = (jnp.asarray(v, jnp.bfloat16) for v in (xs, xt, pt))
    got = lmmd_jit(xs16, xt16, jnp.asarray(ys), pt16, K)
    assert got.dtype == jnp.float32
    ref = np_lmmd(np.asarray(xs16, np.float32), np.asarray(xt16, np.float32), ys, np.asarray(pt16, np.float32), K)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    g = jax.jit(jax.grad(lambda a: al.lmmd(a, xt16, jnp.asarray(ys), pt16, K)))(xs16)
    assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()


def test_lmmd_refuses_bad_shapes_and_labels():
    x = jnp.ones((3, 2))
    p = jnp.full((3, K), 1.0 / K)
    with pytest.raises(ValueError, match="source_labels must be in"):
        al.lmmd(x, x, jnp.array([0, 1, K]), p, K)
    with pytest.raises(ValueError, match="target_probs must have shape"):
        al.lmmd(x, x, jnp.array([0, 1, 2]), jnp.ones((3, K + 1)), K)
    with pytest.raises(ValueError, match="source_labels must have shape"):
        al.lmmd(x, x, jnp.array([0, 1]), p, K)
