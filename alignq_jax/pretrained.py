"""Pretrained weights: torchvision's ResNet-50 checkpoint converted to this package's ResNet50, saved as a flat
.npz, and restored into a model's variables (the backbone from the file, everything else from the template).

The workflow::

    # once, where torch is installed (the only step that needs it):
    alignq-convert-torchvision resnet50-0676ba61.pth resnet50_imagenet.npz
    # then, without torch:
    template = model.init(key, images, train=True)
    variables, report = load_pretrained("resnet50_imagenet.npz", template, prefix="backbone")

File format: an uncompressed ``numpy.savez`` archive whose keys are the variable paths joined by "/" with the
collection first ("params/layer1_0/conv1/kernel", "batch_stats/bn1/mean"), each a float32 array in this package's
layout (conv kernels HWIO, the Dense kernel (in, out)). Chosen over Flax's msgpack because numpy alone reads it
(``np.load(path).files`` lists the keys, one array loads without the rest), it needs no pickle
(``allow_pickle=False``: loading a downloaded file runs no code), and it does not depend on a Flax version.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alignq_jax.models.resnet50 import STAGE_SIZES, ResNet50

logger = logging.getLogger(__name__)

SEPARATOR = "/"
CONVERTER = "alignq-convert-torchvision"
TORCHVISION_RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
TORCH_MISSING = ("reading a PyTorch checkpoint needs torch, which alignq_jax does not install (only this conversion "
                 "uses it): pip install torch (the CPU wheel is enough: pip install torch --index-url "
                 "https://download.pytorch.org/whl/cpu)")
# The module of the file's variables that a template of another task replaces: ResNet50's classifier.
HEAD = "fc"
# Quantizer parameters and statistics of QuantConv/QuantDense layers live in these subtrees; a converted
# checkpoint never has them (they come from the template, or from ``calibrate`` afterwards).
_QUANTIZER_PREFIXES = ("ConvQuantizer_", "DotQuantizer_")

_BN_NAMES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_TOP = re.compile(r"(conv1|bn1)\.(\w+)")
_BLOCK = re.compile(r"layer([1-9])\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.(\w+)")
_FC = re.compile(r"fc\.(weight|bias)")


# ----------------------------------------------------------------------------------------------------------------
# torchvision -> this package


def _to_numpy(value) -> np.ndarray:
    """A torch tensor (any device; half/bfloat16 read as float32) or array-like, as a numpy array."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # numpy has no bfloat16
        value = value.numpy()
    return np.asarray(value)


def _torchvision_target(key: str) -> tuple[str, tuple[str, ...], str] | None:
    """(collection, module path, kind) of a torchvision ResNet state-dict key, kind "conv", "bn" or "fc"; None for
    a key that carries nothing (``num_batches_tracked``). Raises KeyError for a key of no ResNet layer."""
    if m := _FC.fullmatch(key):
        return ("params", (HEAD, {"weight": "kernel", "bias": "bias"}[m[1]]), "fc")
    if m := _TOP.fullmatch(key):
        module, attr = (m[1],), m[2]
        layer = m[1]
    elif m := _BLOCK.fullmatch(key):
        layer = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(m[3], m[3])
        module, attr = (f"layer{m[1]}_{m[2]}", layer), m[4]
    else:
        raise KeyError(key)
    if "conv" in layer:
        if attr != "weight":  # torchvision's convs have no bias
            raise KeyError(key)
        return ("params", (*module, "kernel"), "conv")
    if attr == "num_batches_tracked":
        return None
    if attr not in _BN_NAMES:
        raise KeyError(key)
    collection, name = _BN_NAMES[attr]
    return (collection, (*module, name), "bn")


def _expected_shapes(stage_sizes: Sequence[int], num_classes: int) -> dict[str, tuple[int, ...]]:
    """{"collection/path": shape} of ResNet50's full-precision variables (from the model itself, nothing runs)."""
    model = ResNet50(stage_sizes=tuple(stage_sizes), num_classes=num_classes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=True))
    return {k: tuple(v.shape) for k, v in flatten_variables(shapes).items()}


