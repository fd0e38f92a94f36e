"""Domain-adaptation numerics for DANN and DSAN (docs/method.md §10): pure, model-free JAX functions.

* DANN: :func:`gradient_reversal` (identity forward, -coefficient * grad backward), the coefficient schedule
  :func:`dann_coefficient` of :func:`training_progress`, and the domain classifier's loss
  :func:`domain_adversarial_loss`.
* DSAN: :func:`multi_kernel_gaussian` (the summed Gaussian kernels over [source; target]) and :func:`lmmd`
  (local MMD with class-conditional weights from source labels and target pseudo-label probabilities).

Everything is jit-able with static shapes and works on bfloat16 inputs: kernels, weights and losses are
computed in float32 (float64 for float64 inputs) and returned in that dtype; gradients with respect to a
bfloat16 input come back in bfloat16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The official code divides each class column of the weights by its batch sum and replaces a zero sum by this
# value. Only classes absent from a batch have a zero sum, and those are masked out afterwards, so the value never
# reaches the loss; it only keeps 0/0 out of the masked columns.
_ZERO_SUM_REPLACEMENT = 100.0


def _compute_dtype(dtype):
    """float32 for float32 and narrower floats (bfloat16, float16), float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive Python int; got {value!r}")


# ----------------------------------------------------------------------------------------------------------------
# DANN: gradient reversal and its schedule


@jax.custom_vjp
def _reverse(x, coefficient):
    return x


def _reverse_fwd(x, coefficient):
    return x, coefficient


def _reverse_bwd(coefficient, g):
    def flip(gi):
        return (-coefficient * gi).astype(gi.dtype)

    # The coefficient is a schedule value, not a parameter: no gradient flows into it.
    return jax.tree.map(flip, g), jnp.zeros_like(coefficient)


_reverse.defvjp(_reverse_fwd, _reverse_bwd)


def gradient_reversal(x, coefficient):
    """Gradient-reversal layer of DANN (docs/method.md §10): identity forward, -coefficient * grad backward.

    Args:
      x: array of any shape, or a pytree of float arrays (e.g. (B, F) features).
      coefficient: scalar; a Python number or a traced value (e.g. :func:`dann_coefficient` of the step). Its
        own cotangent is zero: the schedule is not trained.
    Returns: x unchanged. Backward: the upstream gradient g becomes -coefficient * g, cast to g's dtype (a
      bfloat16 x gets a bfloat16 gradient).
    """
    c = jnp.asarray(coefficient)
    if c.ndim != 0:
        raise ValueError(f"coefficient must be a scalar; got shape {c.shape}")
    if not jnp.issubdtype(c.dtype, jnp.floating):
        c = c.astype(jnp.float32)
    return _reverse(x, c)


def dann_coefficient(progress, *, gamma=10.0, denominator_eps=0.0):
    """DANN schedule 2 / (1 + exp(-gamma * p) + denominator_eps) - 1 (docs/method.md §10).

    Equal to tanh(gamma * p / 2) for denominator_eps = 0: rises from 0 at p = 0 to 0.99991 at p = 1 (gamma = 10).
    ``denominator_eps = 1e-6`` reproduces the official code exactly; the default 0 is the published schedule
    (Ganin et al.), which is exactly 0 at p = 0 (the official value there is -5e-7, a reversed reversal) and
    differs from the official one by at most 2e-6 elsewhere.

    Args:
      progress: scalar training progress p in [0, 1], float, possibly traced (see :func:`training_progress`).
        A concrete value outside [0, 1] is refused; a traced one is not checked.
      gamma: steepness (10 in DANN and DSAN).
      denominator_eps: added to the denominator (official code: 1e-6).
    Returns: scalar, float32 (float64 for a float64 progress).
    """
    if _is_concrete(progress):
        p = float(progress)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"progress must be in [0, 1]; got {progress!r}")
    p = jnp.asarray(progress)
    p = p.astype(_compute_dtype(p.dtype))
    return 2.0 / (1.0 + jnp.exp(-gamma * p) + denominator_eps) - 1.0


