"""How well a sampled correlation gap estimates the exact gap on real activations, for three column samplers.

    python benchmarks/correlation_sampling.py   # a table; JSON in benchmarks/results/correlation_sampling.json

Activations: scikit-learn's real 8x8 handwritten digits (offline) through

* SmallCNN trained on them (8x8 inputs; K = 256 and 128 sampled features), and
* ResNet-20 trained on them upsampled to 32x32 (K = 1024, the CLI default, and 256),

each briefly trained in FP32, then run with 4-bit weights and activations in train mode (the start of
quantization-aware training). For every quantized activation: x = the BN output (the quantizer input), y = its AlignQ
target A(2 Phi(x) - 1), D = corr(y) - corr(x) the exact B x B gap (docs/method.md §4). Samplers of K columns:

* strided: the previous default. Columns o + s*i of the flattened NHWC features, s = F // K, o uniform in [0, s):
  a draw sees only C / gcd(s, C) of the C channels (ResNet-20 at K = 1024: 1 of 16, 4 of 32, 16 of 64).
* shared grid: one random regular grid of spatial positions, all channels at each.
* per-channel grid: the current default (``correlation_features=K``, ``alignq_jax.correlation.draw_feature_sample``):
  every channel, each at its own independently drawn regular grid of positions.
* uniform: K columns drawn uniformly at random without replacement (the textbook reference; needs a gather).

Reported per layer: relative MSE = E ||D_K - D||_F^2 / ||D||_F^2 and bias = ||E[D_K] - D||_F / ||D||_F, both exact
(no Monte Carlo noise): the strided and grid samplers by enumerating their equally likely offsets (per channel for
the per-channel grids, whose channels are independent), uniform from the finite-population variance of the
per-column terms. All are unbiased here (the strides divide the axes); the script checks that the library's own
sampled gap is a per-channel-grid draw.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignq_jax.correlation import correlation_gap, feature_strides
from alignq_jax.models import get_model
from alignq_jax.quantize import QuantBatchNorm, QuantConfig

EPS = 1e-5  # QuantConfig's correlation_eps
BN_EPS = 1e-5


def load_digits(size: int):
    """Digits as (N, size, size, 1) float32, standardised with the training split's statistics; (train, test)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = (d.images / 16.0).astype(np.float32)[..., None]
    if size != 8:
        images = np.asarray(jax.image.resize(images, (len(images), size, size, 1), "bilinear"))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    images, labels = images[order], d.target[order].astype(np.int32)
    n_train = 1400
    mean, std = images[:n_train].mean(), images[:n_train].std()
    images = (images - mean) / std
    return (images[:n_train], labels[:n_train]), (images[n_train:], labels[n_train:])


def train_fp32(name: str, train, steps: int, batch: int, seed: int = 0):
    """Plain momentum SGD of the FP32 model; returns its variables."""
    model = get_model(name, config=QuantConfig())
    images, labels = train
    v = model.init(jax.random.key(seed), images[:batch], train=True)
    tx = optax.sgd(optax.cosine_decay_schedule(0.05, steps), momentum=0.9)
    opt = tx.init(v["params"])

    @jax.jit
    def step(params, stats, opt, x, y):
        def loss(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), stats, opt, value

    params, stats = v["params"], v["batch_stats"]
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(images), batch, replace=False)
        params, stats, opt, value = step(params, stats, opt, images[idx], labels[idx])
    return {"params": params, "batch_stats": stats}, float(value)


def quantizer_inputs(name: str, variables, images, bits: int):
    """{layer path: x (B, H, W, C) float64}: the BN output every quantized activation sees, train mode."""
    model = get_model(name, config=QuantConfig(bits, bits))
    found = {}

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, QuantBatchNorm) and context.method_name == "__call__":
            h = np.asarray(args[0], np.float64)
            p = context.module.variables["params"]
            mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
            found["/".join(context.module.path)] = (h - mean) / np.sqrt(var + BN_EPS) * np.asarray(p["scale"]) \
                + np.asarray(p["bias"])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(variables, images, train=True, mutable=["batch_stats"])
    return found


