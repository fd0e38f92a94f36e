"""What BatchNorm re-estimation does to the evaluation-mode accuracy swings of short quantization-aware runs.

    python benchmarks/bn_reestimation.py --data-dir /usr/share/datasets/fashion-mnist

For each seed: one FP32 SmallCNN, then quantization-aware training of a copy of it for each variant (method and
bits; CDF-only AlignQ, no ADMM, and the paper's uniform baseline by default), all with
``bn_reestimate_every_epoch=True``: every epoch is evaluated twice on the test set, with the running BatchNorm
statistics of training and with statistics re-estimated over ``--reestimate-batches`` training batches. Both come
from the same training run (re-estimation changes no weight and no running statistic), so the comparison is paired.

Reported per variant, in accuracy points (mean over seeds, and each seed):
  * the spread over the last ``--last`` epochs of each run (max - min, and std),
  * the spread over seeds of the last-epoch accuracy (max - min, and std), and its mean,
with the running and the re-estimated statistics side by side. The learning-rate schedule is the classification
CLI's (x0.1 at 40% and 75% of the epochs). Writes JSON (``--json``) after every run, so a partial run keeps its
results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

from alignq_jax.data import load_dataset
from alignq_jax.quantize import QuantConfig, QuantRules
from alignq_jax.training import TrainConfig, fit

DEFAULT_JSON = os.path.join(os.path.dirname(__file__), "results", "bn_reestimation.json")


def milestones(epochs: int, fractions=(0.4, 0.75)) -> tuple[int, ...]:
    """The classification CLI's schedule: LR x0.1 at these fractions of the epochs."""
    return tuple(sorted({int(round(f * epochs)) for f in fractions if 0 < f * epochs < epochs}))


def parse_variant(text: str) -> tuple[str, int, int | None]:
    """METHOD:BITS, or METHOD:BITS:FIRST to keep the first conv and its BatchNorm quantizer at FIRST bits."""
    method, bits, *first = text.split(":")
    if not bits.isdigit() or len(first) > 1 or (first and not first[0].isdigit()):
        raise argparse.ArgumentTypeError(f"a variant is METHOD:BITS or METHOD:BITS:FIRST (e.g. alignq:4:8); got {text!r}")
    return method, int(bits), int(first[0]) if first else None


FIRST_LAYER = r"^(conv0|bn0|stem_conv|stem_bn)$"  # the first conv and its BN in small_cnn and the ResNets


def variant_quant(method: str, bits: int, first: int | None):
    """The variant's config: one QuantConfig, or rules keeping the first layer at ``first`` bits."""
    config = QuantConfig(bits, bits, method=method)
    if first is None:
        return config
    return QuantRules([(FIRST_LAYER, QuantConfig(first, first, method=method))], default=config)


def variant_name(method: str, bits: int, first: int | None) -> str:
    return f"{method} {bits}-bit" + (f", first conv {first}-bit" if first is not None else "")


def spread(values) -> dict:
    values = np.asarray(values, np.float64) * 100
    return {"range": float(values.max() - values.min()), "std": float(values.std()), "mean": float(values.mean())}


def run_summary(history: list[dict], last: int) -> dict:
    """Per run: accuracies per epoch and the spread over the last ``last`` epochs, running vs re-estimated."""
    running = [r["test_accuracy_running_stats"] for r in history]
    reestimated = [r["test_accuracy"] for r in history]
    return {
        "test_accuracy_running": running,
        "test_accuracy_reestimated": reestimated,
        "train_accuracy": [r["train_accuracy"] for r in history],
        "last_epochs_spread_running": spread(running[-last:]),
        "last_epochs_spread_reestimated": spread(reestimated[-last:]),
    }