def training_progress(step, steps_per_epoch, epochs, *, offset, nominal_steps_per_epoch=None):
    """Training progress p = (N * e + i) / (E * N) of the official DANN/DSAN loops (docs/method.md §10).

    With e = step // steps_per_epoch the epoch (from 0) and i = step % steps_per_epoch + offset the iteration
    within it: ``offset = 1`` is DANN (its loop counts iterations from 1), ``offset = 0`` is DSAN (from 0).
    N is ``nominal_steps_per_epoch`` (default ``steps_per_epoch``). The official DANN sets N = max(len source
    loader, len target loader) while its loop runs only min of them per epoch: pass the loop's length as
    ``steps_per_epoch`` and the max as ``nominal_steps_per_epoch`` to reproduce that (p then jumps at every
    epoch boundary and ends below 1).

    Args:
      step: 0-based index of the current optimisation step (steps done before it), int, possibly traced.
      steps_per_epoch: optimisation steps one epoch runs (static positive int).
      epochs: total epochs E (static positive int).
      offset: 1 (DANN) or 0 (DSAN); keyword-only and required, as the two methods differ.
      nominal_steps_per_epoch: N of the formula, >= steps_per_epoch (static positive int or None).
    Returns: scalar float32 p; in [0, 1] for steps before epochs * steps_per_epoch (a later step gives p > 1).
    """
    _check_positive_int(steps_per_epoch, "steps_per_epoch")
    _check_positive_int(epochs, "epochs")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset not in (0, 1):
        raise ValueError(f"offset must be 0 (DSAN: iterations from 0) or 1 (DANN: iterations from 1); got {offset!r}")
    n = steps_per_epoch if nominal_steps_per_epoch is None else nominal_steps_per_epoch
    _check_positive_int(n, "nominal_steps_per_epoch")
    if n < steps_per_epoch:
        raise ValueError(
            f"nominal_steps_per_epoch must be >= steps_per_epoch ({steps_per_epoch}); got {nominal_steps_per_epoch}"
        )
    step = jnp.asarray(step)
    if not jnp.issubdtype(step.dtype, jnp.integer) or step.ndim != 0:
        raise ValueError(f"step must be a scalar integer; got dtype {step.dtype}, shape {step.shape}")
    if _is_concrete(step) and int(step) < 0:
        raise ValueError(f"step must be >= 0; got {int(step)}")
    epoch = step // steps_per_epoch
    i = step % steps_per_epoch + offset
    return (n * epoch + i).astype(jnp.float32) / float(epochs * n)


def domain_cross_entropy(domain_logits, domain):
    """Mean cross-entropy of (B, 2) domain logits against one domain label (0 source, 1 target) for the batch.

    Returns: scalar, float32 (float64 for float64 logits).
    """
    if jnp.ndim(domain_logits) != 2 or jnp.shape(domain_logits)[1] != 2:
        raise ValueError(f"domain_logits must have shape (B, 2); got {jnp.shape(domain_logits)}")
    if domain not in (0, 1):
        raise ValueError(f"domain must be 0 (source) or 1 (target); got {domain!r}")
    logits = domain_logits.astype(_compute_dtype(domain_logits.dtype))
    return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, domain])


def domain_adversarial_loss(domain_logits_source, domain_logits_target):
    """DANN's domain loss CE(source -> 0) + CE(target -> 1), each the mean over its own batch (docs/method.md §10).

    The two batches go through the network separately in the official code, so the terms are two means summed
    (not one mean over the concatenation): equal weight to each domain whatever the batch sizes.

    Args:
      domain_logits_source: (Bs, 2) domain-classifier logits of the source batch (after the gradient reversal).
      domain_logits_target: (Bt, 2) the same for the target batch.
    Returns: scalar, float32 (float64 for float64 logits).
    """
    return domain_cross_entropy(domain_logits_source, 0) + domain_cross_entropy(domain_logits_target, 1)


# ----------------------------------------------------------------------------------------------------------------
# DSAN: multi-kernel Gaussian and local MMD


def _check_features(source, target):
    if jnp.ndim(source) != 2 or jnp.ndim(target) != 2:
        raise ValueError(
            f"source and target must be (B, F) feature matrices; got shapes {jnp.shape(source)} and {jnp.shape(target)}"
        )
    if source.shape[1] != target.shape[1]:
        raise ValueError(f"source and target must have the same feature size; got {source.shape} and {target.shape}")
    if source.shape[0] < 1 or target.shape[0] < 1:
        raise ValueError(f"source and target need at least one sample each; got {source.shape} and {target.shape}")


