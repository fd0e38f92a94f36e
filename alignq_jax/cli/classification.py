"""Quantization-aware training of an image classifier, the way the paper does it (docs/method.md §6-§8).

Flow: train the FP32 model (or load ``--init-from``), then quantization-aware training at ``--bits`` (or the
paper's progressive chain FP -> 8 -> 4 -> 3 -> 2 with ``--progressive``). Every stage writes its own folder under
``--workdir`` (metrics.jsonl, steps.jsonl, Orbax checkpoints); the run writes settings.json before training and
results.json, results.md and accuracy.png at the end.

Runs are safe to repeat: a workdir that already holds a run is refused unless ``--resume`` (continue it with its
saved settings; finished stages are skipped, the interrupted one continues from its last epoch) or
``--overwrite`` (delete it and start again). A lock stops two runs from sharing a workdir, and Ctrl-C prints the
command that resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path

from alignq_jax.admm import MODES as ADMM_MODES
from alignq_jax.cli import report
from alignq_jax.models import MODELS
from alignq_jax.methods import METHODS
from alignq_jax.quantize import QuantConfig, QuantRules, without_quantizer_state
from alignq_jax.quantizers import ALLOWED_BITS, LEVEL_MODES
from alignq_jax.training.loop import interrupts_outside

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

PROGRESSIVE_CHAIN = (8, 4, 3, 2, 1)
# Sampled correlation features per layer by default (benchmarks/correlation_estimate.py, README Performance).
DEFAULT_CORRELATION_FEATURES = 1024
DTYPE_CHOICES = ("float32", "bfloat16")
SETTINGS_FILE = "settings.json"
LOCK_FILE = ".lock"
# Flags that say where and how to run, not what is computed: not compared by --resume. data_dir is saved and
# reused when not given again, but may change (the data may have moved).
RUN_FLAGS = ("workdir", "resume", "overwrite", "no_progress", "debug", "multihost", "download", "data_dir")
# Settings that only matter with ADMM on: given explicitly while ADMM is off, they are an error, not ignored.
ADMM_FLAGS = ("admm_mode", "admm_weight", "correlation_features", "global_correlation")


class UsageError(Exception):
    """The flags do not fit the workdir or the saved settings (exit 2, no usage text)."""


class RunError(Exception):
    """An expected runtime failure with a message that says what to do (exit 1, no traceback)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        # None means "resolved later" (the help text says how) and False is an off switch: "(default: None)" or
        # "(default: False)" would only add noise.
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def build_parser(dataset: str, description: str, defaults: dict | None = None) -> argparse.ArgumentParser:
    """The classification CLI's parser; ``defaults`` ({dest: value}, e.g. {"model": "mobilenet_v2"}) replaces flag
    defaults for a script with its own recipe (``--help`` shows them). Raises ValueError for a dest no flag has."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--bits", type=int, default=4, choices=[b for b in ALLOWED_BITS if b != 32],
                   help="weight and activation bit-width of the quantized model")
    p.add_argument("--epochs", type=int, default=200, help="epochs of each quantization-aware stage")
    p.add_argument("--fp-epochs", type=int, default=200, help="epochs of the FP32 stage (not with --init-from)")
    p.add_argument("--method", default="alignq", choices=sorted(METHODS),
                   help="quantization method (alignq, the paper's uniform, or a published baseline)")
    p.add_argument("--admm", action=argparse.BooleanOptionalAction, default=None,
                   help="correlation preservation with ADMM (AlignQ's CRP term). Default: on for alignq, off for "
                        "the baselines (--admm turns it on for them too)")
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
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES,
                   help="compute dtype of the network (quantizer statistics stay float32)")
    p.add_argument("--batch-size", type=int, default=128, help="global training batch size")
    p.add_argument("--eval-batch-size", type=int, default=100, help="evaluation batch size")
    p.add_argument("--lr", type=float, default=0.04, help="learning rate of the quantized stages")
    p.add_argument("--fp-lr", type=float, default=0.1, help="learning rate of the FP32 stage")
    p.add_argument("--milestones", type=float, nargs="*", default=[0.4, 0.75],
                   help="LR x0.1 at these fractions (in (0, 1)) of each stage's epochs (the paper's ResNet-20 on "
                        "CIFAR-10: 0.4 0.75 = epochs 80 and 150 of 200)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay (PyTorch convention)")
    p.add_argument("--devices", type=int, default=None, help="number of devices for data parallelism (default: all)")
    p.add_argument("--parallel", default="auto", choices=["auto", "none", "shard_map", "pmap"],
                   help="data-parallel form; auto = shard_map when there is more than one device")
    p.add_argument("--global-correlation", action="store_true",
                   help="all-gather the batch over devices for the correlation term (default: per device)")
    p.add_argument("--seed", type=int, default=0, help="parameters, ADMM init and data order")
    p.add_argument("--dataset", default=dataset, help="TFDS name or local files (cifar10, svhn_cropped, mnist, ...)")
    p.add_argument("--data-dir", default=None,
                   help="folder with local files (cifar-10-batches-py, IDX files) or a TFDS data dir")
    p.add_argument("--download", action="store_true", help="let TFDS download the data (needs internet)")
    p.add_argument("--workdir", default=None,
                   help="output folder (default: runs/<dataset>-<model>-<method>-w<bits>-<levels>-<admm|noadmm>"
                        "[-progressive][-bf16], e.g. runs/cifar10-resnet20-alignq-w4-exact-admm)")
    p.add_argument("--init-from", default=None,
                   help="start from a trained model instead of training FP32: the workdir of a finished run (its "
                        "last stage), one of its stage folders, or a checkpoints folder")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --workdir with its saved settings (flags given again must agree)")
    again.add_argument("--overwrite", action="store_true", help="delete the run in --workdir first, then start anew")
    p.add_argument("--progressive", action="store_true", help="paper's chain: 8 bits from FP, then 4 from 8, ...")
    p.add_argument("--layer-bits", action="append", default=None, metavar="REGEX=BITS",
                   help="repeatable: in every quantized stage, layers whose module path matches REGEX (re.search; "
                        "the first matching --layer-bits wins, in the order given) get BITS (1-8, or 32 = full "
                        "precision) for weights and activations, with the stage's method and options; the others "
                        "take the stage's bits. With --progressive BITS stays the same in every stage. A REGEX that "
                        "matches no quantized layer of --model is an error. E.g. --layer-bits depthwise=8 "
                        "--layer-bits 'stem_conv|stem_bn=8'")
    p.add_argument("--bn-reestimate-batches", type=int, default=50,
                   help="after each stage, re-estimate the BatchNorm statistics with the final weights over this many "
                        "training batches (at most one epoch's) and report that test accuracy as the headline, next "
                        "to the one with the statistics accumulated during training; 0 = off")
    p.add_argument("--bn-reestimate-every-epoch", action="store_true",
                   help="re-estimate after every epoch too, so the per-epoch history and the best epoch are measured "
                        "with re-estimated statistics rather than with the noisy running ones")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images (quick runs)")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images (quick runs)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are off anyway when the output is not a terminal)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of every error")
    p.add_argument("--multihost", action="store_true",
                   help="call jax.distributed.initialize() first (TPU pods / multi-host GPU; one process per host)")
    if defaults:
        # set_defaults accepts any name; a misspelt one would silently leave the generic default in place.
        unknown = sorted(set(defaults) - {a.dest for a in p._actions})
        if unknown:
            raise ValueError(f"defaults for unknown flags {unknown}; flags: {sorted(a.dest for a in p._actions)}")
        p.set_defaults(**defaults)
    return p


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the flags given on the command line: ``argv`` parsed again into a namespace pre-filled with a
    marker (argparse only fills in defaults for names the namespace lacks)."""
    unset = object()
    # An append flag (--layer-bits) appends to what the namespace holds, so it starts from None instead.
    appends = {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)}
    start = {dest: None if dest in appends else unset for dest in vars(parser.parse_args(argv))}
    parsed = vars(parser.parse_args(argv, namespace=argparse.Namespace(**start)))
    return {dest for dest, value in parsed.items() if value is not start[dest]}


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def resolve_defaults(args) -> None:
    """Fills the defaults that depend on other flags (in place): --admm by method; --init-from made absolute."""
    if args.admm is None:
        args.admm = args.method == "alignq"
    if args.init_from is not None:
        args.init_from = str(Path(args.init_from).absolute())


