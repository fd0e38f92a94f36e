"""The paper's comparison tables in one command: every method, several bit-widths and seeds, clean and shifted data.

    python experiments/ablation.py --dataset fashion_mnist --data-dir DIR --bits 2 4 --seeds 3

For every seed: train one FP32 model, then every method from it (quantization-aware training initialised from that
FP32 model; ZeroQ quantizes it post-training, without training data), and evaluate each model on the clean test
set, the project's shifted test sets (brightness, contrast, blend) and the common corruptions (CIFAR-10-C through
TFDS where it is prepared, else the same 15 corruptions generated with ``imagecorruptions`` on a subset of the test
set, cached). Writes to ``--workdir``:

* ``table2.md``: the component ablation (Uniform, ADMM only, CDF only, CDF + ADMM, best of all);
* ``table1.md``: every baseline against AlignQ at each bit-width;
* ``corruptions.md``: accuracy per corruption (mean over severities);
* ``results.csv`` (one row per trained model), ``results.json`` (every number, the summary and the settings);
* ``ablation.png``: a bar chart with error bars.

Table cells are mean ± sample standard deviation over seeds with the count n; the accuracy is the last epoch's
(no model selection on test data) with BatchNorm statistics re-estimated from training batches after training
(``--bn-reestimate-batches``); the accuracy with the training-time running statistics is in the JSON and CSV too.

Every (method, bits, ADMM weight, seed) cell trains in its own folder and writes its result.json when done, so an
interrupted ablation continues with ``--resume`` where it stopped (the interrupted cell from its last checkpoint)
and never trains a finished cell again. A used workdir is refused without ``--resume`` or ``--overwrite``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from alignq_jax.admm import MODES as ADMM_MODES
from alignq_jax.cli import report
from alignq_jax.cli.classification import (
    DEFAULT_CORRELATION_FEATURES,
    SETTINGS_FILE,
    HelpFormatter,
    RunError,
    Session,
    UsageError,
    apply_saved_settings,
    check_training_flags,
    check_workdir,
    clear_workdir,
    explicit_flags,
    flag,
    flag_checker,
    invocation,
    run_cli,
    settings_of,
    workdir_lock,
)
from alignq_jax.data.batching import close_if_closable
from alignq_jax.models import MODELS
from alignq_jax.quantizers import LEVEL_MODES
from alignq_jax.training.loop import interrupts_outside

DATASETS = ("digits", "fashion_mnist", "mnist", "cifar10", "svhn_cropped")
BITS_CHOICES = (1, 2, 3, 4, 5, 6, 7, 8)
RESULT_FILE = "result.json"
CELL_FILE = "cell.json"
# Flags that say where and how to run, not what is computed: not compared by --resume.
RUN_FLAGS = ("workdir", "resume", "overwrite", "no_progress", "debug", "download", "data_dir", "cache_dir",
             "corruption_workers")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the tables: a quantization method, with or without the ADMM correlation term.

    ``method`` is the name in ``alignq_jax.methods.METHODS`` (None for ZeroQ, whose config is
    ``alignq_jax.zeroq.zeroq_config``) and ``options`` its non-default fields; ``tables`` says in which tables the
    row appears.
    """

    name: str
    label: str
    method: str | None
    admm: bool = False
    tables: tuple[int, ...] = (1,)
    options: tuple[tuple[str, object], ...] = ()

    def quant_method(self):
        """The method as ``QuantConfig`` takes it: its name, or a method object when it has options."""
        if not self.options:
            return self.method
        from alignq_jax.methods import get_method

        return get_method(self.method, **dict(self.options))

    @property
    def post_training(self) -> bool:
        return self.name == "zeroq"