def convert_torchvision_resnet50(state_dict: Mapping[str, Any], *, stage_sizes: Sequence[int] = STAGE_SIZES
                                 ) -> dict[str, dict]:
    """torchvision's ``resnet50().state_dict()`` as variables of :class:`alignq_jax.models.resnet50.ResNet50`.

    ``state_dict``: {name: torch tensor or array} with torchvision's names ("layer1.0.downsample.0.weight", ...);
    ``num_batches_tracked`` entries are ignored. Conv weights (O, I, kH, kW) become kernels (kH, kW, I, O), the fc
    weight (classes, 2048) the Dense kernel (2048, classes); BatchNorm weight/bias become "scale"/"bias" in
    "params", running_mean/running_var "mean"/"var" in "batch_stats" (PyTorch keeps the unbiased variance, as
    QuantBatchNorm does). Without fc.weight and fc.bias the result has no "fc" (a backbone, ``num_classes=0``).
    ``stage_sizes``: blocks per stage of the network the checkpoint holds ((3, 4, 6, 3) for ResNet-50).

    Returns {"params": ..., "batch_stats": ...} of float32 numpy arrays. Raises ValueError naming every key that
    is of no ResNet-50 layer, missing, or of another shape than the network's.
    """
    out: dict[str, np.ndarray] = {}
    unknown = []
    for key, value in state_dict.items():
        try:
            target = _torchvision_target(key)
        except KeyError:
            unknown.append(key)
            continue
        if target is None:
            continue
        collection, path, kind = target
        array = _to_numpy(value).astype(np.float32)
        if kind == "conv":
            if array.ndim != 4:
                raise ValueError(f"{key}: a conv weight must be 4-D (out, in, kH, kW); got shape {array.shape}")
            array = array.transpose(2, 3, 1, 0)
        elif kind == "fc" and path[-1] == "kernel":
            if array.ndim != 2:
                raise ValueError(f"{key}: the fc weight must be 2-D (classes, features); got shape {array.shape}")
            array = array.T
        out[SEPARATOR.join((collection, *path))] = np.ascontiguousarray(array)
    if unknown:
        hint = (" (a DataParallel checkpoint? strip the 'module.' prefix)"
                if all(k.startswith("module.") for k in unknown) else "")
        raise ValueError(f"{len(unknown)} key(s) of the state dict are no torchvision ResNet-50 layer{hint}: "
                         f"{_listing(unknown)}")
    fc = out.get(f"params/{HEAD}/kernel")
    expected = _expected_shapes(stage_sizes, 0 if fc is None else fc.shape[-1])
    missing = [k for k in expected if k not in out]
    extra = [k for k in out if k not in expected]
    if missing or extra:
        raise ValueError(f"the state dict does not match ResNet-50 with stage sizes {tuple(stage_sizes)}: "
                         f"missing {_listing(_torchvision_names(missing))}; unexpected "
                         f"{_listing(_torchvision_names(extra))}")
    for k, shape in expected.items():
        if out[k].shape != shape:
            raise ValueError(f"{_torchvision_names([k])[0]} (converted to {k}): shape {out[k].shape} after "
                             f"conversion, ResNet-50 needs {shape}")
    return unflatten_variables(out)