def default_workdir(args) -> Path:
    """runs/<dataset>-<model>-<method>-w<bits>-<levels>-<admm[-paper]|noadmm>[-progressive][-bf16]."""
    from alignq_jax.data import canonical_name

    try:
        data = canonical_name(args.dataset)
    except ValueError:
        data = args.dataset
    admm = ("admm" if args.admm_mode == "textbook" else f"admm-{args.admm_mode}") if args.admm else "noadmm"
    name = f"{data}-{args.model}-{args.method}-w{args.bits}-{args.levels}-{admm}"
    name += "-progressive" if args.progressive else ""
    name += "-bf16" if args.dtype == "bfloat16" else ""
    if getattr(args, "layer_bits", None):  # a digest, so that runs with different rules get different folders
        name += "-layerbits-" + hashlib.sha1(json.dumps(args.layer_bits).encode()).hexdigest()[:6]
    return Path("runs") / name


def settings_of(args, run_flags: tuple[str, ...] = RUN_FLAGS) -> dict:
    """What defines the run's results: every flag except ``run_flags`` (JSON values)."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in run_flags}))


def stage_plan(args) -> list[tuple[str, int]]:
    """[(stage name, bits)], bits 32 = the FP32 stage."""
    plan = [] if args.init_from else [("fp32", 32)]
    chain = [b for b in PROGRESSIVE_CHAIN if b > args.bits] if args.progressive else []
    return plan + [(f"w{b}a{b}", b) for b in chain + [args.bits]]


def parse_layer_bits(specs: list[str] | None) -> tuple[tuple[str, int], ...]:
    """``--layer-bits`` values ["REGEX=BITS", ...] as ((regex, bits), ...) in the order given (the first match
    wins). Raises ValueError naming the flag and the bad value."""
    rules = []
    for spec in specs or ():
        regex, eq, bits = spec.rpartition("=")  # the last "=": a regex may hold one, BITS cannot
        if not eq:
            raise ValueError(f"--layer-bits must be REGEX=BITS, e.g. depthwise=8; got {spec!r} (no '=')")
        if not regex:
            raise ValueError(f"--layer-bits {spec!r}: the REGEX before '=' is empty (--bits sets every layer)")
        try:
            re.compile(regex)
        except re.error as e:
            raise ValueError(f"--layer-bits {spec!r}: {regex!r} is not a regular expression ({e})") from None
        allowed = ", ".join(map(str, ALLOWED_BITS))
        if not bits.strip().isdigit() or int(bits) not in ALLOWED_BITS:
            raise ValueError(f"--layer-bits {spec!r}: BITS must be one of {allowed} (32 = full precision); "
                             f"got {bits!r}")
        rules.append((regex, int(bits)))
    return tuple(rules)


def default_quant(quant) -> QuantConfig:
    """The stage's own config: ``quant`` itself, or the default of its --layer-bits rules."""
    return quant.default if isinstance(quant, QuantRules) else quant


