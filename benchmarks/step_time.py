"""Train/eval step time of FP32, uniform, AlignQ (CDF only) and AlignQ + ADMM, measured in one process.

    python benchmarks/step_time.py                       # ResNet-20, batch 128, 4 bits, this machine
    python benchmarks/step_time.py --json out.json --steps 20 --model resnet20 --batch 128 --bits 4
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/step_time.py --devices 8 --batch 256

Prints a table (median and spread of the jitted step after compilation, ratio to FP32, XLA FLOP count, peak
memory from XLA's memory analysis, compile time, eval step) and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

from alignq_jax.cli.classification import DEFAULT_CORRELATION_FEATURES
from alignq_jax.quantize import QuantConfig
from alignq_jax.training import TrainConfig, canonical_state, create_train_state, make_steps

IMAGE_SHAPES = {"resnet20": (32, 32, 3), "resnet56": (32, 32, 3), "mobilenet_v2": (32, 32, 3),
                "densenet40": (32, 32, 3), "small_cnn": (28, 28, 1)}


def variants(bits: int, args) -> dict[str, TrainConfig]:
    common = dict(model=args.model, batch_size=args.batch, eval_batch_size=args.batch, num_devices=args.devices,
                  parallel=args.parallel, dtype=args.dtype)
    q = dict(w_bits=bits, a_bits=bits, levels=args.levels)
    admm = dict(admm=True, admm_mode=args.admm_mode, global_correlation=args.global_correlation)
    return {
        "fp32": TrainConfig(quant=QuantConfig(), **common),
        "uniform": TrainConfig(quant=QuantConfig(method="uniform", **q), **common),
        "alignq": TrainConfig(quant=QuantConfig(method="alignq", **q), **common),
        "alignq_admm": TrainConfig(
            quant=QuantConfig(method="alignq", **q, correlation_features=args.correlation_features or None),
            **admm, **common),
        "alignq_admm_exact": TrainConfig(quant=QuantConfig(method="alignq", **q), **admm, **common),
    }


def _cost(compiled) -> tuple[float | None, float | None]:
    flops = peak = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0)) or None
    except Exception:  # not every backend reports it
        pass
    try:
        mem = compiled.memory_analysis()
        peak = float(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
                     - mem.alias_size_in_bytes)
    except Exception:
        pass
    return flops, peak


def measure(config: TrainConfig, steps_to_time: int, warmup: int) -> dict:
    shape = IMAGE_SHAPES[config.model]
    steps = make_steps(config, 10, 100)
    state = steps.place_state(canonical_state(steps, create_train_state(config, shape, 10, 100, gap_batch=steps.gap_batch)))
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(config.batch_size, *shape)).astype(np.float32),
             "label": rng.integers(0, 10, config.batch_size).astype(np.int32)}
    placed_batch = steps.place_batch(batch)
    eval_batch = steps.place_batch({**batch, "mask": np.ones(config.batch_size, bool)})

    t0 = time.perf_counter()
    flops = peak = None
    if hasattr(steps.train, "lower"):  # jit and jit(shard_map); the pmap wrapper compiles on first call
        flops, peak = _cost(steps.train.lower(state, placed_batch).compile())
    else:
        state, metrics = steps.train(state, placed_batch)
        jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0

    for _ in range(warmup):
        state, metrics = steps.train(state, placed_batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps_to_time):
        t = time.perf_counter()
        state, metrics = steps.train(state, placed_batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    eval_times = []
    sums = steps.evaluate(state, eval_batch)
    jax.block_until_ready(sums)
    for _ in range(max(3, steps_to_time // 2)):
        t = time.perf_counter()
        jax.block_until_ready(steps.evaluate(state, eval_batch))
        eval_times.append(time.perf_counter() - t)
    return {
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "iqr_s": float(np.subtract(*np.percentile(times, [75, 25]))),
        "steps_timed": len(times),
        "images_per_s": config.batch_size / statistics.median(times),
        "eval_median_s": statistics.median(eval_times),
        "compile_s": compile_s,
        "gflop_per_step": flops / 1e9 if flops else None,
        "peak_memory_mb": peak / 2**20 if peak else None,
        "loss_finite": bool(np.isfinite(float(metrics["loss"]))),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", choices=sorted(IMAGE_SHAPES))
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--levels", default="exact", choices=["exact", "paper"])
    p.add_argument("--admm-mode", default="textbook", choices=["textbook", "paper"])
    p.add_argument("--correlation-features", type=int, default=DEFAULT_CORRELATION_FEATURES,
                   help="sampled features per correlation gap in the alignq_admm variant (0: exact); "
                        "alignq_admm_exact always uses the exact gap")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--parallel", default="auto", choices=["auto", "none", "shard_map", "pmap"])
    p.add_argument("--global-correlation", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=15, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2,
                   help="interleaved rounds over the variants (the median over rounds is reported)")
    p.add_argument("--only", nargs="*", default=None, help="subset of variants")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    configs = variants(args.bits, args)
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only or k == "fp32"}
    rounds: dict[str, list[dict]] = {k: [] for k in configs}
    for r in range(args.rounds):
        for name, config in configs.items():
            rounds[name].append(measure(config, args.steps, args.warmup))
            print(f"round {r + 1}/{args.rounds} {name}: {rounds[name][-1]['median_s']:.3f} s", file=sys.stderr)
    results = {}
    for name, runs in rounds.items():
        best = dict(runs[0])
        # Spread over every timed step of every round (not round 1's alone), next to the median of round medians.
        pooled = [t for x in runs for t in x.pop("times_s")]
        best.pop("times_s", None)
        best["min_s"], best["max_s"] = min(pooled), max(pooled)
        best["iqr_s"] = float(np.subtract(*np.percentile(pooled, [75, 25])))
        best["steps_timed"] = len(pooled)
        best["median_s"] = statistics.median(x["median_s"] for x in runs)
        best["images_per_s"] = args.batch / best["median_s"]
        best["eval_median_s"] = statistics.median(x["eval_median_s"] for x in runs)
        best["round_medians_s"] = [x["median_s"] for x in runs]
        results[name] = best
    fp = results["fp32"]
    for name, res in results.items():
        res["ratio_to_fp32"] = res["median_s"] / fp["median_s"]
        res["eval_ratio_to_fp32"] = res["eval_median_s"] / fp["eval_median_s"]
        if res["peak_memory_mb"] and fp["peak_memory_mb"]:
            res["memory_ratio_to_fp32"] = res["peak_memory_mb"] / fp["peak_memory_mb"]
    devices = jax.devices()
    meta = {
        "model": args.model, "batch": args.batch, "bits": args.bits, "levels": args.levels,
        "admm_mode": args.admm_mode, "devices": args.devices, "parallel": args.parallel,
        "correlation_features": args.correlation_features, "global_correlation": args.global_correlation,
        "dtype": args.dtype, "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{len(devices)} x {devices[0].device_kind}", "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    header = f"{'variant':18s} {'step s':>8s} {'spread':>15s} {'x FP32':>7s} {'GFLOP':>7s} {'peak MB':>8s} {'x mem':>6s} {'eval s':>7s} {'compile s':>9s}"
    print(f"# {meta['model']} batch {meta['batch']}, {meta['bits']} bits, {meta['machine']}, jax {meta['jax']}, {meta['date']}")
    print(header)
    for name, r in results.items():
        spread = f"{r['min_s']:.3f}-{r['max_s']:.3f}"
        gflop = f"{r['gflop_per_step']:.1f}" if r["gflop_per_step"] else "n/a"
        mem = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] else "n/a"
        memr = f"{r.get('memory_ratio_to_fp32', float('nan')):.2f}"
        print(f"{name:18s} {r['median_s']:8.3f} {spread:>15s} {r['ratio_to_fp32']:7.2f} {gflop:>7s} {mem:>8s} {memr:>6s} "
              f"{r['eval_median_s']:7.3f} {r['compile_s']:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, **results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
