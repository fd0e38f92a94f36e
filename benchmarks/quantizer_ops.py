"""Throughput of each quantizer's forward + backward against a plain elementwise op of the same size.

    python benchmarks/quantizer_ops.py                   # 2^22-element tensors (one 128x32x32x16 activation x 2)
    python benchmarks/quantizer_ops.py --size 1048576 --json out.json

The reference op is ``jax.grad(sum(relu(x*s + b) * u))``: one read of x and u and one write, i.e. about the
memory-bound limit for an elementwise op with a backward. A ratio of 1.0 means the quantizer is as cheap as that.
The correlation gap (B x B from a B x F activation) is listed too, exact and sampled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from alignq_jax import quantizers as q
from alignq_jax.correlation import correlation_gap, sample_features


def _time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128 * 32 * 32 * 16 * 2, help="elements per tensor")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    n, bits = args.size, args.bits
    channels = 16
    x = jax.random.normal(jax.random.key(0), (n // channels, channels))
    u = jax.random.normal(jax.random.key(1), x.shape)
    scale, shift = jnp.full((channels,), 1.3), jnp.full((channels,), 0.1)

    def grad_of(f):
        return jax.jit(jax.grad(lambda x: jnp.sum(f(x) * u)))

    ops = {
        "reference: relu(x*s+b)": grad_of(lambda x: jax.nn.relu(x * scale + shift)),
        "alignq_activation": grad_of(lambda x: q.alignq_activation(x, bits)),
        "alignq_activation relu": grad_of(lambda x: q.alignq_activation(x, bits, relu=True)),
        "alignq_activation_affine relu": grad_of(lambda x: q.alignq_activation_affine(x, scale, shift, bits, relu=True)),
        "alignq_activation (paper)": grad_of(lambda x: q.alignq_activation(x, bits, levels="paper")),
        "uniform_activation": grad_of(lambda x: q.uniform_activation(x, bits)),
        "alignq_weight": grad_of(lambda x: q.alignq_weight(x, bits)),
        "uniform_weight": grad_of(lambda x: q.uniform_weight(x, bits)),
        "jax.scipy norm.cdf (for scale)": grad_of(lambda x: jax.scipy.stats.norm.cdf(x)),
    }
    rows = {}
    # Interleaved rounds, best median per op: the first op timed in a process is otherwise penalised.
    best = {name: min(_time(fn, x, repeats=args.repeats) for _ in range(3)) for name, fn in ops.items()}
    best = {name: min(best[name], _time(fn, x, repeats=args.repeats)) for name, fn in ops.items()}
    ref = best["reference: relu(x*s+b)"]
    for name, t in best.items():
        rows[name] = {"median_s": t, "elements_per_s": n / t, "ratio_to_reference": t / ref}

    # Correlation gap of a (128, F) activation, F = n / 128.
    b = 128
    xa = x.reshape(b, -1)
    ug = jax.random.normal(jax.random.key(2), (b, b))
    gap_exact = jax.jit(jax.grad(lambda x: jnp.sum(correlation_gap(x, q.cdf_align_activation(x)) * ug)))

    def sampled(x, key):
        (xs,) = sample_features((x,), key, 1024)
        return jnp.sum(correlation_gap(xs, q.cdf_align_activation(xs)) * ug)

    gap_sampled = jax.jit(jax.grad(sampled))
    for name, fn, extra in (("correlation_gap exact", gap_exact, ()),
                            ("correlation_gap K=1024", gap_sampled, (jax.random.key(3),))):
        t = _time(fn, xa, *extra, repeats=args.repeats)
        rows[name] = {"median_s": t, "elements_per_s": n / t, "ratio_to_reference": t / ref}

    dev = jax.devices()[0]
    print(f"# fwd+bwd of {n:,} float32 elements ({bits} bits), {os.cpu_count()} cores, {dev.device_kind}, "
          f"jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"{'op':34s} {'ms':>8s} {'Gelem/s':>8s} {'x ref':>6s}")
    for name, r in rows.items():
        print(f"{name:34s} {1e3 * r['median_s']:8.2f} {r['elements_per_s'] / 1e9:8.3f} {r['ratio_to_reference']:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": n, "bits": bits, "device": dev.device_kind, "jax": jax.__version__,
                       "date": time.strftime("%Y-%m-%d"), "ops": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