def stage_config(args, bits: int):
    from alignq_jax.training import TrainConfig

    fp = bits == 32
    epochs = args.fp_epochs if fp else args.epochs
    quant = QuantConfig(
        w_bits=bits, a_bits=bits, method=args.method, levels=args.levels, act_range=args.act_range,
        correlation_features=args.correlation_features or None,
    )
    rules = [] if fp else parse_layer_bits(getattr(args, "layer_bits", None))
    if rules:
        configs = []
        for regex, b in rules:
            try:
                configs.append((regex, dataclasses.replace(quant, w_bits=b, a_bits=b)))
            except ValueError as e:
                raise ValueError(f"--layer-bits {regex}={b}: {e}") from None
        quant = QuantRules(tuple(configs), default=quant)
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
        dtype=args.dtype,
        bn_reestimate_batches=args.bn_reestimate_batches,
        bn_reestimate_every_epoch=args.bn_reestimate_every_epoch,
    )


def flag_checker(args):
    """``need(ok, dest, what)``: raises ValueError "--flag must be <what>; got <value>" unless ``ok``."""

    def need(ok: bool, dest: str, what: str):
        if not ok:
            raise ValueError(f"{flag(dest)} must be {what}; got {getattr(args, dest)!r}")

    return need


def check_training_flags(args, need) -> None:
    """The checks of the training flags every experiment CLI shares (weight decay, BN re-estimation, correlation
    sampling, data limits, devices, milestones)."""
    need(args.weight_decay >= 0, "weight_decay", "0 or more")
    need(args.bn_reestimate_batches >= 0, "bn_reestimate_batches", "0 (off) or more")
    if args.bn_reestimate_every_epoch and args.bn_reestimate_batches == 0:
        raise ValueError("--bn-reestimate-every-epoch needs --bn-reestimate-batches above 0 (the batches to "
                         "re-estimate from)")
    need(args.correlation_features == 0 or args.correlation_features >= 2, "correlation_features",
         "0 (the exact gap) or at least 2")
    for dest in ("limit_train", "limit_test", "limit", "devices"):
        if hasattr(args, dest):  # the data limits a CLI has
            need(getattr(args, dest) is None or getattr(args, dest) >= 1, dest, "at least 1 (leave it out for all)")
    need(all(0 < f < 1 for f in args.milestones), "milestones", "fractions of the epochs, each in (0, 1)")