def _torchvision_names(paths: Sequence[str]) -> list[str]:
    """Our variable paths written as torchvision's keys, for error messages."""
    names = []
    for p in paths:
        _, *modules, leaf = p.split(SEPARATOR)
        attr = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var"}.get(leaf, leaf)
        parts = []
        for m in modules:
            if match := re.fullmatch(r"layer(\d)_(\d+)", m):
                parts += [f"layer{match[1]}", match[2]]
            else:
                parts.append({"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(m, m))
        names.append(".".join([*parts, attr]))
    return names


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict in a PyTorch checkpoint file (``torch.save(model.state_dict())``, as torchvision's
    resnet50-*.pth), as {name: numpy array}. Needs torch (ImportError saying how to install it); reads tensors
    only (``weights_only=True``: no code in the file runs)."""
    try:
        import torch
    except ImportError:
        raise ImportError(TORCH_MISSING) from None
    obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping) or not all(hasattr(v, "detach") for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors, as torchvision's "
                         f"resnet50 .pth files); got a {type(obj).__name__}"
                         + (f" with keys {_listing(list(obj))}" if isinstance(obj, Mapping) else ""))
    return {k: _to_numpy(v) for k, v in obj.items()}


# ----------------------------------------------------------------------------------------------------------------
# The file


def flatten_variables(variables: Mapping) -> dict[str, Any]:
    """{"collection/module/.../name": leaf} of a nested variables dict (insertion order)."""
    out = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            if SEPARATOR in str(key):
                raise ValueError(f"variable name {key!r} contains {SEPARATOR!r}, the path separator of the file")
            path = (*prefix, str(key))
            if isinstance(value, Mapping):
                walk(value, path)
            else:
                out[SEPARATOR.join(path)] = value

    walk(variables, ())
    return out


def unflatten_variables(flat: Mapping[str, Any]) -> dict:
    """The nested dict of ``flatten_variables``' output."""
    out: dict = {}
    for key, value in flat.items():
        *modules, leaf = key.split(SEPARATOR)
        node = out
        for m in modules:
            node = node.setdefault(m, {})
        node[leaf] = value
    return out


def save_pretrained(variables: Mapping, path: str | os.PathLike) -> Path:
    """Writes ``variables`` (nested {collection: {module: ... {name: array}}}) to ``path`` as the flat .npz of
    this module (the name is kept as given; numpy would append ".npz"). Written to a temporary file first and
    renamed, so an interrupted run leaves no partial file under ``path``. Returns the path."""
    path = Path(path)
    flat = {k: np.asarray(v) for k, v in flatten_variables(variables).items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **flat)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _missing_file_message(path: Path) -> str:
    return (f"no pretrained weights at {path}: make the file from torchvision's ResNet-50 checkpoint (e.g. "
            f"{TORCHVISION_RESNET50_URL}, torchvision's IMAGENET1K_V1) with `{CONVERTER} resnet50-0676ba61.pth "
            f"{path}` (pip install torch for that step only)")


def read_pretrained(path: str | os.PathLike) -> dict:
    """The nested variables (numpy arrays) in a file written by :func:`save_pretrained` or the converter CLI.
    FileNotFoundError (saying how to make the file) when ``path`` is missing; ValueError when it is no such
    file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(_missing_file_message(path))
    not_weights = f"{path} is not a weights file of {CONVERTER} (a .npz archive of variables)"
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise ValueError(f"{not_weights}: {e}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{not_weights}: it holds a single array")
    with data:
        flat = {k: data[k] for k in data.files}
    if not flat:
        raise ValueError(f"{path} holds no variables")
    return unflatten_variables(flat)


# ----------------------------------------------------------------------------------------------------------------
# Partial restore


@dataclasses.dataclass(frozen=True)
class RestoreReport:
    """What :func:`restore_pretrained` did, as "collection/path" keys of the returned variables.

    loaded: entries taken from the file. dropped: {file entry: why} for entries of the file not used (its
    classifier, when the template has none, one of another number of classes, or it is in ``fresh``). kept:
    entries under the prefix left as the template has them (quantizer parameters and statistics, a new head,
    modules in ``fresh``); entries outside the prefix are always the template's and are not listed."""

    loaded: tuple[str, ...]
    dropped: dict[str, str]
    kept: tuple[str, ...]


def _split_prefix(prefix) -> tuple[str, ...]:
    if prefix is None:
        return ()
    parts = tuple(prefix.split(SEPARATOR)) if isinstance(prefix, str) else tuple(prefix)
    if not parts or not all(isinstance(p, str) and p for p in parts):
        raise ValueError(f"prefix must be None, a module name or a '/'-joined path of them; got {prefix!r}")
    return parts


def _is_quantizer_path(parts: Sequence[str]) -> bool:
    return any(p.startswith(_QUANTIZER_PREFIXES) for p in parts)


def _listing(items: Sequence[str], n: int = 6) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:n])
    return f"[{shown}{f', ... ({len(items) - n} more)' if len(items) > n else ''}]"