def standardise(m):
    """(B, F) columns centred and divided by sqrt(unbiased var + eps^2), as alignq_jax.correlation does."""
    c = m - m.mean(0)
    return c / np.sqrt((c * c).sum(0) / (m.shape[0] - 1) + EPS * EPS)


def gap_of_columns(xs, ys, cols):
    a, b = ys[:, cols], xs[:, cols]
    return (a @ a.T - b @ b.T) / len(cols)


def errors(x, k: int, check_library: bool = True) -> dict:
    """Exact relative MSE and bias of the three samplers for one layer's x (B, H, W, C)."""
    from scipy.special import ndtr

    b, shape = x.shape[0], x.shape[1:]
    f = int(np.prod(shape))
    xs = standardise(x.reshape(b, f))
    ys = standardise((2.0 * (2.0 * ndtr(x) - 1.0)).reshape(b, f))
    exact = (ys @ ys.T - xs @ xs.T) / f
    norm2 = float(np.sum(exact**2))
    out = {"features": f, "channels": int(shape[-1])}

    def summarise(gaps):
        gaps = np.stack(gaps)
        mse = float(np.mean(np.sum((gaps - exact) ** 2, axis=(1, 2))))
        return {"rel_mse": mse / norm2, "bias": float(np.linalg.norm(gaps.mean(0) - exact) / np.sqrt(norm2))}

    # strided (previous default)
    s = max(1, f // k)
    count = f // s
    strided_cols = [o + s * np.arange(count) for o in range(s)]
    out["strided"] = summarise([gap_of_columns(xs, ys, c) for c in strided_cols])
    out["strided"]["channels_per_draw"] = float(np.mean([len(set(c % shape[-1])) for c in strided_cols]))
    # grids of positions, all channels kept (strides from the library)
    strides = feature_strides(tuple(shape), k)
    assert strides[-1] == 1, "these shapes keep every channel"
    index = np.arange(f).reshape(shape)
    grids = list(itertools.product(*(range(st) for st in strides[:-1])))

    def grid_columns(offsets, channel):
        return index[..., channel][tuple(slice(o, None, st) for o, st in zip(offsets, strides[:-1]))].ravel()

    # shared grid: one random grid for all channels (same positions everywhere)
    shared = [np.concatenate([grid_columns(g, c) for c in range(shape[-1])]) for g in grids]
    out["shared_grid"] = summarise([gap_of_columns(xs, ys, c) for c in shared])
    # per-channel grids (the library's default): independent grids per channel, so D_K = mean over channels of
    # independent per-channel estimates, and E||D_K - D||^2 = sum_c E||D_c - E D_c||^2 / C^2 + ||E D_K - D||^2.
    c_count = shape[-1]
    per_channel_var, mean_gap = 0.0, np.zeros_like(exact)
    for c in range(c_count):
        est = np.stack([gap_of_columns(xs, ys, grid_columns(g, c)) for g in grids])
        mean_c = est.mean(0)
        per_channel_var += float(np.mean(np.sum((est - mean_c) ** 2, axis=(1, 2))))
        mean_gap += mean_c / c_count
    bias2 = float(np.sum((mean_gap - exact) ** 2))
    out["per_channel_grid"] = {"rel_mse": (per_channel_var / c_count**2 + bias2) / norm2,
                               "bias": float(np.sqrt(bias2 / norm2)), "strides": list(strides)}
    for name in ("shared_grid", "per_channel_grid"):
        out[name]["channels_per_draw"] = float(c_count)
    if check_library:  # the library's own estimate is a per-channel-grid draw
        from alignq_jax.correlation import draw_feature_sample

        key = jax.random.key(0)
        lib = np.asarray(correlation_gap(jnp.asarray(x, jnp.float32), jnp.asarray(2.0 * (2.0 * ndtr(x) - 1.0),
                                                                                  jnp.float32),
                                         num_features=k, key=key), np.float64)
        (spatial, _), _ = draw_feature_sample(shape, key, k)
        spatial = np.asarray(spatial)
        cols = np.concatenate([grid_columns(spatial[:, c], c) for c in range(c_count)])
        off = np.abs(lib - gap_of_columns(xs, ys, cols)).max()
        assert off < 1e-4, f"the library's sampled gap is not the per-channel-grid draw (off by {off})"
    # uniform without replacement: Var(mean of K of F) = S^2 / K * (1 - K / F) per entry, S^2 the population
    # variance (ddof 1) of the per-column terms v_f = ys_if ys_jf - xs_if xs_jf.
    kk = len(shared[0])  # the same number of columns as the grid draws (= K for these shapes)
    a2, xy, b2 = ys * ys, xs * ys, xs * xs
    sum_v2 = a2 @ a2.T - 2.0 * (xy @ xy.T) + b2 @ b2.T
    pop_var = (sum_v2 - f * exact**2) / (f - 1)
    out["uniform"] = {"rel_mse": float(np.sum(pop_var) / kk * (1.0 - kk / f)) / norm2, "bias": 0.0,
                      "channels_per_draw": float(shape[-1] * (1 - (1 - 1 / shape[-1]) ** kk))}
    out["columns"] = {"strided": int(count), "grids": int(kk), "uniform": int(kk)}
    return out


def run(name, size, ks, args):
    train, test = load_digits(size)
    t = time.perf_counter()
    variables, loss = train_fp32(name, train, args.steps, args.batch)
    print(f"{name}: {args.steps} FP32 steps on digits {size}x{size}, last loss {loss:.3f}, "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    xs = quantizer_inputs(name, variables, test[0][: args.eval_batch], args.bits)
    return {"model": name, "image_size": size, "train_steps": args.steps, "last_train_loss": loss,
            "layers": {k: {path: errors(x, k) for path, x in xs.items()} for k in ks}}


SCHEMES = ("strided", "shared_grid", "per_channel_grid", "uniform")


def summary_rows(result):
    """(model, K, label, channels per strided draw, {scheme: mean relative MSE}) per feature shape and overall."""
    rows = []
    for k, layers in result["layers"].items():
        groups = {}
        for e in layers.values():
            groups.setdefault((e["features"], e["channels"]), []).append(e)
        for (f, c), es in sorted(groups.items(), reverse=True):
            mean = {s: float(np.mean([e[s]["rel_mse"] for e in es])) for s in SCHEMES}
            rows.append((result["model"], k, f"{f} ({c} ch, {len(es)} layers)",
                         float(np.mean([e["strided"]["channels_per_draw"] for e in es])), mean))
        mean = {s: float(np.mean([e[s]["rel_mse"] for e in layers.values()])) for s in SCHEMES}
        rows.append((result["model"], k, f"all {len(layers)} layers", float("nan"), mean))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="FP32 training steps per model")
    p.add_argument("--batch", type=int, default=64, help="training batch")
    p.add_argument("--eval-batch", type=int, default=128, help="batch B of the measured B x B gaps")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--models", nargs="*", default=["small_cnn", "resnet20"])
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "correlation_sampling.json"))
    args = p.parse_args(argv)
    setups = {"small_cnn": (8, (256, 128)), "resnet20": (32, (1024, 256))}
    results = [run(name, *setups[name], args) for name in args.models]

    print("\nRelative MSE of the sampled gap, E||D_K - D||^2 / ||D||^2 (exact expectations), mean over layers;")
    print("in brackets: the ratio to uniformly random columns")
    print("| model | K | features per sample | channels per strided draw | strided (old) | shared grid | "
          "per-channel grid (new) | uniform columns |")
    print("|---|---|---|---|---|---|---|---|")
    for model, k, label, ch, m in (row for r in results for row in summary_rows(r)):
        ch_text = "" if np.isnan(ch) else f"{ch:.0f}"
        cells = " | ".join(f"{m[s]:.3f} ({m[s] / m['uniform']:.2f}x)" for s in SCHEMES[:-1])
        print(f"| {model} | {k} | {label} | {ch_text} | {cells} | {m['uniform']:.3f} |")
    worst_bias = max(e[s]["bias"] for r in results for layers in r["layers"].values() for e in layers.values()
                     for s in SCHEMES[:-1])
    print(f"largest relative bias ||E[D_K] - D|| / ||D|| of the enumerated samplers: {worst_bias:.1e}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results, "date": time.strftime("%Y-%m-%d"),
                       "machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}"}, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