def validate_args(args, explicit: set[str]) -> None:
    """Checks every flag (ValueError naming the flag and the bad value)."""
    need = flag_checker(args)
    for dest in ("epochs", "fp_epochs", "batch_size", "eval_batch_size"):
        need(getattr(args, dest) >= 1, dest, "at least 1")
    for dest in ("lr", "fp_lr", "admm_weight", "act_range"):
        need(getattr(args, dest) > 0, dest, "positive")
    check_training_flags(args, need)
    parse_layer_bits(args.layer_bits)  # the form of each rule; check_layer_bits: the model's layers
    if not args.admm:
        given = sorted(flag(d) for d in explicit & set(ADMM_FLAGS))
        if given:
            why = "--no-admm was given" if "admm" in explicit else f"--method {args.method} has no ADMM unless --admm"
            raise ValueError(f"{', '.join(given)}: only used with ADMM, which is off ({why})")
    if args.init_from is not None:
        given = sorted(flag(d) for d in explicit & {"fp_epochs", "fp_lr"})
        if given:
            raise ValueError(f"{', '.join(given)} set the FP32 stage, which --init-from replaces")


def build_stages(args) -> list[tuple[str, int, object]]:
    """[(stage name, bits, TrainConfig)] for the whole plan, so that bad settings fail before any training."""
    stages = []
    for name, bits in stage_plan(args):
        try:
            stages.append((name, bits, stage_config(args, bits)))
        except ValueError as e:
            raise ValueError(f"settings of stage {name}: {e}") from None
    config = stages[-1][2]
    from alignq_jax.training.steps import resolve_parallel

    mode, devices = resolve_parallel(config)  # ValueError for --devices beyond what is visible
    if config.batch_size % len(devices):
        raise ValueError(
            f"--batch-size {config.batch_size} must be divisible by the number of devices ({len(devices)}, "
            f"{'--devices' if args.devices else 'all visible'}; parallel={mode})"
        )
    if isinstance(config.quant, QuantRules):
        check_layer_bits(args, config)
    return stages


def check_layer_bits(args, config) -> None:
    """Every ``--layer-bits`` rule of ``config.quant`` (a QuantRules) must take at least one quantization-aware layer
    of the model (typo protection): the layers are ``layer_report``'s on the data set's image shape, found
    abstractly (nothing runs). Raises ValueError naming the rule, the closest layer names and a few of the model's
    layer paths."""
    import jax
    import jax.numpy as jnp

    from alignq_jax.data import get_spec
    from alignq_jax.quantize import CORRELATION_RNG, layer_report
    from alignq_jax.training.state import make_model

    spec = get_spec(args.dataset)
    model = make_model(config, spec.num_classes)
    x = jnp.zeros((2, *spec.image_shape), jnp.float32)
    key = jax.random.key(0)
    variables = jax.eval_shape(lambda: model.init({"params": key, CORRELATION_RNG: key}, x, train=True))
    paths = list(layer_report(model, variables, x, train=True).layers)
    rules = config.quant
    used = {rules.match(path) for path in paths}
    names = sorted({*paths, *(part for path in paths for part in path.split("/"))})
    for i, (regex, rule) in enumerate(rules.rules):
        if i in used:
            continue
        given = f"--layer-bits {regex}={rule.w_bits}"
        if any(re.search(regex, path) for path in paths):
            raise ValueError(f"{given}: every layer it matches is taken by an earlier --layer-bits (the first match "
                             "wins)")
        close = difflib.get_close_matches(regex, names, n=4, cutoff=0.5)
        shown = ", ".join(paths[:8]) + (f", ... ({len(paths)} in all)" if len(paths) > 8 else "")
        raise ValueError(
            f"{given}: {regex!r} matches no quantized layer of --model {args.model}"
            + (f" (closest names: {', '.join(close)})" if close else "") + f"; its layer paths: {shown}"
        )


# ----------------------------------------------------------------------------------------------------------------
# --init-from: which checkpoint a path means


def _has_checkpoint_steps(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_dir() and p.name.isdigit() for p in folder.iterdir())


