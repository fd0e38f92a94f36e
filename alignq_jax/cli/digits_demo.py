"""Offline demo on real data: scikit-learn's 8x8 digits (1,797 real images, fixed stratified split).

For every seed: train the FP32 SmallCNN, then fine-tune it quantization-aware at ``--bits`` with the plain
uniform quantizer, AlignQ (CDF only) and AlignQ + ADMM (the paper's protocol: QAT starts from the FP32 model).
Every model is evaluated on the clean test split and on shifted copies (brightness, contrast, blend). Prints a
table (mean +- std over seeds) and writes results.json, results.md and a plot to ``--workdir``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from alignq_jax.admm import MODES as ADMM_MODES
from alignq_jax.cli import report
from alignq_jax.quantize import QuantConfig
from alignq_jax.quantizers import ALLOWED_BITS, LEVEL_MODES

VARIANTS = ("fp32", "uniform", "alignq", "alignq+admm")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bits", type=int, default=4, choices=[b for b in ALLOWED_BITS if b != 32])
    p.add_argument("--fp-epochs", type=int, default=15, help="epochs of the FP32 model")
    p.add_argument("--epochs", type=int, default=10, help="quantization-aware fine-tuning epochs")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1, help="FP32 learning rate (QAT uses a third of it)")
    p.add_argument("--levels", default="exact", choices=LEVEL_MODES)
    p.add_argument("--admm-mode", default="textbook", choices=ADMM_MODES)
    p.add_argument("--admm-weight", type=float, default=1.0)
    p.add_argument("--limit-train", type=int, default=None, help="first N training images (quick runs)")
    p.add_argument("--workdir", default="runs/digits", help="output folder")
    p.add_argument("--no-progress", action="store_true")
    return p


def variant_config(args, variant: str, seed: int):
    from alignq_jax.training import TrainConfig

    fp = variant == "fp32"
    quant = QuantConfig() if fp else QuantConfig(
        w_bits=args.bits, a_bits=args.bits, method="uniform" if variant == "uniform" else "alignq", levels=args.levels
    )
    epochs = args.fp_epochs if fp else args.epochs
    return TrainConfig(
        model="small_cnn", quant=quant, epochs=epochs, batch_size=args.batch_size, eval_batch_size=150,
        lr=args.lr if fp else args.lr / 3, milestones=(int(0.7 * epochs),) if epochs > 2 else (),
        weight_decay=1e-4, admm=variant == "alignq+admm", admm_mode=args.admm_mode,
        admm_weight=args.admm_weight, seed=seed, parallel="none",
    )


def run(args, out=print) -> dict:
    from alignq_jax.data import load_digits_dataset
    from alignq_jax.data.shifts import shifted_test_sets
    from alignq_jax.training import evaluate_datasets, fit

    for name in ("fp_epochs", "epochs", "seeds", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    start = time.perf_counter()
    dataset = load_digits_dataset()
    if args.limit_train:
        dataset = dataset.take(args.limit_train, None)
    test_sets = shifted_test_sets(dataset)
    out(f"data: {dataset}; test sets: {', '.join(test_sets)}")
    runs = []
    histories = {}
    for seed in range(args.seeds):
        fp_result = None
        for variant in VARIANTS:
            config = variant_config(args, variant, seed)
            init = None
            if fp_result is not None:
                init = {"params": fp_result.state.params, "batch_stats": fp_result.state.batch_stats}
            t = time.perf_counter()
            result = fit(config, dataset, init_variables=init, progress=not args.no_progress)
            if variant == "fp32":
                fp_result = result
            accs = evaluate_datasets(config, result.state, test_sets)
            record = {
                "variant": variant, "seed": seed, "seconds": time.perf_counter() - t,
                "last_epoch": {k: v["test_accuracy"] for k, v in accs.items()},
                "best_epoch_clean": result.best["test_accuracy"],
            }
            runs.append(record)
            if seed == 0:
                histories[variant] = result.history
            out(f"seed {seed} {variant:12s} " + "  ".join(f"{k} {v:.4f}" for k, v in record["last_epoch"].items()))

    summary = summarise(runs, list(test_sets))
    headers = ["variant"] + [f"{k} (%)" for k in test_sets] + ["best epoch clean (%)"]
    rows = [
        [v] + [f"{100 * summary[v][k][0]:.2f} ± {100 * summary[v][k][1]:.2f}" for k in test_sets]
        + [f"{100 * summary[v]['best_epoch_clean'][0]:.2f}"]
        for v in VARIANTS
    ]
    table = report.markdown_table(headers, rows)
    elapsed = time.perf_counter() - start
    workdir = Path(args.workdir)
    results = {
        "dataset": "digits (scikit-learn, 1347 train / 450 test)",
        "bits": args.bits,
        "levels": args.levels,
        "admm_mode": args.admm_mode,
        "seeds": args.seeds,
        "args": vars(args),
        "machine": report.machine_description(),
        "wall_seconds": elapsed,
        "summary": summary,
        "runs": runs,
        "note": "accuracy of the last epoch, mean ± std over seeds; " + report.BEST_EPOCH_NOTE,
    }
    report.write_json(workdir / "results.json", results)
    (workdir / "results.md").write_text(
        f"# digits, SmallCNN, {args.bits}-bit ({args.levels} levels), {args.seeds} seeds\n\n{table}\n"
        f"Last-epoch test accuracy, mean ± std over seeds. {report.BEST_EPOCH_NOTE}\n"
    )
    plot_summary(workdir / "accuracy.png", summary, list(test_sets), args.bits)
    report.plot_histories(workdir / "history_seed0.png", histories, f"digits {args.bits}-bit, seed 0")
    out(table)
    out(f"{elapsed:.0f} s; results in {workdir}/results.json, results.md, accuracy.png")
    return results


def summarise(runs, test_sets) -> dict:
    """{variant: {test set: (mean, std), "best_epoch_clean": (mean, std)}} over seeds."""
    summary = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        entry = {}
        for k in test_sets:
            vals = np.array([r["last_epoch"][k] for r in mine])
            entry[k] = (float(vals.mean()), float(vals.std()))
        best = np.array([r["best_epoch_clean"] for r in mine])
        entry["best_epoch_clean"] = (float(best.mean()), float(best.std()))
        summary[variant] = entry
    return summary


def plot_summary(path: Path, summary: dict, test_sets, bits: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(VARIANTS)
    x = np.arange(len(test_sets))
    for i, variant in enumerate(VARIANTS):
        means = [100 * summary[variant][k][0] for k in test_sets]
        stds = [100 * summary[variant][k][1] for k in test_sets]
        ax.bar(x + (i - (len(VARIANTS) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=variant)
    ax.set_xticks(x, test_sets)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"digits, {bits}-bit: clean and shifted test sets (mean ± std over seeds)")
    ax.legend(ncol=len(VARIANTS), fontsize=8, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
