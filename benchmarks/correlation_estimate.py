"""Accuracy effect of estimating the correlation gap from a random subset of features (``correlation_features``).

    python benchmarks/correlation_estimate.py --data-dir /usr/share/datasets/fashion-mnist --json out.json

For each seed: one FP32 SmallCNN, then quantization-aware fine-tuning of copies of it with AlignQ (CDF only),
AlignQ + ADMM with the exact gap, and AlignQ + ADMM with the sampled gap (each K in --features). Reports
last-epoch test accuracy (clean and brightness/contrast-shifted), mean +- std over seeds, and the relative
error of the sampled gap against the exact one on real activations (benchmarks/correlation_sampling.py compares
the column samplers in detail). Writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from alignq_jax.correlation import correlation_gap
from alignq_jax.data import load_dataset
from alignq_jax.data.shifts import shifted_test_sets
from alignq_jax.quantize import QuantConfig
from alignq_jax.quantizers import cdf_align_activation
from alignq_jax.training import TrainConfig, evaluate_datasets, fit


def gap_estimate_error(dataset, features, batch=128, trials=20) -> dict:
    """Relative Frobenius error of the sampled gap vs the exact one, and of the mean over trials (bias check).

    Inputs: real images through 16 random 3x3 filters, standardised per channel (a stand-in for a first-layer
    BN output, F = H*W*16 features), and their CDF alignment.
    """
    images = jnp.asarray(next(iter(dataset.train_batches(batch, prefetch=0)))["image"])
    filters = jax.random.normal(jax.random.key(0), (3, 3, images.shape[-1], 16))
    x = jax.lax.conv_general_dilated(images, filters, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = (x - x.mean((0, 1, 2))) / (x.std((0, 1, 2)) + 1e-6)
    y = cdf_align_activation(x)
    exact = correlation_gap(x, y)
    out = {"num_features_total": int(np.prod(x.shape[1:]))}
    for k in features:
        est = [correlation_gap(x, y, num_features=k, key=jax.random.key(t)) for t in range(trials)]
        rel = [float(jnp.linalg.norm(e - exact) / jnp.linalg.norm(exact)) for e in est]
        mean_rel = float(jnp.linalg.norm(jnp.mean(jnp.stack(est), 0) - exact) / jnp.linalg.norm(exact))
        out[str(k)] = {"relative_error_single": float(np.mean(rel)), "relative_error_mean_of_trials": mean_rel}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit-train", type=int, default=12000)
    p.add_argument("--limit-test", type=int, default=5000)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--fp-epochs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--features", type=int, nargs="*", default=[1024])
    p.add_argument("--admm-mode", default="textbook", choices=["textbook", "paper"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    start = time.perf_counter()
    dataset = load_dataset(args.dataset, args.data_dir).take(args.limit_train, args.limit_test)
    test_sets = {k: v for k, v in shifted_test_sets(dataset).items() if k != "blend 0.3"}
    common = dict(model="small_cnn", batch_size=args.batch, eval_batch_size=500, weight_decay=1e-4, parallel="none")
    variants = {"alignq": dict(admm=False), "alignq+admm exact": dict(admm=True)}
    for k in args.features:
        variants[f"alignq+admm K={k}"] = dict(admm=True, correlation_features=k)

    runs = []
    for seed in range(args.seeds):
        fp = fit(TrainConfig(quant=QuantConfig(), epochs=args.fp_epochs, lr=0.1, milestones=(args.fp_epochs - 1,),
                             seed=seed, **common), dataset, progress=False)
        init = {"params": fp.state.params, "batch_stats": fp.state.batch_stats}
        for name, v in variants.items():
            quant = QuantConfig(args.bits, args.bits, correlation_features=v.get("correlation_features"))
            cfg = TrainConfig(quant=quant, epochs=args.epochs, lr=0.04, milestones=(args.epochs - 1,), seed=seed,
                              admm=v["admm"], admm_mode=args.admm_mode, **common)
            t = time.perf_counter()
            result = fit(cfg, dataset, init_variables=init, progress=False)
            accs = evaluate_datasets(cfg, result.state, test_sets)
            runs.append({"variant": name, "seed": seed, "seconds": time.perf_counter() - t,
                         "penalty_last_epoch": result.last["train_penalty"],
                         **{k: a["test_accuracy"] for k, a in accs.items()}})
            print(f"seed {seed} {name:22s} " + " ".join(f"{k} {a['test_accuracy']:.4f}" for k, a in accs.items())
                  + f"  penalty {result.last['train_penalty']:.3g}  {time.perf_counter() - t:.0f}s", flush=True)

    summary = {}
    for name in variants:
        mine = [r for r in runs if r["variant"] == name]
        summary[name] = {k: (float(np.mean([r[k] for r in mine])), float(np.std([r[k] for r in mine])))
                         for k in test_sets}
    errors = gap_estimate_error(dataset, args.features)
    print(f"\n{args.dataset} ({dataset.num_train} train / {dataset.num_test} test), SmallCNN, {args.bits}-bit, "
          f"{args.seeds} seeds, last-epoch test accuracy (%), mean ± std")
    print("| variant | " + " | ".join(test_sets) + " |")
    print("|---|" + "---|" * len(test_sets))
    for name, s in summary.items():
        print(f"| {name} | " + " | ".join(f"{100 * m:.2f} ± {100 * sd:.2f}" for m, sd in s.values()) + " |")
    print("gap estimate error:", json.dumps(errors))
    print(f"{time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "runs": runs, "gap_estimate_error": errors,
                       "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores, jax {jax.__version__}"},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