def resolve_init_from(path: str | os.PathLike) -> Path:
    """The stage folder (or checkpoints folder) that ``--init-from path`` means.

    Accepts a finished run's workdir (its last stage, from results.json), a stage folder (holding checkpoints/)
    or a checkpoints folder. Raises ValueError with what was found otherwise.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"--init-from {path}: does not exist")
    if _has_checkpoint_steps(p / "checkpoints") or _has_checkpoint_steps(p):
        return p
    if (p / "checkpoints").is_dir():
        raise ValueError(f"--init-from {path}: its checkpoints folder holds no checkpoint (did the stage run?)")
    if (p / "results.json").is_file():
        stages = json.loads((p / "results.json").read_text()).get("stages") or []
        if not stages:
            raise ValueError(f"--init-from {path}: results.json lists no stage")
        last = p / stages[-1]["stage"]
        if not _has_checkpoint_steps(last / "checkpoints"):
            raise ValueError(f"--init-from {path}: its last stage {last.name} has no checkpoint")
        return last
    if (p / SETTINGS_FILE).is_file():
        finished = sorted(d.name for d in p.iterdir() if (d / "stage.json").is_file())
        raise ValueError(
            f"--init-from {path}: that run has not finished (no results.json); resume it first, or pass one of its "
            f"finished stage folders ({', '.join(finished) or 'none yet'})"
        )
    raise ValueError(
        f"--init-from {path}: not a run folder (with results.json), a stage folder (with checkpoints/) or a "
        "checkpoints folder"
    )


def _admm_leaf_shape(config) -> tuple[int, ...]:
    """Shape of each ADMM matrix in the canonical layout: (devices, g, g) with per-device states, else (g, g)."""
    from alignq_jax.training.steps import per_device_admm, resolve_parallel

    mode, devices = resolve_parallel(config)
    n = len(devices)
    g = config.batch_size if (mode == "none" or config.global_correlation) else config.batch_size // n
    return (n, g, g) if per_device_admm(config, mode) else (g, g)


def admm_to_carry(admm_state, from_mode: str | None, config) -> tuple[object | None, str]:
    """(state to start ``config``'s stage from, or None; why). The official code copies Z and Gamma with the
    checkpoint that initialises a lower-bit run (docs/method.md §5.1); carried only when the state fits."""
    import jax

    if not config.admm:
        return None, "none (this stage has no ADMM)"
    if admm_state is None:
        return None, "new (the model it starts from had no ADMM)"
    if from_mode != config.admm_mode:
        return None, f"new (the model it starts from used ADMM mode {from_mode}, this stage {config.admm_mode})"
    want = _admm_leaf_shape(config)
    shapes = {tuple(x.shape) for x in jax.tree.leaves(admm_state)}
    if shapes != {want}:
        return None, f"new (the saved matrices have shapes {sorted(shapes)}, this stage needs {want})"
    return admm_state, "carried over from the model it starts from"


def _stage_admm_mode(stage_or_checkpoints: Path) -> str | None:
    """The ADMM mode a stage folder's config.json records (None without ADMM or without config.json)."""
    cfg = stage_or_checkpoints / "config.json"
    if stage_or_checkpoints.name == "checkpoints":
        cfg = stage_or_checkpoints.parent / "config.json"
    if not cfg.is_file():
        return None
    record = json.loads(cfg.read_text())
    return record.get("admm_mode") if record.get("admm") else None


def load_init(stage_or_checkpoints: Path) -> dict:
    """{"params", "batch_stats", "admm_state" (None without ADMM), "admm_mode"} of a stage's latest checkpoint."""
    from alignq_jax.training import load_variables

    try:
        variables = dict(load_variables(stage_or_checkpoints))
    except FileNotFoundError as e:
        raise RunError(f"cannot load {stage_or_checkpoints}: {e}") from None
    variables["admm_mode"] = _stage_admm_mode(stage_or_checkpoints)
    variables.setdefault("admm_state", None)
    if variables["admm_mode"] is None:  # no config.json saying how the state was made: not reused
        variables["admm_state"] = None
    return variables


# ----------------------------------------------------------------------------------------------------------------
# The workdir: refuse reuse, resume with saved settings, lock, overwrite


def _entries(workdir: Path) -> list[str]:
    if not workdir.is_dir():
        return []
    return sorted(e for e in os.listdir(workdir) if not e.startswith(LOCK_FILE))


def _looks_like_run(workdir: Path) -> bool:
    if (workdir / SETTINGS_FILE).exists() or (workdir / "results.json").exists():
        return True
    return any(
        (d / "config.json").exists() or (d / "checkpoints").exists() or (d / "stage.json").exists()
        for d in workdir.iterdir() if d.is_dir()
    )


def apply_saved_settings(args, explicit: set[str], workdir: Path, run_flags: tuple[str, ...] = RUN_FLAGS) -> dict:
    """--resume: takes the saved settings for every flag not given and refuses given flags that differ."""
    path = workdir / SETTINGS_FILE
    if not workdir.is_dir():
        raise UsageError(f"--resume: there is no run at {workdir} (the folder does not exist); check --workdir")
    if not path.is_file():
        raise UsageError(
            f"--resume: {workdir} holds no {SETTINGS_FILE}, so there is no run to resume there (it was not started by "
            "this command, or stopped before training began); start it again with --overwrite"
        )
    saved = json.loads(path.read_text())
    given = settings_of(args, run_flags)
    conflicts = [
        f"{flag(k)}: saved {saved['settings'][k]!r}, given {given[k]!r}"
        for k in sorted(explicit & set(saved["settings"]) & set(given))
        if saved["settings"][k] != given[k]
    ]
    if conflicts:
        raise UsageError(
            f"--resume continues the run in {workdir} with its saved settings ({path}); these flags disagree with "
            "them: " + "; ".join(conflicts) + ". Leave them out, or start a new run (another --workdir, or --overwrite)"
        )
    for k, v in saved["settings"].items():
        if hasattr(args, k):
            setattr(args, k, v)
    if "data_dir" not in explicit and saved.get("data_dir") is not None:
        args.data_dir = saved["data_dir"]
    return saved


def check_workdir(args, workdir: Path) -> None:
    """A fresh run (no --resume): refuses a workdir that holds anything unless --overwrite."""
    if workdir.exists() and not workdir.is_dir():
        raise RunError(f"--workdir {workdir} is a file, not a folder")
    entries = _entries(workdir)
    if not entries:
        return
    if not args.overwrite:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise UsageError(
            f"--workdir {workdir} is not empty ({shown}). Pass --resume to continue that run with its saved settings, "
            "or --overwrite to delete it and start again (or choose another --workdir)"
        )
    if not _looks_like_run(workdir):
        raise UsageError(
            f"--overwrite: {workdir} does not look like a run folder (no {SETTINGS_FILE}, results.json or stage "
            "folders), so it is not deleted; remove it yourself or choose another --workdir"
        )


def clear_workdir(workdir: Path) -> None:
    for entry in _entries(workdir):
        target = workdir / entry
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()


def _process() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def _sync(name: str) -> None:
    """Barrier over processes (multi-host); a no-op on one host."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """Holds an exclusive, non-blocking lock on ``workdir`` (one lock file per process of a multi-host run).

    Raises RunError at once when another run holds it, or when the workdir cannot be created or written.
    """
    index, count = _process()
    path = workdir / (LOCK_FILE if count == 1 else f"{LOCK_FILE}.{index}")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(f"cannot write to --workdir {workdir}: {e.strerror or e}") from None
    try:
        if fcntl is None:  # pragma: no cover - Windows
            print(f"warning: no file locking on this platform; nothing stops a second run in {workdir}",
                  file=sys.stderr)
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise RunError(
                    f"another run is using --workdir {workdir} right now (process {holder} holds {path}); wait for "
                    "it to finish or choose another --workdir"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


# ----------------------------------------------------------------------------------------------------------------
# Running the plan


@dataclasses.dataclass
class Session:
    """What the error handlers need to know about a run in progress."""

    workdir: Path | None = None
    command: str = ""


def invocation(argv0: str, default_script: str = "experiments/cifar10.py") -> list[str]:
    """How the running script was started, to repeat in printed commands: ``python <file>.py``, or an installed
    command such as alignq-cifar10 by its name, else ``python default_script``."""
    name = os.path.basename(argv0)
    if argv0.endswith(".py"):
        return ["python", argv0]
    if name and shutil.which(name):
        return [name]
    return ["python", default_script]


def resume_command(workdir: Path, argv0: str, extra: list[str], default_script: str = "experiments/cifar10.py") -> str:
    """The command line that continues the run in ``workdir`` (the script as :func:`invocation` gives it)."""
    return shlex.join([*invocation(argv0, default_script), "--resume", "--workdir", str(workdir), *extra])


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        raise RunError(f"cannot write {path}: {e.strerror or e}") from None


def stage_record(name: str, bits: int, config, result, seconds: float, carried: str | None) -> dict:
    fp = bits == 32
    quant = default_quant(config.quant)
    levels = report.level_counts(quant)  # None for the 32-bit FP32 stage
    rules = config.quant.rules if isinstance(config.quant, QuantRules) else ()
    return {
        "stage": name,
        "bits": bits,
        "method": quant.method_name if not fp else "fp32",
        "levels": quant.levels,
        **levels,
        **({"layer_bits": [[regex, c.w_bits] for regex, c in rules]} if rules else {}),
        "admm": config.admm,
        "admm_mode": config.admm_mode if config.admm else None,
        "admm_state": carried,
        "dtype": config.dtype,
        **result.summary(),
        "wall_seconds": seconds,
        "history": result.history,
    }


def run(args, stages, session: Session, out=print) -> dict:
    """Runs every stage of ``stages`` (from ``build_stages``) in ``session.workdir`` (locked, checked); returns
    the results dict written to results.json."""
    from alignq_jax.data import load_dataset

    workdir = session.workdir
    is_main = _process()[0] == 0
    t0 = time.perf_counter()
    dataset = load_dataset(args.dataset, args.data_dir, download=args.download)
    if args.limit_train or args.limit_test:
        dataset = dataset.take(args.limit_train, args.limit_test)
    steps = dataset.steps_per_epoch(args.batch_size)
    if steps < 1:
        raise UsageError(
            f"--batch-size {args.batch_size} is larger than the {dataset.num_train} training images"
            f"{' (--limit-train)' if args.limit_train else ''}: an epoch would have no step"
        )
    out(f"data: {dataset} (loaded in {time.perf_counter() - t0:.1f} s)")
    out(f"devices: {report.machine_description()}")
    if not args.resume and is_main:
        _write(workdir / SETTINGS_FILE, json.dumps(
            {"settings": settings_of(args), "data_dir": args.data_dir, "command": session.command}, indent=2))
    _sync("settings written")

    init = None
    from_mode = None
    if args.init_from:
        source = resolve_init_from(args.init_from)
        out(f"init: {source}")
        init = load_init(source)
        from_mode = init.pop("admm_mode")
    progress = not args.no_progress and sys.stderr.isatty()
    records, histories = [], {}
    for name, bits, config in stages:
        stage_dir = workdir / name
        done = stage_dir / "stage.json"
        if args.resume and done.exists():
            record = json.loads(done.read_text())
            out(f"stage {name}: already finished (resume), test accuracy last epoch "
                f"{100 * record['last_epoch_test_accuracy']:.2f}%")
            init = load_init(stage_dir)
            from_mode = init.pop("admm_mode")
            records.append(record)
            histories[name] = record["history"]
            continue
        init_variables = None
        carried = "new" if config.admm else None
        if init is not None:
            admm_state, why = admm_to_carry(init["admm_state"], from_mode, config)
            # Learned quantizer state (LSQ steps, PACT clips, absmax ranges) belongs to its bit-width: every stage
            # initialises its own from the model it starts from.
            init_variables = without_quantizer_state({"params": init["params"], "batch_stats": init["batch_stats"]})
            if config.admm:
                carried = why
            if admm_state is not None:
                init_variables["admm_state"] = admm_state
        resume_stage = args.resume and _has_checkpoint_steps(stage_dir / "checkpoints")
        layers = "".join(f", {r}={c.w_bits}" for r, c in getattr(config.quant, "rules", ()))
        method = default_quant(config.quant).method_name
        out(f"stage {name}: {bits} bits{layers}, {config.epochs} epochs, method {method}, "
            f"ADMM {f'{config.admm_mode}, state {carried}' if config.admm else 'off'}"
            f"{', resuming' if resume_stage else ''}")
        start = time.perf_counter()
        result = fit(
            config, dataset, workdir=stage_dir, init_variables=init_variables, resume=resume_stage,
            progress=progress, log=out,
        )
        record = stage_record(name, bits, config, result, time.perf_counter() - start, carried)
        if is_main:
            report.write_json(done, record)
        records.append(record)
        histories[name] = result.history
        init = {"params": result.state.params, "batch_stats": result.state.batch_stats,
                "admm_state": result.state.admm_state}
        from_mode = config.admm_mode if config.admm else None

    bn_note = report.bn_statistics_note(records)
    results = {
        "dataset": dataset.name,
        "model": args.model,
        "settings": settings_of(args),
        "machine": report.machine_description(),
        "note": report.BEST_EPOCH_NOTE,
        "bn_statistics": {
            "headline": report.headline_statistics(records),
            "reestimate_batches": args.bn_reestimate_batches,
            "every_epoch": args.bn_reestimate_every_epoch,
            "note": bn_note,
        },
        "stages": [{k: v for k, v in s.items() if k != "history"} for s in records],
    }
    table = results_table(records)
    title = run_title(dataset.name, args)
    if is_main:
        report.write_json(workdir / "results.json", results)
        _write(workdir / "results.md", f"# {title}\n\n{table}\n{layer_bits_note(args)}"
               f"{report.ACCURACY_NOTE} {bn_note} {report.BEST_EPOCH_NOTE}\n")
        report.plot_stage_chain(workdir / "accuracy.png", [(r["stage"], histories[r["stage"]]) for r in records],
                                title, first_is_init=bool(args.init_from))
    out(table)
    out(f"results: {workdir / 'results.json'}, {workdir / 'results.md'}, {workdir / 'accuracy.png'}")
    return results


def layer_bits_note(args) -> str:
    """A paragraph for results.md saying which layers had other bits (empty without --layer-bits)."""
    rules = parse_layer_bits(args.layer_bits)
    if not rules:
        return ""
    said = "; ".join(f"module paths matching `{regex}` at {b} bits" for regex, b in rules)
    return (f"Layer bits (--layer-bits, the first match wins), in every quantized stage: {said}; the other layers "
            "at the stage's bits.\n\n")


def run_title(dataset_name: str, args) -> str:
    admm = f"ADMM {args.admm_mode}" if args.admm else "no ADMM"
    chain = ", progressive" if args.progressive else ""
    return (f"{dataset_name}, {args.model}: {args.method} {args.bits}-bit ({args.levels} levels), {admm}{chain}, "
            f"{args.dtype}")


def results_table(records: list[dict]) -> str:
    def levels(r):
        if r["bits"] == 32:
            return "-"
        return f"{r.get('weight_levels')} / {r.get('activation_levels')}"

    rows = [
        (r["stage"], r["method"], "-" if r["bits"] == 32 else r["levels"], levels(r),
         r["admm_mode"] if r["admm"] else "off", report.percent(r["last_epoch_test_accuracy"]),
         report.bn_statistics_label(r),
         report.percent(r.get("last_epoch_test_accuracy_running_stats", r["last_epoch_test_accuracy"])),
         report.percent(r["best_epoch_test_accuracy"]), r["best_epoch"], r["epochs"])
        for r in records
    ]
    return report.markdown_table(list(RESULTS_COLUMNS), rows)


RESULTS_COLUMNS = (
    "stage", "method", "grid", "levels (weights / activations)", "ADMM", "test acc % (last epoch)",
    "BN statistics (last epoch)", "test acc % (last epoch, running BN statistics)", "test acc % (best epoch)",
    "best epoch", "epochs",
)


def fit(*args, **kwargs):
    """``alignq_jax.training.fit`` (looked up at call time, so tests can substitute it)."""
    from alignq_jax.training import fit as _fit

    return _fit(*args, **kwargs)


def run_cli(body, *, session: Session, debug: bool, interrupted: str, resume_argv: list[str],
            default_script: str = "experiments/cifar10.py") -> int:
    """Runs ``body()`` and returns the exit status a CLI gives: 0 done, 1 runtime error (``RunError``, missing data,
    or anything unexpected, with its traceback), 2 usage (``UsageError``), 130 interrupted.

    On Ctrl-C it prints how to continue: ``interrupted`` and the resume command (with the flags ``resume_argv``)
    once ``session.workdir`` holds saved settings, else that there is nothing to resume. ``debug``: tracebacks of
    every error.
    """
    from alignq_jax.data import DataNotFoundError

    def fail(message: str, code: int, exc: BaseException) -> int:
        if debug or code == 1 and not isinstance(exc, (RunError, DataNotFoundError)):
            traceback.print_exception(exc)
        print(f"error: {message}", file=sys.stderr)
        return code

    try:
        body()
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exception(e)
        if session.workdir is not None and (session.workdir / SETTINGS_FILE).is_file():
            command = resume_command(session.workdir, sys.argv[0], resume_argv, default_script=default_script)
            print(f"\n{interrupted}:\n  {command}", file=sys.stderr)
        else:
            print("\ninterrupted before training started; nothing to resume (run the same command again)",
                  file=sys.stderr)
        return 130
    except UsageError as e:
        return fail(str(e), 2, e)
    except (RunError, DataNotFoundError) as e:
        return fail(str(e), 1, e)
    except Exception as e:  # unexpected: keep the traceback, end with one clear line
        return fail(f"{type(e).__name__}: {e}", 1, e)
    return 0


def main(argv=None, *, dataset: str = "cifar10", description: str = __doc__, defaults: dict | None = None,
         script: str = "experiments/cifar10.py") -> int:
    """Parses ``argv`` and runs; returns the exit status (0, 1 runtime error, 2 usage, 130 interrupted).

    ``dataset``, ``defaults`` ({dest: value}, see :func:`build_parser`) and ``description`` make a script's recipe
    (experiments/svhn.py); ``script`` is the file named in printed commands when the script was not started as
    ``python <file>.py`` or an installed command.
    """
    parser = build_parser(dataset, description, defaults)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    session = Session(command=shlex.join([*invocation(sys.argv[0], script), *argv]))

    def body():
        if args.multihost:
            import jax

            # Same code path as single host: after this, jax.devices() lists every chip of the pod and the Mesh
            # spans them; each process feeds its own slice of every global batch.
            jax.distributed.initialize()
        resolve_defaults(args)
        workdir = Path(args.workdir) if args.workdir else default_workdir(args)
        if args.resume:
            apply_saved_settings(args, explicit, workdir)
        try:
            validate_args(args, explicit)
            if args.init_from is not None:
                resolve_init_from(args.init_from)
            stages = build_stages(args)
        except ValueError as e:
            parser.error(str(e))
        if not args.resume:
            check_workdir(args, workdir)
        _sync("workdir checked")
        with workdir_lock(workdir), interrupts_outside():
            session.workdir = workdir
            if args.overwrite and _process()[0] == 0:
                clear_workdir(workdir)
            _sync("workdir cleared")
            run(args, stages, session)

    extra = [f for f, on in (("--multihost", args.multihost), ("--no-progress", args.no_progress)) if on]
    return run_cli(body, session=session, debug=args.debug, interrupted="interrupted; continue this run with",
                   resume_argv=extra, default_script=script)