VARIANTS = {
    v.name: v
    for v in (
        Variant("uniform", "Uniform", "uniform", tables=(1, 2)),
        Variant("admm_only", "ADMM only (uniform + ADMM)", "uniform", admm=True, tables=(2,)),
        Variant("cdf_only", "CDF only (AlignQ without ADMM)", "alignq", tables=(1, 2)),
        Variant("cdf_admm", "CDF + ADMM (AlignQ)", "alignq", admm=True, tables=(1, 2)),
        Variant("absmax", "AbsMax (uniform grid from max|x|)", "absmax"),
        Variant("lsq", "LSQ", "lsq"),
        # The papers' constant clip starts (PACT 10; APoT 8, and 3 standard deviations for weights) send most values
        # to the zero level at 2 bits, and a few epochs of fine-tuning do not recover (APoT stayed at chance):
        # both start from the MSE-optimal clip instead, at every bit-width, and the tables say so.
        Variant("pact", "PACT (clip starts at the MSE optimum)", "pact", options=(("alpha_init", "mse"),)),
        Variant("dorefa", "DoReFa", "dorefa"),
        Variant("apot", "APoT (clips start at the MSE optimum)", "apot",
                options=(("weight_alpha_init", "mse"), ("activation_alpha_init", "mse"))),
        Variant("zeroq", "ZeroQ (post-training, no data)", None),
    )
}
FP32 = "fp32"
FP32_LABEL = "FP32 (reference)"
# Row order of the tables: Table 1 puts the baselines first and AlignQ last, as the paper does.
TABLE1_ORDER = ("absmax", "lsq", "pact", "dorefa", "apot", "zeroq", "uniform", "cdf_only", "cdf_admm")
TABLE2_ORDER = ("uniform", "admm_only", "cdf_only", "cdf_admm")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Training defaults of a data set (used for every flag the user leaves out)."""

    model: str
    fp_epochs: int
    epochs: int
    batch_size: int
    fp_lr: float
    lr: float


def _recipes() -> dict[str, Recipe]:
    # small_resnet for 28x28 images where it is registered (it reaches ~91% FP32 on Fashion-MNIST in 4 epochs).
    small28 = "small_resnet" if "small_resnet" in MODELS else "small_cnn"
    return {
        "digits": Recipe("small_cnn", 15, 10, 64, 0.1, 0.033),
        "fashion_mnist": Recipe(small28, 4, 3, 128, 0.1, 0.01),
        "mnist": Recipe(small28, 4, 3, 128, 0.1, 0.01),
        "cifar10": Recipe("resnet20", 200, 200, 128, 0.1, 0.04),
        "svhn_cropped": Recipe("resnet20", 200, 200, 128, 0.1, 0.04),
    }


# ----------------------------------------------------------------------------------------------------------------
# Flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--dataset", default=None, choices=DATASETS, help="data set (required for a new ablation)")
    p.add_argument("--data-dir", default=None,
                   help="folder with local files (IDX files, cifar-10-batches-py, SVHN .mat) or a TFDS data dir")
    p.add_argument("--download", action="store_true", help="let TFDS download the data (needs internet)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 4], choices=BITS_CHOICES,
                   help="weight and activation bit-widths (one cell per bit-width)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...): one FP32 model per seed")
    p.add_argument("--methods", nargs="+", default=list(VARIANTS), metavar="METHOD",
                   help=f"table rows to train: {', '.join(VARIANTS)}")
    p.add_argument("--model", default=None, choices=sorted(MODELS),
                   help="network (default: small_cnn for digits, small_resnet for fashion_mnist/mnist, resnet20 for "
                        "cifar10/svhn_cropped)")
    p.add_argument("--fp-epochs", type=int, default=None,
                   help="epochs of the FP32 model (default per data set: digits 15, fashion_mnist/mnist 4, cifar10/"
                        "svhn_cropped 200)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of quantization-aware training (default per data set: digits 10, fashion_mnist/mnist "
                        "3, cifar10/svhn_cropped 200)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global training batch size (default: 64 for digits, else 128)")
    p.add_argument("--eval-batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--fp-lr", type=float, default=None, help="learning rate of the FP32 model (default: 0.1)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of quantization-aware training (default per data set: digits 0.033, "
                        "fashion_mnist/mnist 0.01, cifar10/svhn_cropped 0.04)")
    p.add_argument("--milestones", type=float, nargs="*", default=[0.4, 0.75],
                   help="LR x0.1 at these fractions (in (0, 1)) of each run's epochs")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay (PyTorch convention)")
    p.add_argument("--levels", default="exact", choices=LEVEL_MODES,
                   help="grid of alignq and uniform: exact = at most 2^bits levels; paper = the official grid")
    p.add_argument("--admm-weight", type=float, nargs="+", default=[1.0],
                   help="weight of the ADMM penalty in the loss; several values give one admm_only and one cdf_admm "
                        "row each")
    p.add_argument("--admm-mode", default="textbook", choices=ADMM_MODES,
                   help="textbook = standard scaled ADMM; paper = the official code's equations")
    p.add_argument("--correlation-features", type=int, default=DEFAULT_CORRELATION_FEATURES,
                   help="estimate each correlation gap from this many random features per step (0 = exact)")
    p.add_argument("--admm-strength-batches", type=int, default=4,
                   help="training batches on which the ADMM term's gradient norm is compared with the "
                        "cross-entropy's (final weights)")
    p.add_argument("--bn-reestimate-batches", type=int, default=50,
                   help="after training, re-estimate BatchNorm statistics over this many training batches (the "
                        "headline accuracy; 0 = off: the training-time running statistics)")
    p.add_argument("--bn-reestimate-every-epoch", action="store_true",
                   help="re-estimate BatchNorm statistics after every epoch too, so the per-epoch history (and the "
                        "best epoch) are not measured with noisy training-time statistics (slower)")
    p.add_argument("--best-epoch", action="store_true",
                   help="also show the best epoch's clean accuracy in the tables (model selection on the test set)")
    p.add_argument("--no-corruptions", action="store_true", help="skip the common-corruption test sets")
    p.add_argument("--corruptions", nargs="+", default=None, metavar="NAME",
                   help="corruptions to evaluate: names, a group (noise, blur, weather, digital) or 'all' (default)")
    p.add_argument("--severities", type=int, nargs="+", default=None, help="severities 1..5 (default: all)")
    p.add_argument("--corruption-examples", type=int, default=500,
                   help="test images per corrupted set (a fixed random subset)")
    p.add_argument("--corruption-workers", type=int, default=1,
                   help="processes generating corrupted sets (once; they are cached)")
    p.add_argument("--cache-dir", default=None,
                   help="where generated corrupted sets are cached (default: <workdir>/corruption_cache)")
    p.add_argument("--zeroq-images", type=int, default=32, help="ZeroQ: distilled images")
    p.add_argument("--zeroq-steps", type=int, default=500, help="ZeroQ: distillation steps per batch")
    p.add_argument("--devices", type=int, default=None, help="number of devices for data parallelism (default: all)")
    p.add_argument("--parallel", default="auto", choices=["auto", "none", "shard_map", "pmap"],
                   help="data-parallel form; auto = shard_map when there is more than one device")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images (quick runs)")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images (quick runs)")
    p.add_argument("--workdir", default=None, help="output folder (default: runs/ablation-<dataset>-<model>)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the ablation in --workdir with its saved settings; finished cells are kept")
    again.add_argument("--overwrite", action="store_true", help="delete the ablation in --workdir first")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are off anyway when the output is not a terminal)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of every error")
    return p


def resolve_defaults(args) -> None:
    """Fills the flags whose default depends on the data set (in place)."""
    if args.dataset is None:
        return
    recipe = _recipes()[args.dataset]
    for name in ("model", "fp_epochs", "epochs", "batch_size", "fp_lr", "lr"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(recipe, name))
    if args.data_dir is not None:
        args.data_dir = str(Path(args.data_dir).expanduser().absolute())
    if args.cache_dir is not None:
        args.cache_dir = str(Path(args.cache_dir).expanduser().absolute())


def default_workdir(args) -> Path:
    return Path("runs") / f"ablation-{args.dataset}-{args.model}"


def validate_args(args, explicit: set[str]) -> None:
    """Checks every flag; raises ValueError naming the flag, the bad value and what is allowed."""
    from alignq_jax.data.corruptions import check_corruptions, check_severities

    need = flag_checker(args)
    if args.dataset is None:
        raise ValueError(f"--dataset is required for a new ablation (one of {', '.join(DATASETS)})")
    for dest in ("seeds", "fp_epochs", "epochs", "batch_size", "eval_batch_size", "corruption_examples",
                 "corruption_workers", "zeroq_images", "zeroq_steps", "admm_strength_batches"):
        need(getattr(args, dest) >= 1, dest, "at least 1")
    for dest in ("lr", "fp_lr"):
        need(getattr(args, dest) > 0, dest, "positive")
    check_training_flags(args, need)
    need(len(set(args.bits)) == len(args.bits), "bits", "distinct bit-widths")
    need(all(w > 0 for w in args.admm_weight), "admm_weight", "positive values")
    need(len(set(args.admm_weight)) == len(args.admm_weight), "admm_weight", "distinct values")
    check_rows(args, explicit, {"admm_weight", "admm_mode", "correlation_features", "admm_strength_batches"})
    if args.no_corruptions:
        given = sorted(flag(d) for d in explicit & {"corruptions", "severities", "corruption_examples",
                                                    "corruption_workers", "cache_dir"})
        if given:
            raise ValueError(f"{', '.join(given)}: set the corruption test sets, which --no-corruptions skips")
    else:
        try:
            check_corruptions(_corruption_names(args.corruptions))
        except ValueError as e:
            raise ValueError(f"--corruptions: {e}") from None
        try:
            check_severities(args.severities)
        except ValueError as e:
            raise ValueError(f"--severities: {e}") from None


def check_rows(args, explicit: set[str], admm_flags: set[str]) -> None:
    """--methods: known, distinct and installed rows; ``admm_flags`` (dests) and the ZeroQ flags given
    explicitly only with a row that uses them. Raises ValueError naming the flag."""
    need = flag_checker(args)
    unknown = [m for m in args.methods if m not in VARIANTS]
    if unknown:
        raise ValueError(f"--methods: unknown {', '.join(map(repr, unknown))}; allowed: {', '.join(VARIANTS)}")
    need(len(set(args.methods)) == len(args.methods), "methods", "distinct names")
    missing = [m for m in args.methods if not _available(VARIANTS[m])]
    if missing:
        raise ValueError(f"--methods: {', '.join(missing)} not available in this installation of alignq_jax "
                         f"(registered methods: {', '.join(_registered())}); leave them out with --methods")
    if not any(VARIANTS[m].admm for m in args.methods):
        given = sorted(flag(d) for d in explicit & admm_flags)
        if given:
            raise ValueError(f"{', '.join(given)}: only used by admm_only and cdf_admm, which --methods leaves out")
    if "zeroq" not in args.methods:
        given = sorted(flag(d) for d in explicit & {"zeroq_images", "zeroq_steps"})
        if given:
            raise ValueError(f"{', '.join(given)}: only used by zeroq, which --methods leaves out")


def _corruption_names(values):
    """--corruptions as check_corruptions takes it: None (all), one name/group/'all', or a list of names."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else values


def _registered() -> list[str]:
    from alignq_jax.methods import METHODS

    return sorted(METHODS)


def _available(variant: Variant) -> bool:
    if variant.post_training:
        import importlib.util

        return importlib.util.find_spec("alignq_jax.zeroq") is not None
    from alignq_jax.methods import METHODS

    return variant.method in METHODS