def multi_kernel_gaussian(source, target, *, kernel_mul=2.0, kernel_num=5, fix_sigma=None):
    """Sum of ``kernel_num`` Gaussian kernels over the rows of [source; target], as DSAN (docs/method.md §10).

    L2[a, b] = ||z_a - z_b||^2 for z = [source; target] (n = Bs + Bt rows). Base bandwidth
    bw = sum(L2) / (n^2 - n) (held constant: no gradient flows through it), or ``fix_sigma``; then
    bw /= kernel_mul ** (kernel_num // 2), and K = sum_i exp(-L2 / (bw * kernel_mul**i)), i = 0..kernel_num-1.

    Numerics: L2 is a sum of squared differences (no sqrt, no |a|^2 + |b|^2 - 2ab cancellation), so its gradient
    2 (z_a - z_b) is finite, and 0 on the diagonal and for identical rows. bw = 0 happens only when all rows are
    identical (all L2 are 0); every kernel entry is then exp(0) = 1 for any positive bandwidth, so bw = 1 is used
    there and the result is exact. With that, for finite inputs (whose squared distances are finite in float32)
    the kernel is finite and in [0, kernel_num] and never NaN: the official code's "return 0 when the kernel is
    NaN" has nothing left to catch, and is not reproduced. Memory: an (n, n, F) difference tensor.

    Args:
      source: (Bs, F) features; target: (Bt, F) features (the official code uses Bs = Bt = B, n = 2B).
      kernel_mul: ratio between consecutive bandwidths (> 0).
      kernel_num: number of kernels (positive int).
      fix_sigma: fixed base bandwidth (> 0) instead of the data one; still divided by
        kernel_mul ** (kernel_num // 2) as in the official code. (The official ``if fix_sigma:`` treats 0 as
        "not given"; here 0 or less is refused.)
    Returns: (n, n) symmetric kernel matrix, float32 (float64 for float64 inputs); blocks [:Bs, :Bs] source-source,
      [Bs:, Bs:] target-target, [:Bs, Bs:] source-target.
    """
    _check_features(source, target)
    _check_positive_int(kernel_num, "kernel_num")
    if not kernel_mul > 0:
        raise ValueError(f"kernel_mul must be > 0; got {kernel_mul!r}")
    if fix_sigma is not None and _is_concrete(fix_sigma) and not float(fix_sigma) > 0:
        raise ValueError(f"fix_sigma must be > 0 or None; got {fix_sigma!r}")
    dtype = _compute_dtype(jnp.promote_types(source.dtype, target.dtype))
    total = jnp.concatenate([source.astype(dtype), target.astype(dtype)], axis=0)
    n = total.shape[0]
    diff = total[:, None, :] - total[None, :, :]
    l2 = jnp.sum(diff * diff, axis=-1)
    if fix_sigma is None:
        bandwidth = jnp.sum(jax.lax.stop_gradient(l2)) / (n * n - n)
        # bw == 0 iff every L2 is 0, where every kernel entry is 1 whatever the bandwidth (see docstring).
        bandwidth = jnp.where(bandwidth > 0, bandwidth, jnp.ones_like(bandwidth))
    else:
        bandwidth = jax.lax.stop_gradient(jnp.asarray(fix_sigma, dtype))
    bandwidth = bandwidth / kernel_mul ** (kernel_num // 2)
    return sum(jnp.exp(-l2 / (bandwidth * kernel_mul**i)) for i in range(kernel_num))


def lmmd_weights(source_labels, target_probs, num_classes):
    """Class-conditional weights W_ss (Bs, Bs), W_tt (Bt, Bt), W_st (Bs, Bt) of DSAN's LMMD (docs/method.md §10).

    s = one-hot source labels, t = target probabilities, each class column divided by its batch sum (a zero sum
    replaced by 100, as the official code does). Only the C classes present both among the source labels and
    the target argmax are kept (the other columns are zeroed); W_ss = s s^T / C, W_tt = t t^T / C,
    W_st = s t^T / C, all zero when C = 0. Computed without gradient (the official code uses numpy): the result
    is stop_gradient'ed.

    Ties in a target row's argmax go to the lowest class index (jnp.argmax). A traced source label outside
    [0, num_classes) gets an all-zero one-hot row (the sample takes no part); a concrete one is refused.

    Args:
      source_labels: (Bs,) int class labels.
      target_probs: (Bt, num_classes) probabilities (softmax of the classifier on the target batch).
      num_classes: K (static positive int).
    Returns: (W_ss, W_tt, W_st), float32 (float64 for float64 probabilities).
    """
    _check_positive_int(num_classes, "num_classes")
    label_dtype = jnp.asarray(source_labels).dtype
    if jnp.ndim(source_labels) != 1 or jnp.shape(source_labels)[0] < 1 or not jnp.issubdtype(label_dtype, jnp.integer):
        raise ValueError(
            f"source_labels must be a (B,) integer array with B >= 1; got shape {jnp.shape(source_labels)}, "
            f"dtype {label_dtype}"
        )
    if jnp.ndim(target_probs) != 2 or jnp.shape(target_probs)[1] != num_classes:
        raise ValueError(f"target_probs must have shape (B, num_classes={num_classes}); got {jnp.shape(target_probs)}")
    if _is_concrete(source_labels):
        lo, hi = int(jnp.min(source_labels)), int(jnp.max(source_labels))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"source_labels must be in [0, {num_classes}); got values from {lo} to {hi}")
    dtype = _compute_dtype(target_probs.dtype)
    source_labels = jax.lax.stop_gradient(source_labels)
    target_probs = jax.lax.stop_gradient(target_probs).astype(dtype)

    s = jax.nn.one_hot(source_labels, num_classes, dtype=dtype)
    t = target_probs
    s_present = jnp.sum(s, axis=0) > 0
    t_present = jnp.sum(jax.nn.one_hot(jnp.argmax(t, axis=1), num_classes, dtype=dtype), axis=0) > 0
    mask = (s_present & t_present).astype(dtype)
    count = jnp.sum(mask)

    def normalise(v):
        col = jnp.sum(v, axis=0)
        return v / jnp.where(col == 0, _ZERO_SUM_REPLACEMENT, col)

    s = normalise(s) * mask
    t = normalise(t) * mask
    # With C = 0 every column is masked, so the weights are already zero; max(C, 1) only avoids 0/0.
    denom = jnp.maximum(count, 1.0)
    return s @ s.T / denom, t @ t.T / denom, s @ t.T / denom


