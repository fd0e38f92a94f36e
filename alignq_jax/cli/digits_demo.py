"""Offline demo on real data: scikit-learn's 8x8 digits (1,797 real images, fixed stratified split).

For every seed: train the FP32 SmallCNN, then fine-tune it quantization-aware at ``--bits`` with each of
``--methods`` (default: the paper's uniform quantizer, AlignQ (CDF only) and AlignQ + ADMM; any registered method
can be added, e.g. lsq or absmax), the paper's protocol: QAT starts from the FP32 model.
Every model is evaluated on the clean test split and on shifted copies (brightness, contrast, blend). Prints a
table (mean +- std over seeds) and writes results.json, results.md and a plot to ``--workdir``.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from alignq_jax.admm import MODES as ADMM_MODES
from alignq_jax.cli import report
from alignq_jax.methods import METHODS
from alignq_jax.quantize import QuantConfig
from alignq_jax.quantizers import ALLOWED_BITS, LEVEL_MODES

DEFAULT_METHODS = ("uniform", "alignq", "alignq+admm")
METHOD_CHOICES = (*sorted(METHODS), "alignq+admm", "uniform+admm")


def variants(args) -> tuple[str, ...]:
    """The FP32 model, then every QAT variant of ``--methods`` ("<method>" or "<method>+admm")."""
    return ("fp32", *args.methods)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bits", type=int, default=4, choices=[b for b in ALLOWED_BITS if b != 32])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHOD_CHOICES,
                   help="quantization-aware variants trained from the FP32 model (+admm: with the correlation term)")
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
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are off anyway when the output is not a terminal)")
    return p


def variant_config(args, variant: str, seed: int):
    from alignq_jax.training import TrainConfig

    fp = variant == "fp32"
    quant = QuantConfig() if fp else QuantConfig(
        w_bits=args.bits, a_bits=args.bits, method=variant.removesuffix("+admm"), levels=args.levels
    )
    epochs = args.fp_epochs if fp else args.epochs
    return TrainConfig(
        model="small_cnn", quant=quant, epochs=epochs, batch_size=args.batch_size, eval_batch_size=150,
        lr=args.lr if fp else args.lr / 3, milestones=(int(0.7 * epochs),) if epochs > 2 else (),
        weight_decay=1e-4, admm=variant.endswith("+admm"), admm_mode=args.admm_mode,
        admm_weight=args.admm_weight, seed=seed, parallel="none",
    )


def run(args, out=print) -> dict:
    from alignq_jax.data import load_digits_dataset
    from alignq_jax.data.shifts import shifted_test_sets
    from alignq_jax.training import fit

    start = time.perf_counter()
    dataset = load_digits_dataset()
    if args.limit_train is not None:
        dataset = dataset.take(args.limit_train, None)
    test_sets = shifted_test_sets(dataset)
    out(f"data: {dataset}; test sets: {', '.join(test_sets)}")
    runs = []
    histories = {}
    levels = {}
    # Progress bars only on a terminal; in a log file one line per epoch instead of bar redraws.
    progress = not args.no_progress and sys.stderr.isatty()
    for seed in range(args.seeds):
        fp_result = None
        for variant in variants(args):
            config = variant_config(args, variant, seed)
            init = None
            if fp_result is not None:
                init = {"params": fp_result.state.params, "batch_stats": fp_result.state.batch_stats}
            t = time.perf_counter()
            log = None if progress else (lambda line, s=seed, v=variant: out(f"seed {s} {v}: {line}"))
            result = fit(config, dataset, init_variables=init, progress=progress, log=log)
            if variant not in levels:
                levels[variant] = report.level_counts(config.quant)  # None for the 32-bit fp32 variant
            if variant == "fp32":
                fp_result = result
            # Headline: BatchNorm statistics re-estimated after training (as fit reports); running ones kept too.
            trained, raw = result.trained, result.trained_raw
            record = {
                "variant": variant, "seed": seed, "seconds": time.perf_counter() - t,
                "bn_statistics": result.last["bn_statistics"],
                "last_epoch": {k: trained.evaluate(ds)["accuracy"] for k, ds in test_sets.items()},
                "last_epoch_running_stats": {k: raw.evaluate(ds)["accuracy"] for k, ds in test_sets.items()},
                "best_epoch_clean": result.best["test_accuracy"],
            }
            runs.append(record)
            if seed == 0:
                histories[variant] = result.history
            out(f"seed {seed} {variant:12s} " + "  ".join(f"{k} {v:.4f}" for k, v in record["last_epoch"].items()))

    summary = summarise(runs, list(test_sets), variants(args))
    headers = ["variant", "levels (weights / activations)"] + [f"{k} (%)" for k in test_sets] + [
        "best epoch clean (%)"]
    rows = [
        [v, "-" if v == "fp32" else f"{levels[v]['weight_levels']} / {levels[v]['activation_levels']}"]
        + [f"{100 * summary[v][k][0]:.2f} ± {100 * summary[v][k][1]:.2f}" for k in test_sets]
        + [f"{100 * summary[v]['best_epoch_clean'][0]:.2f}"]
        for v in variants(args)
    ]
    table = report.markdown_table(headers, rows)
    elapsed = time.perf_counter() - start
    workdir = Path(args.workdir)
    results = {
        "dataset": "digits (scikit-learn, 1347 train / 450 test)",
        "bits": args.bits,
        "grid": args.levels,  # exact or paper; "levels" below holds the measured level counts per variant
        "admm_mode": args.admm_mode,
        "seeds": args.seeds,
        "args": vars(args),
        "machine": report.machine_description(),
        "wall_seconds": elapsed,
        "levels": levels,
        "summary": summary,
        "runs": runs,
        "note": "accuracy of the last epoch with BatchNorm statistics re-estimated over training batches after "
                "training (runs[*].last_epoch_running_stats: with the running statistics of training), mean ± std "
                "over seeds; " + report.BEST_EPOCH_NOTE,
    }
    report.write_json(workdir / "results.json", results)
    (workdir / "results.md").write_text(
        f"# digits, SmallCNN, {args.bits}-bit ({args.levels} levels), {args.seeds} seeds\n\n{table}\n"
        f"Last-epoch test accuracy with BatchNorm statistics re-estimated after training (results.json also has "
        f"the accuracy with the running statistics), mean ± std over seeds. {report.ACCURACY_NOTE} "
        f"{report.BEST_EPOCH_NOTE}\n"
    )
    plot_summary(workdir / "accuracy.png", summary, list(test_sets), args)
    report.save_figure(history_figure(histories, args), workdir / "history_seed0.png")
    out(table)
    out(f"{elapsed:.0f} s; results in {workdir}/results.json, results.md, accuracy.png")
    return results


def summarise(runs, test_sets, variant_names) -> dict:
    """{variant: {test set: (mean, std), "best_epoch_clean": (mean, std)}} over seeds."""
    summary = {}
    for variant in variant_names:
        mine = [r for r in runs if r["variant"] == variant]
        entry = {}
        for k in test_sets:
            vals = np.array([r["last_epoch"][k] for r in mine])
            entry[k] = (float(vals.mean()), float(vals.std()))
        best = np.array([r["best_epoch_clean"] for r in mine])
        entry["best_epoch_clean"] = (float(best.mean()), float(best.std()))
        summary[variant] = entry
    return summary


def history_figure(histories: dict[str, list[dict]], args):
    """Seed 0's test accuracy per epoch: FP32 on epochs 1..E_fp, then every QAT variant (each fine-tuned from
    that FP32 model) on the epochs after it, with the boundary marked."""
    fp = histories["fp32"]
    segments = [("fp32", fp, 0)] + [(v, h, len(fp)) for v, h in histories.items() if v != "fp32"]
    return report.history_figure(
        segments, f"digits, SmallCNN, seed 0: FP32, then {args.bits}-bit QAT ({args.levels} levels; "
        f"alignq+admm: ADMM {args.admm_mode})", [(len(fp) + 0.5, "QAT from the FP32 model")],
        xlabel="epoch (FP32, then quantization-aware fine-tuning)",
    )


def plot_summary(path: Path, summary: dict, test_sets, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    x = np.arange(len(test_sets))
    for i, variant in enumerate(names):
        means = [100 * summary[variant][k][0] for k in test_sets]
        stds = [100 * summary[variant][k][1] for k in test_sets]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=variant)
    ax.set_xticks(x, test_sets)
    ax.set_ylabel("test accuracy (%)")
    report.set_wrapped_title(
        ax, f"digits, SmallCNN, {args.bits}-bit ({args.levels} levels; alignq+admm: ADMM {args.admm_mode}): "
        "clean and shifted test sets, mean ± std over seeds", fontsize=9, width=100)
    ax.legend(ncol=min(len(names), 5), fontsize=8, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def validate_args(args) -> None:
    for name in ("fp_epochs", "epochs", "seeds", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if args.lr <= 0 or args.admm_weight <= 0:
        bad = "--lr" if args.lr <= 0 else "--admm-weight"
        raise ValueError(f"{bad} must be positive; got {args.lr if bad == '--lr' else args.admm_weight}")
    if len(set(args.methods)) != len(args.methods):
        raise ValueError(f"--methods lists a method twice: {' '.join(args.methods)}")
    for method in args.methods:
        if method.endswith("+admm") and METHODS[method.removesuffix("+admm")].placement != "bn_output":
            raise ValueError(f"{method}: the correlation term needs a method quantizing the BatchNorm output")
        QuantConfig(args.bits, args.bits, method=method.removesuffix("+admm"), levels=args.levels)  # bits it defines
    if args.limit_train is not None and args.limit_train < 1:
        raise ValueError(f"--limit-train must be at least 1 (leave it out for all); got {args.limit_train}")


def main(argv=None) -> int:
    """Exit status: 0, 1 runtime error (traceback printed), 2 bad flags (usage), 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_args(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        run(args)
    except KeyboardInterrupt:
        print("\ninterrupted (the demo keeps no checkpoints: run it again to start over)", file=sys.stderr)
        return 130
    except Exception as e:  # a runtime failure is not a usage error: keep the traceback, end with one line
        traceback.print_exception(e)
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