# ----------------------------------------------------------------------------------------------------------------
# The plan: which cells, in which order


@dataclasses.dataclass(frozen=True)
class Cell:
    """One trained (or, for ZeroQ, quantized) model: a variant at a bit-width, ADMM weight and seed."""

    variant: str  # FP32 or a key of VARIANTS
    bits: int  # 32 for FP32
    seed: int
    admm_weight: float | None = None  # only for variants with ADMM

    @property
    def folder(self) -> str:
        """Relative folder in the workdir: seed0/fp32, seed0/lsq-w2a2, seed0/cdf_admm-w2a2-admm1."""
        if self.variant == FP32:
            return f"seed{self.seed}/{FP32}"
        name = f"{self.variant}-w{self.bits}a{self.bits}"
        if self.admm_weight is not None:
            name += f"-admm{self.admm_weight:g}"
        return f"seed{self.seed}/{name}"

    @property
    def title(self) -> str:
        """What the progress line says: 'lsq w2a2 seed 1', 'cdf_admm w4a4 admm weight 0.1 seed 0'."""
        if self.variant == FP32:
            return f"{FP32} seed {self.seed}"
        weight = f" admm weight {self.admm_weight:g}" if self.admm_weight is not None else ""
        return f"{self.variant} w{self.bits}a{self.bits}{weight} seed {self.seed}"

    @property
    def row(self) -> tuple[str, float | None]:
        """The table row it belongs to (variant, ADMM weight)."""
        return self.variant, self.admm_weight

    @property
    def fp(self) -> bool:
        return self.variant == FP32


def method_bits_defined(variant: Variant, bits: int) -> str | None:
    """None when ``variant`` defines ``bits``; else the reason it does not (the method's own message)."""
    try:
        if variant.post_training:
            from alignq_jax.zeroq import zeroq_config

            zeroq_config(bits, bits)
        else:
            from alignq_jax.methods import get_method

            get_method(variant.method).check_bits(bits)
    except ValueError as e:
        return str(e)
    return None


def plan_cells(args) -> tuple[list[Cell], list[dict]]:
    """(cells in training order, skipped (variant, bits) pairs with the reason).

    Order: seed by seed; within a seed the FP32 model first (every other cell of the seed starts from it), then
    bit-width by bit-width, the variants in ``--methods`` order, ADMM weights in ``--admm-weight`` order.
    """
    skipped, reasons = [], {}
    for bits in args.bits:
        for name in args.methods:
            why = method_bits_defined(VARIANTS[name], bits)
            if why is not None:
                reasons[(name, bits)] = why
                skipped.append({"variant": name, "bits": bits, "reason": why})
    cells = []
    for seed in range(args.seeds):
        cells.append(Cell(FP32, 32, seed))
        for bits in args.bits:
            for name in args.methods:
                if (name, bits) in reasons:
                    continue
                weights = args.admm_weight if VARIANTS[name].admm else [None]
                cells.extend(Cell(name, bits, seed, w) for w in weights)
    return cells, skipped


def _milestones(fractions, epochs: int) -> tuple[int, ...]:
    return tuple(sorted({int(round(f * epochs)) for f in fractions if 0 < f * epochs < epochs}))


def cell_config(args, cell: Cell):
    """The TrainConfig of ``cell`` (for ZeroQ: the config of the quantized model; nothing is trained)."""
    from alignq_jax.quantize import QuantConfig
    from alignq_jax.training import TrainConfig

    fp = cell.variant == FP32
    variant = None if fp else VARIANTS[cell.variant]
    if fp:
        quant = QuantConfig()
    elif variant.post_training:
        from alignq_jax.zeroq import zeroq_config

        quant = zeroq_config(cell.bits, cell.bits)
    else:
        from alignq_jax.methods import METHODS, BNOutputMethod

        alignq_like = issubclass(METHODS[variant.method], BNOutputMethod)
        quant = QuantConfig(
            w_bits=cell.bits, a_bits=cell.bits, method=variant.quant_method(),
            **({"levels": args.levels} if alignq_like else {}),  # the level modes are alignq's and uniform's
            correlation_features=(args.correlation_features or None) if variant.admm else None,
            # Uniform's unrounded transform is only a clip, so its "aligned" gap vanishes inside (-A, A); "ADMM
            # only" preserves the correlation between x and its quantized value (the paper's Theorem 3.2).
            correlation_target="quantized" if variant.admm and variant.method == "uniform" else "aligned",
        )
    epochs = args.fp_epochs if fp else args.epochs
    return TrainConfig(
        model=args.model,
        quant=quant,
        epochs=epochs,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        lr=args.fp_lr if fp else args.lr,
        weight_decay=args.weight_decay,
        milestones=_milestones(args.milestones, epochs),
        admm=bool(variant is not None and variant.admm),
        admm_mode=args.admm_mode,
        admm_weight=cell.admm_weight if cell.admm_weight is not None else 1.0,
        seed=cell.seed,
        parallel=args.parallel,
        num_devices=args.devices,
        bn_reestimate_batches=args.bn_reestimate_batches,
        bn_reestimate_every_epoch=args.bn_reestimate_every_epoch,
    )


def build_plan(args, *, cells_of=None, config_of=None) -> tuple[list[tuple[Cell, object]], list[dict]]:
    """[(cell, TrainConfig)] and the skipped pairs; every config is built here, so bad settings fail before any
    training. Raises ValueError (the message names the cell). ``cells_of(args)`` -> (cells, skipped) and
    ``config_of(args, cell)`` -> TrainConfig (default: ``plan_cells`` and ``cell_config``) let another runner use it
    with its own cells (each with ``fp``, ``title``)."""
    cells, skipped = (cells_of or plan_cells)(args)
    if all(c.fp for c in cells):
        raise ValueError(
            "no quantized cell left: every --methods entry is undefined at every --bits ("
            + "; ".join(f"{s['variant']} {s['bits']}-bit: {s['reason']}" for s in skipped) + ")"
        )
    plan = []
    for cell in cells:
        try:
            plan.append((cell, (config_of or cell_config)(args, cell)))
        except ValueError as e:
            raise ValueError(f"settings of cell {cell.title}: {e}") from None
    check_batch_devices(args, plan[0][1])
    return plan, skipped


def check_batch_devices(args, config) -> None:
    """ValueError unless --batch-size divides over the devices ``config`` runs on (and --devices exist)."""
    from alignq_jax.training.steps import resolve_parallel

    mode, devices = resolve_parallel(config)  # ValueError for --devices beyond what is visible
    if args.batch_size % len(devices):
        raise ValueError(
            f"--batch-size {args.batch_size} must be divisible by the number of devices ({len(devices)}, "
            f"{'--devices' if args.devices else 'all visible'}; parallel={mode})"
        )


# ----------------------------------------------------------------------------------------------------------------
# The ADMM term's strength


