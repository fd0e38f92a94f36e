"""Host input pipeline throughput (CIFAR-10 recipe: shuffle, pad-4 random crop, flip, normalise) vs the train step.

    python benchmarks/input_pipeline.py [--step-json benchmarks/results/step_time_resnet20_b128_w4.json]

Uses 50,000 random 32x32x3 uint8 images (the pipeline's cost does not depend on pixel values). With a step_time
JSON, also prints the train step's images/s so the two can be compared: the pipeline runs on a background
thread, so it stalls the step only if it is slower.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from alignq_jax.data import ArrayDataset, get_spec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--step-json", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    spec = get_spec("cifar10")
    images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images).astype(np.int32)
    ds = ArrayDataset.from_spec(spec, images, labels, images[:1000], labels[:1000])
    out = {}
    for prefetch in (0, 2):
        start = time.perf_counter()
        n = 0
        for batch in ds.train_batches(args.batch, seed=0, epoch=0, prefetch=prefetch):
            n += batch["image"].shape[0]
        seconds = time.perf_counter() - start
        out[f"prefetch_{prefetch}"] = {"images_per_s": n / seconds, "epoch_s": seconds}
        print(f"input pipeline (prefetch={prefetch}): {n / seconds:,.0f} images/s, {seconds:.2f} s per epoch")
    if args.step_json:
        steps = json.load(open(args.step_json))
        for name in ("fp32", "alignq", "alignq_admm"):
            if name in steps:
                ips = steps[name]["images_per_s"]
                out[f"train_step_{name}_images_per_s"] = ips
                print(f"train step {name}: {ips:,.0f} images/s ({ips / out['prefetch_0']['images_per_s']:.3f} of the "
                      "pipeline's rate)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