def restore_pretrained(pretrained: Mapping, template: Mapping, *, prefix: str | Sequence[str] | None = None,
                       fresh: Sequence[str] = ()) -> tuple[dict, RestoreReport]:
    """``template`` with the entries of ``pretrained`` put in place: the backbone from the file, everything the
    file lacks (new heads, quantizer state, other modules) from the template.

    Args:
      pretrained: nested variables of the pretrained network ({"params": ..., "batch_stats": ...}), e.g.
        :func:`convert_torchvision_resnet50`'s or :func:`read_pretrained`'s.
      template: the variables of the model to fill (``model.init(...)``), nested {collection: {...}}; its
        entries fix the shapes and dtypes.
      prefix: where the pretrained network sits in the template, e.g. "backbone" for a model that holds the
        ResNet50 as its submodule "backbone" (then ``template["params"]["backbone"]`` receives
        ``pretrained["params"]``); None: at the top.
      fresh: top-level modules of the pretrained network to take from the template even where the file has them
        with the same shapes, e.g. ("fc",) for a new head of 1000 classes.

    The file's classifier "fc" is dropped (and said so in the report) when the template has no "fc" at that
    place, one of another shape (another number of classes), or "fc" is in ``fresh``.

    Returns (variables, RestoreReport): the template's tree (plain dicts) with the loaded entries as jnp arrays of
    the template entry's dtype. Raises ValueError when the prefix or a collection of the file is not in the
    template, when no entry of the file has a place in the template ("is this a ResNet-50 checkpoint?"), when
    some entries of the file have none, when an entry has another shape than the template's (naming both), and
    when the template has backbone entries (not the head, ``fresh`` or quantizer state) that the file lacks.
    """
    prefix = _split_prefix(prefix)
    if isinstance(fresh, str) or not all(isinstance(f, str) for f in fresh):
        raise ValueError(f"fresh must be a sequence of module names, e.g. ('fc',); got {fresh!r}")
    fresh = tuple(fresh)
    where = f" under prefix {SEPARATOR.join(prefix)!r}" if prefix else ""
    file_flat = flatten_variables(pretrained)
    if not file_flat:
        raise ValueError("the pretrained variables are empty")

    # The template's entries under the prefix, in the file's collections, keyed as the file's.
    template_flat: dict[str, Any] = {}
    for collection in pretrained:
        if collection not in template:
            raise ValueError(f"the template has no collection {collection!r} (the file has "
                             f"{sorted(pretrained)}, the template {sorted(template)})")
        node = template[collection]
        for depth, name in enumerate(prefix):
            if not isinstance(node, Mapping) or name not in node:
                have = sorted(node) if isinstance(node, Mapping) else []
                raise ValueError(f"prefix {SEPARATOR.join(prefix)!r}: the template's {collection!r} has no "
                                 f"{SEPARATOR.join(prefix[:depth + 1])!r}; its entries there: {have}")
            node = node[name]
        for key, leaf in flatten_variables({collection: node}).items():
            template_flat[key] = leaf

    module_of = lambda key: key.split(SEPARATOR)[1]  # noqa: E731  (the top-level module under the collection)
    file_modules = {module_of(k) for k in file_flat}
    template_modules = {module_of(k) for k in template_flat}
    bad_fresh = [f for f in fresh if f not in file_modules | template_modules]
    if bad_fresh:
        raise ValueError(f"fresh names no module of the file or the template{where}: {bad_fresh}; the file's "
                         f"modules are {sorted(file_modules)}")
    replaceable = {HEAD, *fresh}

    body = [k for k in file_flat if module_of(k) not in replaceable]
    if body and not any(k in template_flat for k in body):
        raise ValueError(f"none of the {len(body)} entries of the file (e.g. {body[0]!r}) is in the template{where}"
                         f" (its entries: {_listing(list(template_flat))}): is this a ResNet-50 checkpoint "
                         f"converted by {CONVERTER}, and does the model hold a ResNet50{where or ' at the top'}?")
    unplaced = [k for k in body if k not in template_flat]
    if unplaced:
        raise ValueError(f"{len(unplaced)} entries of the file have no place in the template{where} (another "
                         f"network or stage sizes?): {_listing(unplaced)}")
    for k in body:
        want, got = tuple(template_flat[k].shape), tuple(np.shape(file_flat[k]))
        if want != got:
            raise ValueError(f"{k}: shape {got} in the file, {want} in the template{where}")

    dropped: dict[str, str] = {}
    loaded = list(body)
    for module in sorted(replaceable & file_modules):
        keys = [k for k in file_flat if module_of(k) == module]
        if module in fresh:
            reason = "in fresh: kept from the template"
        elif not any(module_of(k) == module for k in template_flat):
            reason = f"the template has no {module!r}{where}"
        else:
            mismatched = [k for k in keys if k not in template_flat
                          or tuple(template_flat[k].shape) != tuple(np.shape(file_flat[k]))]
            reason = "" if not mismatched else "; ".join(
                f"{k}: {tuple(np.shape(file_flat[k]))} in the file, "
                f"{tuple(template_flat[k].shape) if k in template_flat else 'absent'} in the template"
                for k in mismatched)
        if reason:
            dropped.update({k: reason for k in keys})
        else:
            loaded += keys

    missing = [k for k in template_flat if k not in file_flat and module_of(k) not in replaceable
               and not _is_quantizer_path(k.split(SEPARATOR))]
    if missing:
        raise ValueError(f"the file lacks {len(missing)} entries of the template{where} (a truncated file, or "
                         f"another network?): {_listing(missing)}")

    loaded_set = set(loaded)
    variables = _to_dicts(template)
    for key in loaded:
        collection, *path = key.split(SEPARATOR)
        node = variables[collection]
        for name in (*prefix, *path[:-1]):
            node = node[name]
        node[path[-1]] = jnp.asarray(file_flat[key], dtype=template_flat[key].dtype)
    kept = tuple(_full(k, prefix) for k in template_flat if k not in loaded_set)
    report = RestoreReport(loaded=tuple(_full(k, prefix) for k in loaded),
                           dropped={_full(k, prefix): r for k, r in dropped.items()}, kept=kept)
    logger.info("restored %d entries%s; dropped %d (%s); kept %d of the template", len(loaded), where,
                len(dropped), ", ".join(sorted({k.split(SEPARATOR)[1] for k in dropped})) or "none", len(kept))
    return variables, report


def _full(key: str, prefix: tuple[str, ...]) -> str:
    collection, rest = key.split(SEPARATOR, 1)
    return SEPARATOR.join((collection, *prefix, rest))


def _to_dicts(tree):
    """A copy of the nested mappings as plain dicts (leaves shared)."""
    if isinstance(tree, Mapping):
        return {k: _to_dicts(v) for k, v in tree.items()}
    return tree


def load_pretrained(path: str | os.PathLike, template: Mapping, *, prefix: str | Sequence[str] | None = None,
                    fresh: Sequence[str] = ()) -> tuple[dict, RestoreReport]:
    """:func:`restore_pretrained` from a file (:func:`read_pretrained`): FileNotFoundError naming ``path`` and
    the converter command that makes it when the file is missing; the errors of both otherwise.

    The template's quantizer parameters (LSQ steps, PACT clips, ...) were initialised from its own random
    kernels; to fit them to the pretrained ones, restore into ``without_quantizer_state(template)`` and then
    ``alignq_jax.quantize.calibrate`` the result on a batch.
    """
    return restore_pretrained(read_pretrained(path), template, prefix=prefix, fresh=fresh)