def admm_gradient_norms(model, variables, admm_state, images, labels, *, admm, admm_weight: float, key,
                        axis_name: str | None = None) -> dict:
    """Gradient norms of the two terms of the training loss, CE and ``admm_weight`` * ADMM penalty (docs/method.md
    §5-§6), with respect to all parameters, on one training batch in training mode (as the training step computes
    the loss; the ADMM state is held constant).

    Args:
      model: the Linen model (correlation recording on); with per-device ADMM states it must be built with
        BatchNorm synchronised over ``axis_name`` (``make_model(config, n, axis_name=...)``), as in training.
      variables: {"params", "batch_stats"}.
      admm_state: ``ADMMState`` with (B, B) leaves, or per-device states with (n, B / n, B / n) leaves (the
        canonical layout of ``FitResult.state.admm_state``): then the batch is split into n consecutive chunks, one
        per state, and the gradients are averaged over them, as the data-parallel step does.
      images: (B, H, W, C) float32 (normalised); labels: (B,) int.
      admm: the ``ADMM`` solver (its penalty); admm_weight: the penalty's weight in the loss.
      key: PRNG key of the sampled-feature correlation estimate (chunk i uses ``fold_in(key, i)``).

    Returns: {"cross_entropy", "penalty" (unweighted), "ce_grad_norm", "penalty_grad_norm" (of admm_weight *
    penalty), "ratio" (penalty_grad_norm / ce_grad_norm)}, jax scalars (jit-able).
    """
    import jax
    import jax.numpy as jnp
    import optax

    from alignq_jax.quantize import CORRELATION_RNG, GAP_COLLECTION

    params, batch_stats = variables["params"], variables.get("batch_stats", {})

    def terms(state, x, y, k):
        def both(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats", GAP_COLLECTION],
                rngs={CORRELATION_RNG: k},
            )
            ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
            penalty = admm.penalty(updates.get(GAP_COLLECTION, {}), state)
            return jnp.stack([ce, penalty.astype(jnp.float32)])

        values, vjp = jax.vjp(both, params)
        (g_ce,) = vjp(jnp.array([1.0, 0.0], jnp.float32))
        (g_penalty,) = vjp(jnp.array([0.0, 1.0], jnp.float32))
        return values, g_ce, g_penalty

    ndims = {leaf.ndim for leaf in jax.tree.leaves(admm_state)}
    if ndims == {3}:
        if axis_name is None:
            raise ValueError("per-device ADMM states (n, g, g) need axis_name (the model's BatchNorm axis)")
        n = jax.tree.leaves(admm_state)[0].shape[0]
        if images.shape[0] % n:
            raise ValueError(f"a batch of {images.shape[0]} rows does not split into {n} per-device chunks")
        xs = images.reshape((n, images.shape[0] // n) + images.shape[1:])
        ys = labels.reshape((n, -1))
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))

        def device(state, x, y, k):
            return jax.lax.pmean(terms(state, x, y, k), axis_name)

        values, g_ce, g_penalty = jax.tree.map(
            lambda v: v[0], jax.vmap(device, axis_name=axis_name)(admm_state, xs, ys, keys)
        )
    elif ndims == {2}:
        values, g_ce, g_penalty = terms(admm_state, images, labels, jax.random.fold_in(key, 0))
    else:
        raise ValueError(f"admm_state leaves must be (B, B) or (n, g, g) matrices; got ranks {sorted(ndims)}")
    def norm(tree):
        return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree)))

    ce_norm = norm(g_ce)
    penalty_norm = admm_weight * norm(g_penalty)
    return {
        "cross_entropy": values[0],
        "penalty": values[1],
        "ce_grad_norm": ce_norm,
        "penalty_grad_norm": penalty_norm,
        "ratio": penalty_norm / ce_norm,
    }


def admm_strength(config, num_classes: int, state, batches, *, num_batches: int, seed: int = 0) -> dict:
    """``admm_gradient_norms`` of a finished run (``FitResult.state``) over the first ``num_batches`` of
    ``batches`` (training batches {"image", "label"}), compiled once.

    Returns {"batches", "admm_weight", "ratio" (mean over batches of the per-batch ratio), "ratio_min",
    "ratio_max", "ce_grad_norm", "penalty_grad_norm", "cross_entropy", "penalty" (means over batches)}.
    """
    import jax

    from alignq_jax.training import make_model
    from alignq_jax.training.state import DATA_AXIS

    per_device = {leaf.ndim for leaf in jax.tree.leaves(state.admm_state)} == {3}
    model = make_model(config, num_classes, axis_name=DATA_AXIS if per_device else None)
    admm = config.make_admm()
    fn = jax.jit(lambda v, s, x, y, k: admm_gradient_norms(
        model, v, s, x, y, admm=admm, admm_weight=config.admm_weight, key=k,
        axis_name=DATA_AXIS if per_device else None))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    rows = []
    key = jax.random.key(seed)
    for i, batch in enumerate(batches):
        if i == num_batches:
            break
        out = fn(variables, state.admm_state, np.asarray(batch["image"], np.float32),
                 np.asarray(batch["label"], np.int32), jax.random.fold_in(key, i))
        rows.append({k: float(v) for k, v in out.items()})
    if not rows:
        raise ValueError("admm_strength got no training batch")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    ratios = [r["ratio"] for r in rows]
    return {"batches": len(rows), "admm_weight": config.admm_weight, **mean, "ratio_min": float(min(ratios)),
            "ratio_max": float(max(ratios))}


# ----------------------------------------------------------------------------------------------------------------
# Test sets


def shift_sets(dataset) -> dict:
    """The project's shifted test sets (``alignq_jax.data.shifts``), without the clean one."""
    from alignq_jax.data.shifts import shifted_test_sets

    return {k: v for k, v in shifted_test_sets(dataset).items() if k != "clean"}


def corruption_sets(args, dataset, workdir: Path, out=print) -> tuple[dict, dict | None]:
    """({corruption_key: ArrayDataset}, description) of the common corruptions to evaluate ({} and None when
    --no-corruptions). CIFAR-10: the published CIFAR-10-C via TFDS when every requested config is prepared under
    --data-dir; otherwise generated from the test split with imagecorruptions on --corruption-examples images
    (cached)."""
    from alignq_jax.data.corruptions import (
        as_test_sets,
        check_corruptions,
        check_severities,
        cifar10_corrupted_is_prepared,
        corrupted_test_sets,
        load_cifar10_corrupted,
    )

    if args.no_corruptions:
        return {}, None
    names = check_corruptions(_corruption_names(args.corruptions))
    severities = check_severities(args.severities)
    if args.dataset == "cifar10" and _cifar10c_prepared(cifar10_corrupted_is_prepared, args, names, severities):
        n = min(args.corruption_examples, 10_000)
        out(f"corruptions: CIFAR-10-C (TFDS cifar10_corrupted under {args.data_dir}), {n} test images per set")
        sets = as_test_sets(dataset, load_cifar10_corrupted(names, severities, args.data_dir, num_examples=n, seed=0))
        source = "CIFAR-10-C (TFDS cifar10_corrupted)"
    else:
        n = min(args.corruption_examples, dataset.num_test)
        if n < args.corruption_examples:
            out(f"corruptions: --corruption-examples {args.corruption_examples} is more than the {dataset.num_test} "
                f"test images; using all {n}")
        cache = Path(args.cache_dir) if args.cache_dir else workdir / "corruption_cache"
        out(f"corruptions: generated with imagecorruptions on {n} test images, {len(names)} corruptions x "
            f"{len(severities)} severities (cached in {cache})")
        try:
            sets = corrupted_test_sets(dataset, names, severities, num_examples=n, seed=0, cache_dir=cache,
                                       num_workers=args.corruption_workers,
                                       progress=not args.no_progress and sys.stderr.isatty())
        except ImportError as e:
            raise RunError(f"{e}; or pass --no-corruptions") from None
        source = "generated with imagecorruptions from the test split"
    return sets, {"source": source, "examples": n, "corruptions": list(names), "severities": list(severities),
                  "sets": len(sets)}


def _cifar10c_prepared(is_prepared, args, names, severities) -> bool:
    from alignq_jax.data import DataNotFoundError

    try:
        return is_prepared(args.data_dir, names, severities)
    except (ImportError, DataNotFoundError):  # no TFDS installed: the offline generation is the documented source
        return False


# ----------------------------------------------------------------------------------------------------------------
# Running the cells


def fit(*args, **kwargs):
    """``alignq_jax.training.fit`` (looked up at call time, so tests can substitute it)."""
    from alignq_jax.training import fit as _fit

    return _fit(*args, **kwargs)