def variant_summary(runs: list[dict]) -> dict:
    """Over the seeds of one variant: spread of the last-epoch accuracy, and the mean per-run last-epochs spread."""
    out = {"seeds": len(runs)}
    for kind in ("running", "reestimated"):
        finals = [r[f"test_accuracy_{kind}"][-1] for r in runs]
        out[f"last_epoch_over_seeds_{kind}"] = spread(finals)
        out[f"last_epochs_range_mean_{kind}"] = float(np.mean([r[f"last_epochs_spread_{kind}"]["range"] for r in runs]))
        out[f"last_epochs_std_mean_{kind}"] = float(np.mean([r[f"last_epochs_spread_{kind}"]["std"] for r in runs]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit-train", type=int, default=12000, help="first N training images (CPU budget)")
    p.add_argument("--limit-test", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--variants", type=parse_variant, nargs="+",
                   default=[("alignq", 4, None), ("uniform", 2, None), ("alignq", 2, None)], help="METHOD:BITS[:FIRST] ...")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--fp-epochs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--last", type=int, default=3, help="spread over this many last epochs")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reestimate-batches", type=int, default=50)
    p.add_argument("--json", default=DEFAULT_JSON)
    args = p.parse_args(argv)

    start = time.perf_counter()
    dataset = load_dataset(args.dataset, args.data_dir).take(args.limit_train, args.limit_test)
    common = dict(model=args.model, batch_size=args.batch, eval_batch_size=500, weight_decay=1e-4, parallel="none",
                  bn_reestimate_batches=args.reestimate_batches, bn_reestimate_every_epoch=True)
    names = ["fp32"] + [variant_name(*v) for v in args.variants]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    payload = {
        "args": {**vars(args), "variants": [":".join(str(x) for x in v if x is not None) for v in args.variants]},
        "dataset": repr(dataset),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores visible (shared), "
                   f"{jax.default_backend()}, jax {jax.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "note": "accuracies in %; 'running' = BatchNorm running statistics of training, 'reestimated' = statistics "
                f"re-estimated over {args.reestimate_batches} training batches with the epoch's weights (same run); "
                "quantized variants start from the same seed's FP32 run; AlignQ is CDF-only (no ADMM)",
        "runs": runs,
    }

    def save():
        payload["summary"] = {name: variant_summary(rs) for name, rs in runs.items() if rs}
        payload["wall_seconds"] = time.perf_counter() - start
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)

    for seed in range(args.seeds):
        t = time.perf_counter()
        fp = fit(TrainConfig(quant=QuantConfig(), epochs=args.fp_epochs, lr=0.1, milestones=milestones(args.fp_epochs),
                             seed=seed, **common), dataset, progress=False)
        runs["fp32"].append({"seed": seed, "seconds": time.perf_counter() - t, **run_summary(fp.history, args.last)})
        print(f"seed {seed} fp32: running {fp.last['test_accuracy_running_stats']:.4f} "
              f"re-estimated {fp.last['test_accuracy']:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
        save()
        init = {"params": fp.state.params, "batch_stats": fp.state.batch_stats}
        for (method, bits, first), name in zip(args.variants, names[1:]):
            t = time.perf_counter()
            cfg = TrainConfig(quant=variant_quant(method, bits, first), epochs=args.epochs, lr=0.04,
                              milestones=milestones(args.epochs), seed=seed, **common)
            result = fit(cfg, dataset, init_variables=init, progress=False)
            record = {"seed": seed, "seconds": time.perf_counter() - t, **run_summary(result.history, args.last)}
            runs[name].append(record)
            print(f"seed {seed} {name}: running " + " ".join(f"{a:.4f}" for a in record["test_accuracy_running"])
                  + " | re-estimated " + " ".join(f"{a:.4f}" for a in record["test_accuracy_reestimated"])
                  + f" ({record['seconds']:.0f} s)", flush=True)
            save()

    print(f"\n{args.dataset} ({dataset.num_train} train / {dataset.num_test} test), {args.model}, {args.seeds} seeds, "
          f"{args.epochs} QAT epochs; accuracy points")
    print("| variant | last-epoch mean (running / re-est.) | over seeds max-min (running / re-est.) | "
          f"last {args.last} epochs max-min, mean over seeds (running / re-est.) |")
    print("|---|---|---|---|")
    for name, s in payload["summary"].items():
        r, e = s["last_epoch_over_seeds_running"], s["last_epoch_over_seeds_reestimated"]
        print(f"| {name} | {r['mean']:.2f} / {e['mean']:.2f} | {r['range']:.2f} / {e['range']:.2f} | "
              f"{s['last_epochs_range_mean_running']:.2f} / {s['last_epochs_range_mean_reestimated']:.2f} |")
    print(f"{time.perf_counter() - start:.0f} s; {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