def lmmd(source_features, target_features, source_labels, target_probs, num_classes, *, kernel_mul=2.0,
         kernel_num=5, fix_sigma=None):
    """Local MMD of DSAN (docs/method.md §10): sum(W_ss*K_ss + W_tt*K_tt - 2*W_st*K_st).

    K is :func:`multi_kernel_gaussian` over [source; target] (its bandwidth held constant), the weights are
    :func:`lmmd_weights` (no gradient: neither the labels nor the probabilities receive one from this loss;
    the gradient flows into the features only). 0 exactly when no class is present both among the source labels
    and the target argmax. Never NaN for finite features (see :func:`multi_kernel_gaussian`): the official code's
    NaN check has no case left and is not reproduced.

    Args:
      source_features: (Bs, F) float, e.g. the bottleneck output on the source batch.
      target_features: (Bt, F) float, the same on the target batch.
      source_labels: (Bs,) int labels in [0, num_classes).
      target_probs: (Bt, num_classes) softmax probabilities of the target batch.
      num_classes: K (static positive int).
      kernel_mul, kernel_num, fix_sigma: as in :func:`multi_kernel_gaussian`.
    Returns: scalar, float32 (float64 for float64 features and probabilities); bfloat16 inputs are cast to
      float32 first.
    """
    _check_features(source_features, target_features)
    bs = source_features.shape[0]
    if jnp.shape(source_labels) != (bs,):
        raise ValueError(
            f"source_labels must have shape ({bs},) to match source_features; got {jnp.shape(source_labels)}"
        )
    if jnp.shape(target_probs)[:1] != target_features.shape[:1]:
        raise ValueError(
            f"target_probs must have one row per target sample ({target_features.shape[0]}); "
            f"got {jnp.shape(target_probs)}"
        )
    kernel = multi_kernel_gaussian(
        source_features, target_features, kernel_mul=kernel_mul, kernel_num=kernel_num, fix_sigma=fix_sigma
    )
    w_ss, w_tt, w_st = lmmd_weights(source_labels, target_probs, num_classes)
    dtype = jnp.promote_types(kernel.dtype, w_ss.dtype)
    kernel = kernel.astype(dtype)
    w_ss, w_tt, w_st = (w.astype(dtype) for w in (w_ss, w_tt, w_st))
    k_ss, k_tt, k_st = kernel[:bs, :bs], kernel[bs:, bs:], kernel[:bs, bs:]
    return jnp.sum(w_ss * k_ss) + jnp.sum(w_tt * k_tt) - 2.0 * jnp.sum(w_st * k_st)