def _write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename, so a reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise RunError(f"cannot write {path}: {e.strerror or e}") from None


def _json(payload) -> str:
    return json.dumps(payload, indent=2, default=str)


def accuracy_summary(accuracies: dict[str, float], shift_names, corruption_names) -> dict:
    """{"clean", "shift_mean", "corruption_mean", "per_corruption"} of one model's {test set: accuracy}."""
    from alignq_jax.data.corruptions import mean_corruption_accuracy

    out = {"clean": accuracies["clean"],
           "shift_mean": float(np.mean([accuracies[k] for k in shift_names])) if shift_names else None,
           "corruption_mean": None, "per_corruption": None}
    if corruption_names:
        summary = mean_corruption_accuracy({k: accuracies[k] for k in corruption_names})
        out["corruption_mean"] = summary.mean
        out["per_corruption"] = dict(summary.per_corruption)
    return out


def evaluate_model(trained, test_sets: dict) -> dict[str, float]:
    """{test set name: accuracy} of a ``TrainedModel``."""
    return {name: float(trained.evaluate(ds)["accuracy"]) for name, ds in test_sets.items()}


@dataclasses.dataclass
class Context:
    """What every cell needs: flags, data, test sets, where to write, how to print."""

    args: argparse.Namespace
    workdir: Path
    dataset: object
    test_sets: dict
    shift_names: list[str]
    corruption_names: list[str]
    out: object = print
    progress: bool = False
    fp_variables: dict = dataclasses.field(default_factory=dict)


def _fp_variables(ctx: Context, seed: int) -> dict:
    """{"params", "batch_stats"} of seed ``seed``'s FP32 model (from memory, else its last checkpoint)."""
    if seed not in ctx.fp_variables:
        from alignq_jax.training import load_variables

        folder = ctx.workdir / Cell(FP32, 32, seed).folder
        try:
            loaded = load_variables(folder)
        except FileNotFoundError as e:
            raise RunError(f"the FP32 model of seed {seed} cannot be loaded from {folder}: {e}") from None
        ctx.fp_variables[seed] = {"params": loaded["params"], "batch_stats": loaded["batch_stats"]}
    return ctx.fp_variables[seed]


def _has_checkpoints(folder: Path) -> bool:
    path = folder / "checkpoints"
    return path.is_dir() and any(p.is_dir() and p.name.isdigit() for p in path.iterdir())


def cell_identity(cell: Cell) -> dict:
    return {"variant": cell.variant, "bits": cell.bits, "seed": cell.seed, "admm_weight": cell.admm_weight}


def run_cell(ctx: Context, cell: Cell, config) -> dict:
    """Trains (or quantizes) one cell, evaluates it on every test set and writes its result.json; returns the
    record."""
    from alignq_jax.training.loop import config_to_dict

    args, folder = ctx.args, ctx.workdir / cell.folder
    fp = cell.variant == FP32
    variant = None if fp else VARIANTS[cell.variant]
    _write_atomic(folder / CELL_FILE, _json({"cell": cell_identity(cell), "config": config_to_dict(config)}))
    start = time.perf_counter()
    history, summary, strength, status, error = [], {}, None, "done", None
    if variant is not None and variant.post_training:
        trained = raw = _zeroq(ctx, cell, config)
        bn = "running (ZeroQ uses no training data: the FP32 model's statistics)"
    else:
        resume = args.resume and _has_checkpoints(folder)
        log = None if ctx.progress else (lambda line: ctx.out(f"  {cell.title}: {line}"))
        try:
            result = fit(config, ctx.dataset, workdir=folder, init_variables=None if fp else _fp_variables(
                ctx, cell.seed), resume=resume, progress=ctx.progress, log=log)
        except FloatingPointError as e:  # a diverged run is a result of the method, recorded as such
            if fp:  # ... except the FP32 model every other cell of the seed starts from
                raise RunError(f"the FP32 model of seed {cell.seed} diverged ({e}); every quantized model starts "
                               "from it: lower --fp-lr and start again (--overwrite)") from None
            status, error = "diverged", str(e)
            result = None
        if result is not None:
            if fp:
                ctx.fp_variables[cell.seed] = {"params": result.state.params, "batch_stats": result.state.batch_stats}
            history, summary = result.history, result.summary()
            trained, raw = result.trained, result.trained_raw
            bn = "reestimated" if config.bn_reestimate_batches else "running"
            if config.admm:
                batches = ctx.dataset.train_batches(config.batch_size, seed=config.seed, epoch=0)
                try:
                    strength = admm_strength(config, ctx.dataset.num_classes, result.state, batches,
                                             num_batches=args.admm_strength_batches, seed=cell.seed)
                finally:
                    close_if_closable(batches)  # stops the prefetching thread of a generator left half read
    record = {
        **cell_identity(cell),
        "label": FP32_LABEL if fp else variant.label,
        "method": "fp32" if fp else (variant.method or "absmax (zeroq_config)"),
        "admm": bool(config.admm),
        "status": status,
        "error": error,
        "bn_statistics": None,
        "bn_reestimate_batches": config.bn_reestimate_batches,
    }
    if status == "done":
        accuracy = evaluate_model(trained, ctx.test_sets)
        running = accuracy if raw is trained else evaluate_model(raw, ctx.test_sets)
        headline = accuracy_summary(accuracy, ctx.shift_names, ctx.corruption_names)
        plain = accuracy_summary(running, ctx.shift_names, ctx.corruption_names)
        record.update({
            "bn_statistics": bn,
            **headline,
            **{f"{k}_running_stats": v for k, v in plain.items()},
            "accuracy": accuracy,
            "accuracy_running_stats": running,
            "last_epoch_test_accuracy": summary.get("last_epoch_test_accuracy"),
            "best_epoch_test_accuracy": summary.get("best_epoch_test_accuracy"),
            "best_epoch": summary.get("best_epoch"),
            "epochs": summary.get("epochs", 0),
            "admm_strength": strength,
        })
    record["wall_seconds"] = time.perf_counter() - start
    record["history"] = history
    _write_atomic(folder / RESULT_FILE, _json(record))
    return record


def _zeroq(ctx: Context, cell: Cell, config):
    """The ZeroQ model of ``cell``: the seed's FP32 model quantized from data distilled from its BN statistics."""
    return zeroq_model(cell_config(ctx.args, Cell(FP32, 32, cell.seed)), config, _fp_variables(ctx, cell.seed),
                       ctx.dataset, seed=cell.seed, args=ctx.args)


def zeroq_model(fp_config, config, fp_variables: dict, dataset, *, seed: int, args):
    """``TrainedModel`` of ``config`` (ZeroQ's quantizer): the model of ``fp_config`` with ``fp_variables``
    quantized post-training from images distilled from its BN statistics (--zeroq-images, --zeroq-steps)."""
    import jax

    from alignq_jax.training import TrainedModel, make_model
    from alignq_jax.zeroq import zeroq_quantize

    num_classes = dataset.num_classes
    variables = zeroq_quantize(
        make_model(fp_config, num_classes), make_model(config, num_classes), fp_variables, dataset.image_shape,
        key=jax.random.key(seed), num_images=args.zeroq_images, steps=args.zeroq_steps,
    )
    return TrainedModel(make_model(config, num_classes), variables, config, num_classes)


