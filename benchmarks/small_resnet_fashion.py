"""FP32 accuracy and wall time of the ``small_resnet`` model on the full Fashion-MNIST, with the library's own loop.

    python benchmarks/small_resnet_fashion.py                       # the recorded recipe, seeds 0 and 1
    python benchmarks/small_resnet_fashion.py --data-dir /usr/share/datasets/fashion-mnist --seeds 0 \\
        --epochs 5 --lr 0.1 --milestones 3 4 --batch-size 128 --json benchmarks/results/out.json

Data: the original IDX files (Debian's ``dataset-fashion-mnist`` installs them at
/usr/share/datasets/fashion-mnist) or a TFDS data dir, read by ``load_dataset``; 60,000 training and 10,000 test
images, normalised with mean 0.5, std 0.5. Training is ``fit`` with the library's SGD (momentum, L2 decay,
MultiStep schedule). The reported accuracy is the LAST epoch's on the full test set (no model selection on test
data), with BatchNorm statistics re-estimated over training batches after training (``fit``'s default; the
accuracy with the training-time running statistics is recorded too); the best epoch is recorded as well. Wall
time includes compilation and per-epoch evaluation; the machine's load average before and after each run and the
process's CPU time (all threads) are recorded, since other processes on a shared machine inflate the wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import jax
import numpy as np

from alignq_jax.data import load_dataset
from alignq_jax.data.specs import AUGMENTATIONS
from alignq_jax.models import get_model
from alignq_jax.quantize import QuantConfig
from alignq_jax.training import TrainConfig, fit

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder with the Fashion-MNIST IDX files (or TFDS)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one run per seed")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--milestones", type=int, nargs="*", default=[3, 4], help="epochs after which lr *= lr-decay")
    p.add_argument("--lr-decay", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--augment", default=None, choices=AUGMENTATIONS,
                   help="training augmentation (default: the data set's own, 'none' for Fashion-MNIST)")
    p.add_argument("--bn-reestimate-batches", type=int, default=TrainConfig.bn_reestimate_batches,
                   help="training batches to re-estimate the BatchNorm statistics over after the last epoch (0: off)")
    p.add_argument("--num-train", type=int, default=None, help="use only the first N training images (quick runs)")
    p.add_argument("--json", default="benchmarks/results/small_resnet_fashion.json", help="write the results here")
    return p.parse_args(argv)


def parameter_count(num_classes: int, image_shape: tuple[int, int, int]) -> int:
    model = get_model("small_resnet", config=QuantConfig(), num_classes=num_classes)
    x = jax.ShapeDtypeStruct((1, *image_shape), np.float32)
    shapes = jax.eval_shape(lambda v: model.init(jax.random.key(0), v, train=False), x)
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))


def main(argv=None):
    args = parse_args(argv)
    dataset = load_dataset("fashion_mnist", args.data_dir)
    if args.augment is not None:
        dataset = dataclasses.replace(dataset, augment=args.augment)
    if args.num_train is not None:
        dataset = dataset.take(num_train=args.num_train)
    runs = []
    for seed in args.seeds:
        config = TrainConfig(
            model="small_resnet", quant=QuantConfig(), epochs=args.epochs, batch_size=args.batch_size,
            eval_batch_size=1000, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
            milestones=tuple(args.milestones), lr_decay=args.lr_decay, seed=seed,
            bn_reestimate_batches=args.bn_reestimate_batches,
        )
        load_before = os.getloadavg()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = fit(config, dataset, log=lambda line, s=seed: print(f"seed {s}: {line}", flush=True))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        load_after = os.getloadavg()
        runs.append({
            "seed": seed,
            "wall_seconds": round(wall, 1),
            "process_cpu_seconds": round(cpu, 1),  # all threads; less affected by other processes than wall time
            "train_seconds": round(sum(r["train_seconds"] for r in result.history), 1),
            "load_average_1_5_15_min_before": [round(v, 2) for v in load_before],
            "load_average_1_5_15_min_after": [round(v, 2) for v in load_after],
            **result.summary(),
            "history": [
                {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in result.history
            ],
        })
        print(f"seed {seed}: last-epoch test accuracy {result.last['test_accuracy']:.4f}, wall {wall:.0f} s",
              flush=True)
    last = [r["last_epoch_test_accuracy"] for r in runs]
    last_running = [r["last_epoch_test_accuracy_running_stats"] for r in runs]
    out = {
        "meta": {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "devices": jax.device_count(),
            "model": "small_resnet",
            "parameters": parameter_count(dataset.num_classes, dataset.image_shape),
            "dataset": f"{dataset.name}: {dataset.num_train} train, {dataset.num_test} test, augment "
                       f"{dataset.augment!r}",
            "recipe": {k: v for k, v in vars(args).items() if k not in ("json", "seeds", "data_dir")},
            "accuracy_reported": "last epoch, full test set; last_epoch_test_accuracy with BatchNorm statistics "
                                 "re-estimated after training when bn_reestimate_batches > 0 (fit's default), "
                                 "*_running_stats with the training-time running statistics",
        },
        "last_epoch_test_accuracy_mean": statistics.fmean(last),
        "last_epoch_test_accuracy_min": min(last),
        "last_epoch_test_accuracy_running_stats_mean": statistics.fmean(last_running),
        "last_epoch_test_accuracy_running_stats_min": min(last_running),
        "runs": runs,
    }
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
