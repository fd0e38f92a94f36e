"""Quantization-aware training of an image classifier, the way the paper does it (reference sections 6-8).

Flow: train the FP32 model (or load ``--init-from``), then quantization-aware training at ``--bits`` (or the
paper's progressive chain FP -> 8 -> 4 -> 3 -> 2 with ``--progressive``). Every stage writes its own folder under
``--workdir`` (metrics.jsonl, steps.jsonl, Orbax checkpoints); the run writes results.json, results.md and
accuracy.png. ``--resume`` skips finished stages and continues the interrupted one from its last epoch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from alignq_jax.admm import MODES as ADMM_MODES
from alignq_jax.cli import report
from alignq_jax.models import MODELS
from alignq_jax.quantize import QuantConfig
from alignq_jax.quantizers import ALLOWED_BITS, LEVEL_MODES, QUANTIZERS

PROGRESSIVE_CHAIN = (8, 4, 3, 2, 1)
# Sampled correlation features per layer by default (benchmarks/correlation_estimate.py, README Performance).
DEFAULT_CORRELATION_FEATURES = 1024


def build_parser(dataset: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bits", type=int, default=4, choices=[b for b in ALLOWED_BITS if b != 32],
                   help="weight and activation bit-width of the quantized model")
    p.add_argument("--epochs", type=int, default=200, help="epochs of each quantization-aware stage")
    p.add_argument("--fp-epochs", type=int, default=200, help="epochs of the FP32 stage (ignored with --init-from)")
    p.add_argument("--method", default="alignq", choices=sorted(QUANTIZERS), help="quantizer")
    p.add_argument("--admm", action=argparse.BooleanOptionalAction, default=True,
                   help="correlation preservation with ADMM (AlignQ's CRP term); needs quantized activations")
    p.add_argument("--admm-mode", default="textbook", choices=ADMM_MODES,
                   help="textbook = standard scaled ADMM; paper = the official code's equations")
    p.add_argument("--admm-weight", type=float, default=1.0, help="weight of the ADMM penalty in the loss")
    p.add_argument("--correlation-features", type=int, default=DEFAULT_CORRELATION_FEATURES,
                   help="estimate each correlation gap from this many random features per step (unbiased; "
                        "0 = the exact gap over all features)")
    p.add_argument("--levels", default="exact", choices=LEVEL_MODES,
                   help="exact = at most 2^bits levels; paper = the official grid (about one bit more)")
    p.add_argument("--act-range", type=float, default=2.0, help="activation grid (-A, A)")
    p.add_argument("--model", default="resnet20", choices=sorted(MODELS), help="network")
    p.add_argument("--batch-size", type=int, default=128, help="global training batch size")
    p.add_argument("--eval-batch-size", type=int, default=100, help="evaluation batch size")
    p.add_argument("--lr", type=float, default=0.04, help="learning rate of the quantized stages")
    p.add_argument("--fp-lr", type=float, default=0.1, help="learning rate of the FP32 stage")
    p.add_argument("--milestones", type=float, nargs="*", default=[0.4, 0.75],
                   help="LR x0.1 at these fractions of each stage's epochs (reference: 80 and 150 of 200)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay (PyTorch convention)")
    p.add_argument("--devices", type=int, default=None, help="number of devices for data parallelism (all)")
    p.add_argument("--parallel", default="auto", choices=["auto", "none", "shard_map", "pmap"],
                   help="data-parallel form; auto = shard_map when there is more than one device")
    p.add_argument("--global-correlation", action="store_true",
                   help="all-gather the batch over devices for the correlation term (default: per device)")
    p.add_argument("--seed", type=int, default=0, help="parameters, ADMM init and data order")
    p.add_argument("--dataset", default=dataset, help="TFDS name or local files (cifar10, svhn_cropped, mnist, ...)")
    p.add_argument("--data-dir", default=None,
                   help="folder with local files (cifar-10-batches-py, IDX files) or a TFDS data dir")
    p.add_argument("--download", action="store_true", help="let TFDS download the data (needs internet)")
    p.add_argument("--workdir", default=None, help="output folder (default runs/<dataset>-<method>-w<bits>)")
    p.add_argument("--init-from", default=None, help="workdir or checkpoint folder of a trained FP32 (or higher-bit) run")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --workdir")
    p.add_argument("--progressive", action="store_true", help="paper's chain: 8 bits from FP, then 4 from 8, ...")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images (quick runs)")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images (quick runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--multihost", action="store_true",
                   help="call jax.distributed.initialize() first (TPU pods / multi-host GPU; one process per host)")
    return p


def stage_plan(args) -> list[tuple[str, int]]:
    """[(stage name, bits)], bits 32 = the FP32 stage."""
    plan = [] if args.init_from else [("fp32", 32)]
    chain = [b for b in PROGRESSIVE_CHAIN if b > args.bits] if args.progressive else []
    return plan + [(f"w{b}a{b}", b) for b in chain + [args.bits]]


def stage_config(args, bits: int):
    from alignq_jax.training import TrainConfig

    fp = bits == 32
    epochs = args.fp_epochs if fp else args.epochs
    quant = QuantConfig(
        w_bits=bits, a_bits=bits, method=args.method, levels=args.levels, act_range=args.act_range,
        correlation_features=args.correlation_features or None,
    )
    return TrainConfig(
        model=args.model,
        quant=quant,
        epochs=epochs,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        lr=args.fp_lr if fp else args.lr,
        weight_decay=args.weight_decay,
        milestones=tuple(sorted({int(round(f * epochs)) for f in args.milestones if 0 < f * epochs < epochs})),
        admm=args.admm and not fp,
        admm_mode=args.admm_mode,
        admm_weight=args.admm_weight,
        seed=args.seed,
        parallel=args.parallel,
        num_devices=args.devices,
        global_correlation=args.global_correlation,
    )


def validate_args(args) -> None:
    if args.correlation_features < 0 or args.correlation_features == 1:
        raise ValueError("--correlation-features must be 0 (exact) or at least 2")
    for name in ("epochs", "fp_epochs", "batch_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.init_from is not None and not Path(args.init_from).exists():
        raise ValueError(f"--init-from {args.init_from} does not exist")


def run(args, out=print) -> dict:
    """Runs every stage of the plan; returns the results dict written to results.json."""
    import jax

    from alignq_jax.data import load_dataset
    from alignq_jax.training import fit, load_variables

    validate_args(args)
    if jax.process_count() > 1:
        out(f"multi-host: process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices")
    workdir = Path(args.workdir or f"runs/{args.dataset}-{args.method}-w{args.bits}")
    t0 = time.perf_counter()
    dataset = load_dataset(args.dataset, args.data_dir, download=args.download)
    if args.limit_train or args.limit_test:
        dataset = dataset.take(args.limit_train, args.limit_test)
    out(f"data: {dataset} (loaded in {time.perf_counter() - t0:.1f} s)")
    out(f"devices: {report.machine_description()}")

    init = load_variables(args.init_from) if args.init_from else None
    stages = []
    histories = {}
    for name, bits in stage_plan(args):
        config = stage_config(args, bits)
        stage_dir = workdir / name
        done = stage_dir / "stage.json"
        if args.resume and done.exists():
            import json

            record = json.loads(done.read_text())
            out(f"stage {name}: already finished (resume), test acc last {record['last_epoch_test_accuracy']:.4f}")
            init = load_variables(stage_dir)
            stages.append(record)
            histories[name] = record["history"]
            continue
        out(f"stage {name}: {bits} bits, {config.epochs} epochs, method {config.quant.method}, admm {config.admm}")
        start = time.perf_counter()
        result = fit(
            config, dataset, workdir=stage_dir, init_variables=init, resume=args.resume,
            progress=not args.no_progress, log=out,
        )
        record = {
            "stage": name,
            "bits": bits,
            "method": config.quant.method if bits < 32 else "fp32",
            "levels": config.quant.levels,
            "admm": config.admm,
            "admm_mode": config.admm_mode if config.admm else None,
            **result.summary(),
            "wall_seconds": time.perf_counter() - start,
            "history": result.history,
        }
        report.write_json(done, record)
        stages.append(record)
        histories[name] = result.history
        init = {"params": result.state.params, "batch_stats": result.state.batch_stats}

    results = {
        "dataset": dataset.name,
        "model": args.model,
        "args": vars(args),
        "machine": report.machine_description(),
        "note": report.BEST_EPOCH_NOTE,
        "stages": [{k: v for k, v in s.items() if k != "history"} for s in stages],
    }
    report.write_json(workdir / "results.json", results)
    rows = [
        (s["stage"], s["method"], s["levels"], s["admm"], s["last_epoch_test_accuracy"], s["best_epoch_test_accuracy"],
         s["best_epoch"] + 1, s["epochs"])
        for s in stages
    ]
    table = report.markdown_table(
        ["stage", "method", "levels", "admm", "test acc (last epoch)", "test acc (best epoch)", "best epoch", "epochs"],
        rows,
    )
    (workdir / "results.md").write_text(f"# {dataset.name} {args.model}\n\n{table}\n{report.BEST_EPOCH_NOTE}\n")
    report.plot_histories(workdir / "accuracy.png", histories, f"{dataset.name} {args.model}")
    out(table)
    out(f"results: {workdir / 'results.json'}, {workdir / 'results.md'}, {workdir / 'accuracy.png'}")
    return results


def main(argv=None, *, dataset: str = "cifar10", description: str = __doc__) -> int:
    from alignq_jax.data import DataNotFoundError

    parser = build_parser(dataset, description)
    args = parser.parse_args(argv)
    if args.multihost:
        import jax

        # Same code path as single host: after this, jax.devices() lists every chip of the pod and the Mesh
        # spans them; each process feeds its own slice of every global batch.
        jax.distributed.initialize()
    try:
        run(args)
    except DataNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        parser.error(str(e))
    return 0