def run(args, plan, skipped, session: Session, out=print) -> dict:
    """Runs every cell of ``plan`` not finished yet in ``session.workdir`` (locked, checked) and writes the
    tables, CSV, JSON and plot; returns the results dict written to results.json."""
    from alignq_jax.data import load_dataset

    workdir = session.workdir
    t0 = time.perf_counter()
    dataset = load_dataset(args.dataset, args.data_dir, download=args.download)
    if args.limit_train or args.limit_test:
        dataset = dataset.take(args.limit_train, args.limit_test)
    if dataset.steps_per_epoch(args.batch_size) < 1:
        raise UsageError(
            f"--batch-size {args.batch_size} is larger than the {dataset.num_train} training images"
            f"{' (--limit-train)' if args.limit_train else ''}: an epoch would have no step"
        )
    out(f"data: {dataset} (loaded in {time.perf_counter() - t0:.1f} s)")
    out(f"devices: {report.machine_description()}")
    command = session.command
    if args.resume:  # the tables show the command that started the ablation
        command = json.loads((workdir / SETTINGS_FILE).read_text()).get("command", command)
    else:
        _write_atomic(workdir / SETTINGS_FILE, _json(
            {"settings": settings_of(args, RUN_FLAGS), "data_dir": args.data_dir, "cache_dir": args.cache_dir,
             "command": command}))
    shifts = shift_sets(dataset)
    corruptions, corruption_info = corruption_sets(args, dataset, workdir, out)
    test_sets = {"clean": dataset, **shifts, **corruptions}
    ctx = Context(args, workdir, dataset, test_sets, list(shifts), list(corruptions), out,
                  progress=not args.no_progress and sys.stderr.isatty())
    out(f"test sets: clean, {', '.join(shifts)}" + (f", {len(corruptions)} corrupted" if corruptions else ""))
    for s in skipped:
        out(f"skipped: {s['variant']} at {s['bits']} bits ({s['reason']})")
    total = len(plan)
    records = run_cells(
        args, plan, workdir, lambda cell, config: run_cell(ctx, cell, config), _describe, out,
        after_each=lambda records: write_outputs(workdir, args, records, skipped, corruption_info, command,
                                                 plot=False, total=total))
    results = write_outputs(workdir, args, records, skipped, corruption_info, command, plot=True,
                            total=total)
    out((workdir / "table2.md").read_text() if any(r["variant"] in TABLE2_ORDER for r in records)
        else (workdir / "table1.md").read_text())
    out(f"results: {', '.join(str(workdir / f) for f in OUTPUT_FILES)}")
    return results


def run_cells(args, plan, workdir: Path, run_one, describe, out=print, after_each=None) -> list[dict]:
    """The records of every cell of ``plan`` [(cell, config)] in order: a cell whose folder holds its result.json
    is read back, any other is run by ``run_one(cell, config)`` (which writes it); ``describe(record)`` is its
    progress line, ``after_each(records so far)`` runs after every cell (e.g. partial tables)."""
    records = []
    total = len(plan)
    for i, (cell, config) in enumerate(plan, 1):
        done = workdir / cell.folder / RESULT_FILE
        if done.is_file():
            record = json.loads(done.read_text())
            out(f"cell {i}/{total}: {cell.title}: finished, {describe(record)}")
        else:
            resuming = args.resume and _has_checkpoints(workdir / cell.folder)
            out(f"cell {i}/{total}: {cell.title}{' (resuming from its checkpoint)' if resuming else ''}")
            record = run_one(cell, config)
            out(f"cell {i}/{total}: {cell.title}: {describe(record)} ({record['wall_seconds']:.0f} s)")
        records.append(record)
        if after_each is not None:
            after_each(records)
    return records


def _describe(record: dict) -> str:
    if record["status"] != "done":
        return f"{record['status']} ({record['error']})"
    text = f"clean {report.percent(record['clean'])}%"
    if record["shift_mean"] is not None:
        text += f", shifted {report.percent(record['shift_mean'])}%"
    if record["corruption_mean"] is not None:
        text += f", corrupted {report.percent(record['corruption_mean'])}%"
    if record.get("admm_strength"):
        text += f", ADMM/CE gradient {record['admm_strength']['ratio']:.3g}"
    return text


# ----------------------------------------------------------------------------------------------------------------
# Summaries, tables, CSV, JSON, plot

OUTPUT_FILES = ("table2.md", "table1.md", "corruptions.md", "results.csv", "results.json", "ablation.png")
METRICS = ("clean", "shift_mean", "corruption_mean", "clean_running_stats", "shift_mean_running_stats",
           "corruption_mean_running_stats", "best_epoch_test_accuracy")


def mean_std(values) -> dict:
    """{"mean", "std" (sample standard deviation, ddof=1; None for fewer than 2 values), "n"} of ``values``
    (None entries are left out; mean None when nothing is left)."""
    vals = [float(v) for v in values if v is not None]
    n = len(vals)
    return {"mean": float(np.mean(vals)) if n else None, "std": float(np.std(vals, ddof=1)) if n > 1 else None,
            "n": n}


def seed_summary(records: list[dict], metrics) -> dict:
    """The seeds of one table cell: {"label", "seeds" (finished), "diverged", metric: mean_std over the finished
    seeds for every metric of ``metrics``}."""
    ok = [r for r in records if r["status"] == "done"]
    return {"label": records[0]["label"], "seeds": sorted(r["seed"] for r in ok),
            "diverged": sorted(r["seed"] for r in records if r not in ok),
            **{m: mean_std([r.get(m) for r in ok]) for m in metrics}}


def summarise(records: list[dict]) -> list[dict]:
    """One entry per table row and bit-width: {"variant", "label", "bits", "admm_weight", "seeds", "diverged",
    metric: mean_std over the seeds, "admm_ratio": mean_std, "per_corruption": {corruption: mean_std}}.
    FP32 rows have bits 32."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["variant"], r["bits"], r["admm_weight"]), []).append(r)
    out = []
    for (variant, bits, weight), rs in groups.items():
        ok = [r for r in rs if r["status"] == "done"]
        entry = {"variant": variant, "bits": bits, "admm_weight": weight, **seed_summary(rs, METRICS)}
        entry["admm_ratio"] = mean_std([r["admm_strength"]["ratio"] for r in ok if r.get("admm_strength")])
        per = [r["per_corruption"] for r in ok if r.get("per_corruption")]
        entry["per_corruption"] = {c: mean_std([p[c] for p in per]) for c in (per[0] if per else {})}
        out.append(entry)
    return out


def fmt_percent(stat: dict) -> str:
    """'81.23 ± 0.45 (n=3)'; with one value '81.23 (n=1)'; no value '–'."""
    if not stat or stat["mean"] is None:
        return "–"
    std = f" ± {100 * stat['std']:.2f}" if stat["std"] is not None else ""
    return f"{100 * stat['mean']:.2f}{std} (n={stat['n']})"


def fmt_ratio(stat: dict) -> str:
    if not stat or stat["mean"] is None:
        return "–"
    std = f" ± {stat['std']:.2g}" if stat["std"] is not None else ""
    return f"{stat['mean']:.3g}{std} (n={stat['n']})"


def row_label(entry_or_variant, admm_weight=None) -> str:
    if isinstance(entry_or_variant, dict):
        variant, label, admm_weight = (entry_or_variant["variant"], entry_or_variant["label"],
                                       entry_or_variant["admm_weight"])
    else:
        variant = entry_or_variant
        label = FP32_LABEL if variant == FP32 else VARIANTS[variant].label
    return label + (f", ADMM weight {admm_weight:g}" if admm_weight is not None else "")


def _columns(args, has_corruptions: bool, with_ratio: bool) -> list[tuple[str, str]]:
    """[(metric key, header suffix)] per bit-width."""
    cols = [("clean", "clean")]
    cols.append(("shift_mean", "shifted (mean)"))
    if has_corruptions:
        cols.append(("corruption_mean", "corrupted (mean)"))
    if args.best_epoch:
        cols.append(("best_epoch_test_accuracy", "clean, best epoch (test-set selection)"))
    if with_ratio:
        cols.append(("admm_ratio", "ADMM grad / CE grad"))
    return cols


def _rows(args, order) -> list[tuple[str, float | None]]:
    rows = []
    for name in order:
        if name not in args.methods:
            continue
        weights = args.admm_weight if VARIANTS[name].admm else [None]
        rows.extend((name, w) for w in weights)
    return rows


def table_markdown(args, order, summary: list[dict], skipped: list[dict], *, best_row: bool, with_ratio: bool,
                   has_corruptions: bool) -> str:
    """A Markdown table: one row per variant (and ADMM weight), per bit-width the columns of ``_columns``; the
    FP32 reference row first; with ``best_row`` a last row naming the best mean of every column."""
    by_key = {(e["variant"], e["bits"], e["admm_weight"]): e for e in summary}
    skip = {(s["variant"], s["bits"]) for s in skipped}
    cols = _columns(args, has_corruptions, with_ratio)
    headers = ["method"] + [f"{b}-bit {name}" for b in args.bits for _, name in cols]
    table_rows = []
    fp = by_key.get((FP32, 32, None))
    if fp is not None:
        table_rows.append([row_label(FP32)] + [
            ("–" if key == "admm_ratio" else fmt_percent(fp.get(key))) for _ in args.bits for key, _ in cols])
    rows = _rows(args, order)
    for name, weight in rows:
        line = [row_label(name, weight)]
        for b in args.bits:
            entry = by_key.get((name, b, weight))
            for key, _ in cols:
                if (name, b) in skip:
                    line.append("n/a (bits not defined)")
                elif entry is None:
                    line.append("not run yet")
                elif key == "admm_ratio":
                    line.append(fmt_ratio(entry["admm_ratio"]) if VARIANTS[name].admm else "–")
                else:
                    text = fmt_percent(entry[key])
                    if entry["diverged"]:
                        text += f" [{len(entry['diverged'])} diverged]"
                    line.append(text)
        table_rows.append(line)
    if best_row and rows:
        line = ["best of all"]
        for b in args.bits:
            for key, _ in cols:
                if key == "admm_ratio":
                    line.append("")
                    continue
                candidates = [(by_key[(n, b, w)][key]["mean"], row_label(n, w)) for n, w in rows
                              if (n, b, w) in by_key and by_key[(n, b, w)][key]["mean"] is not None]
                if candidates:
                    value, label = max(candidates, key=lambda c: c[0])
                    line.append(f"{100 * value:.2f} ({label})")
                else:
                    line.append("–")
        table_rows.append(line)
    return report.markdown_table(headers, table_rows)


def notes(args, records, skipped, corruption_info, command: str, total: int) -> str:
    """The explanation under every table: what the numbers are, how they were made."""
    done = len(records)
    lines = [
        f"Data: {args.dataset}{_limits(args)}; model {args.model}; FP32 {_count(args.fp_epochs, 'epoch')} (lr "
        f"{args.fp_lr:g}), quantization-aware training {_count(args.epochs, 'epoch')} (lr {args.lr:g}) from each "
        f"seed's FP32 model, batch {args.batch_size}; seeds 0..{args.seeds - 1}; alignq/uniform grid: "
        f"{args.levels}; ADMM mode {args.admm_mode}.",
        "Accuracy in %, last epoch of training (no model selection on test data)"
        + ("; the best-epoch column picks the epoch with the highest clean test accuracy: model selection on the "
           "test set, optimistic; per-epoch accuracies measured with "
           + ("re-estimated" if args.bn_reestimate_every_epoch else "training-time running")
           + " BatchNorm statistics" if args.best_epoch else "")
        + ". Cells: mean ± sample standard deviation (ddof=1) over seeds, n = number of seeds.",
        (f"BatchNorm statistics (and quantizer running statistics) re-estimated with the final weights over "
         f"{args.bn_reestimate_batches} training batches after training (headline); the accuracies with the "
         "training-time running statistics are in results.json / results.csv (*_running_stats)."
         if args.bn_reestimate_batches else
         "BatchNorm statistics NOT re-estimated (--bn-reestimate-batches 0): training-time running statistics.")
        + (" ZeroQ keeps the FP32 model's statistics (it uses no training data)." if "zeroq" in args.methods else ""),
        "shifted (mean) = mean accuracy over the project's shifted test sets (brightness +0.2, contrast x0.5, "
        "blend 0.3 with another test image).",
    ]
    if corruption_info:
        lines.append(
            f"corrupted (mean) = mean accuracy over {corruption_info['sets']} corrupted test sets "
            f"({len(corruption_info['corruptions'])} corruptions x severities {corruption_info['severities']}), "
            f"{corruption_info['examples']} test images each, {corruption_info['source']}; per corruption in "
            "corruptions.md.")
    started = [VARIANTS[m] for m in args.methods if VARIANTS[m].options]
    if started:
        lines.append(
            f"{' and '.join(v.label.split(' (')[0] for v in started)}: learned clips start at the clip that minimises "
            "the quantization MSE of the first training batch (activations) or of the kernel (weights), option "
            "\"mse\" of the method, not at the papers' constants (PACT 10; APoT 8, weights 3 standard deviations), "
            "which at 2 bits send most values to the zero level (see docs/baselines.md).")
    if any(VARIANTS[m].admm for m in args.methods):
        lines.append(
            "ADMM grad / CE grad = ||grad of (ADMM weight x penalty)|| / ||grad of cross-entropy|| w.r.t. all "
            f"parameters, final weights and ADMM state, mean over {args.admm_strength_batches} training batches: how "
            "strong the correlation term is next to the task loss.")
    for s in skipped:
        lines.append(f"n/a: {s['variant']} at {s['bits']} bits is not defined ({s['reason']}).")
    if done < total:
        lines.append(f"PARTIAL: {done} of {total} cells finished so far.")
    lines.append(f"Command: `{command}`; {report.machine_description()}; written "
                 f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.")
    return "\n".join(f"- {line}" for line in lines) + "\n"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _limits(args) -> str:
    parts = []
    if args.limit_train:
        parts.append(f"first {args.limit_train} training images")
    if args.limit_test:
        parts.append(f"first {args.limit_test} test images")
    return f" ({', '.join(parts)})" if parts else ""


def corruption_markdown(args, summary, skipped) -> str:
    """Accuracy per corruption (mean over severities), mean ± std over seeds, one row per (variant, bits)."""
    entries = [e for e in summary if e["per_corruption"]]
    if not entries:
        return "No corruption test sets were evaluated.\n"
    names = list(entries[0]["per_corruption"])
    order = [FP32, *TABLE1_ORDER, *(v for v in TABLE2_ORDER if v not in TABLE1_ORDER)]
    entries.sort(key=lambda e: (order.index(e["variant"]), e["bits"], e["admm_weight"] or 0))
    headers = ["method", "bits", "n", *names, "mean"]
    rows = []
    for e in entries:
        cells = []
        for c in names:
            s = e["per_corruption"][c]
            cells.append(f"{100 * s['mean']:.2f}" + (f" ± {100 * s['std']:.2f}" if s["std"] is not None else ""))
        m = e["corruption_mean"]
        mean = f"{100 * m['mean']:.2f}" + (f" ± {100 * m['std']:.2f}" if m["std"] is not None else "")
        rows.append([row_label(e), "FP32" if e["bits"] == 32 else e["bits"], e["corruption_mean"]["n"], *cells, mean])
    return report.markdown_table(headers, rows)


CSV_FIELDS = ("variant", "label", "bits", "admm_weight", "seed", "status", "bn_statistics", "clean", "shift_mean",
              "corruption_mean", "clean_running_stats", "shift_mean_running_stats", "corruption_mean_running_stats",
              "last_epoch_test_accuracy", "best_epoch_test_accuracy", "best_epoch", "epochs", "admm_grad_ratio",
              "admm_ce_grad_norm", "admm_penalty_grad_norm", "wall_seconds")


def csv_text(records: list[dict], shift_names: list[str]) -> str:
    """results.csv: one row per cell (model) with the fields of CSV_FIELDS plus one column per shifted test set
    (headline and running statistics); accuracies as fractions, empty where not defined."""
    buf = io.StringIO()
    extra = [f"acc:{k}" for k in shift_names] + [f"acc_running_stats:{k}" for k in shift_names]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*CSV_FIELDS, *extra])
    for r in records:
        strength = r.get("admm_strength") or {}
        values = {**r, "admm_grad_ratio": strength.get("ratio"), "admm_ce_grad_norm": strength.get("ce_grad_norm"),
                  "admm_penalty_grad_norm": strength.get("penalty_grad_norm")}
        row = ["" if values.get(f) is None else values[f] for f in CSV_FIELDS]
        acc, run = r.get("accuracy") or {}, r.get("accuracy_running_stats") or {}
        row += [acc.get(k, "") for k in shift_names] + [run.get(k, "") for k in shift_names]
        writer.writerow(row)
    return buf.getvalue()


def write_outputs(workdir: Path, args, records, skipped, corruption_info, command: str, *, plot: bool,
                  total: int) -> dict:
    """Writes table2.md, table1.md, corruptions.md, results.csv, results.json (and ablation.png with ``plot``)
    from the finished cells' records; returns the results.json payload."""
    summary = summarise(records)
    has_corruptions = corruption_info is not None
    note = notes(args, records, skipped, corruption_info, command, total)
    title = f"{args.dataset}, {args.model}, {'/'.join(map(str, args.bits))}-bit, {_count(args.seeds, 'seed')}"
    table2 = table_markdown(args, TABLE2_ORDER, summary, skipped, best_row=True, with_ratio=True,
                            has_corruptions=has_corruptions)
    table1 = table_markdown(args, TABLE1_ORDER, summary, skipped, best_row=False,
                            with_ratio=False, has_corruptions=has_corruptions)
    _write_atomic(workdir / "table2.md", f"# Table 2: component ablation ({title})\n\n{table2}\n{note}")
    _write_atomic(workdir / "table1.md", f"# Table 1: baselines and AlignQ ({title})\n\n{table1}\n{note}")
    _write_atomic(workdir / "corruptions.md", f"# Accuracy per corruption, mean over severities ({title})\n\n"
                                              f"{corruption_markdown(args, summary, skipped)}\n{note}")
    shift_names = sorted({k for r in records for k in (r.get("accuracy") or {}) if not _is_corruption(k)} - {"clean"})
    _write_atomic(workdir / "results.csv", csv_text(records, shift_names))
    results = {
        "dataset": args.dataset,
        "model": args.model,
        "settings": settings_of(args, RUN_FLAGS),
        "command": command,
        "machine": report.machine_description(),
        "cells_finished": len(records),
        "cells_total": total,
        "headline": ("last epoch, BatchNorm statistics re-estimated" if args.bn_reestimate_batches
                     else "last epoch, training-time BatchNorm statistics"),
        "corruptions": corruption_info,
        "skipped": skipped,
        "summary": summary,
        "cells": [{k: v for k, v in r.items() if k != "history"} for r in records],
    }
    _write_atomic(workdir / "results.json", _json(results))
    if plot:
        plot_summary(workdir / "ablation.png", args, summary, has_corruptions)
    return results


def _is_corruption(key: str) -> bool:
    from alignq_jax.data.corruptions import parse_corruption_key

    try:
        parse_corruption_key(key)
    except ValueError:
        return False
    return True


def plot_summary(path: Path, args, summary: list[dict], has_corruptions: bool) -> None:
    """Bar chart: one panel per bit-width, one group of bars per table row (clean, shifted, corrupted), error bars
    = sample std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("clean", "clean"), ("shift_mean", "shifted (mean)")]
    if has_corruptions:
        metrics.append(("corruption_mean", "corrupted (mean)"))
    by_key = {(e["variant"], e["bits"], e["admm_weight"]): e for e in summary}
    order = [FP32, *TABLE1_ORDER, *(v for v in TABLE2_ORDER if v not in TABLE1_ORDER)]
    rows = [(FP32, None)] + [(n, w) for n in order[1:] if n in args.methods
                             for w in (args.admm_weight if VARIANTS[n].admm else [None])]
    fig, axes = plt.subplots(len(args.bits), 1, figsize=(max(8, 0.9 * len(rows) + 2), 3.6 * len(args.bits)),
                             squeeze=False)
    width = 0.8 / len(metrics)
    for ax, bits in zip(axes[:, 0], args.bits):
        x = np.arange(len(rows))
        for j, (key, name) in enumerate(metrics):
            means, stds = [], []
            for variant, weight in rows:
                e = by_key.get((variant, 32 if variant == FP32 else bits, weight))
                stat = e[key] if e else None
                means.append(100 * stat["mean"] if stat and stat["mean"] is not None else np.nan)
                stds.append(100 * stat["std"] if stat and stat["std"] is not None else 0.0)
            ax.bar(x + (j - (len(metrics) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=name)
        labels = ["FP32" if v == FP32 else v + (f"\nw={w:g}" if w is not None else "") for v, w in rows]
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlabel(f"method ({bits}-bit weights and activations; FP32 for reference)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    bn = "BN re-estimated" if args.bn_reestimate_batches else "training-time BN statistics"
    report.set_wrapped_title(axes[0, 0], f"{args.dataset}, {args.model}: last-epoch test accuracy ({bn}), mean ± "
                             f"sample std over {_count(args.seeds, 'seed')}", fontsize=10, width=110)
    fig.tight_layout()
    report.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def main(argv=None) -> int:
    """Parses ``argv`` and runs; returns the exit status (0, 1 runtime error, 2 usage, 130 interrupted)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    session = Session(command=shlex.join([*invocation(sys.argv[0], "experiments/ablation.py"), *argv]))

    def body():
        resolve_defaults(args)
        if args.workdir:
            workdir = Path(args.workdir)
        elif args.dataset is None:
            parser.error("--workdir or --dataset is needed (a new ablation needs --dataset; --resume finds the run "
                         "by --workdir)")
        else:
            workdir = default_workdir(args)
        if args.resume:
            saved = apply_saved_settings(args, explicit, workdir, RUN_FLAGS)
            if "cache_dir" not in explicit and saved.get("cache_dir") is not None:
                args.cache_dir = saved["cache_dir"]
        try:
            validate_args(args, explicit)
            plan, skipped = build_plan(args)
        except ValueError as e:
            parser.error(str(e))
        run_in_workdir(args, workdir, session, lambda: run(args, plan, skipped, session))

    return run_cli(body, session=session, debug=args.debug,
                   interrupted="interrupted; finished cells are kept. Continue with",
                   resume_argv=["--no-progress"] if args.no_progress else [],
                   default_script="experiments/ablation.py")


def run_in_workdir(args, workdir: Path, session: Session, work) -> None:
    """``work()`` in ``workdir``: a used workdir is refused without --resume or --overwrite (which empties it
    first), the workdir is locked, and Ctrl-C waits for a checkpoint write to finish."""
    if not args.resume:
        check_workdir(args, workdir)
    with workdir_lock(workdir), interrupts_outside():
        session.workdir = workdir
        if args.overwrite:
            clear_workdir(workdir)
        work()


if __name__ == "__main__":
    sys.exit(main())
