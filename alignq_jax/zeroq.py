"""ZeroQ: zero-shot post-training quantization from the BatchNorm statistics of a trained FP32 model.

Cai, Yao, Dong, Gholami, Mahoney and Keutzer (CVPR 2020), "ZeroQ: A Novel Zero Shot Quantization Framework", as the
zero-shot baseline of the comparison tables: no training data and no fine-tuning.

1. :func:`distill_images` ("Distilled Data"): start from Gaussian noise in the normalised input space and optimise
   the pixels with Adam so that every BatchNorm input's mean and standard deviation match that layer's running
   mean and standard deviation, and the input itself has mean 0 and std 1 per channel (:func:`distillation_loss`).
2. :func:`zeroq_config`: the quantizer, a uniform grid from the tensor's range (``AbsMax``), weights per output
   channel, activation ranges the max of the activations on the distilled data.
3. :func:`zeroq_calibrate` / :func:`zeroq_quantize`: create the quantizer state of the quantized model and set its
   activation ranges from the distilled images (the running maximum over the distilled batches, as ZeroQ's code
   does), keeping the FP model's weights and BatchNorm statistics.

Where this follows ZeroQ's published code and where it differs:

* Optimiser: Adam, learning rate 0.5, 500 iterations per batch, the learning rate divided by 10 after 100 steps
  without improvement (down to 1e-4), batches of 32 distilled images, each batch optimised on its own: the code's
  settings. Standard deviations are ``sqrt(var + 1e-6)`` on both sides, and every term is a squared L2 distance
  over channels, as in the code.
* Statistics: the moments of each BatchNorm input over the whole distilled batch (N, H, W), computed in training
  mode from the ``BN_MOMENTS_COLLECTION`` the layers sow. The code hooks the conv outputs in evaluation mode and
  matches every image's own spatial moments (the squared distances averaged over the batch), a stricter target:
  each image alone must match. The two forward passes agree once the batch moments equal the running ones.
* Start: standard Gaussian noise (the paper's description); the code starts from a scaled uniform distribution.
* Weights: the code quantizes every conv and linear kernel per output channel with an asymmetric min/max grid of
  2^k levels. Here the kernels are quantized per output channel with ``AbsMax``'s symmetric grid from max|w|
  (2^k - 1 levels, zero exactly representable); the model's classifier stays in full precision as in every
  method of this library. At 8 bits the steps are close (2 max|w| / 254 against (max w - min w) / 255); at 2 bits
  the symmetric grid has 3 levels where the code's has 4.
* Activations: the code quantizes after every ReLU with the running [min, max] over the distilled batches (min 0
  after a ReLU); here the method's own placement (the input of every conv that follows a ReLU) with the range
  [0, running max], which is the same grid on non-negative inputs.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignq_jax.methods.absmax import AbsMax
from alignq_jax.quantize import (
    BN_MOMENTS_COLLECTION,
    ConvQuantizer,
    DotQuantizer,
    QuantActivation,
    QuantConfig,
    calibrate,
    module_path,
)

STD_EPS = 1e-6  # ZeroQ's: sigma = sqrt(var + eps), for the running and the batch statistics alike
PLATEAU_PATIENCE = 100  # ZeroQ's ReduceLROnPlateau(patience=100, factor=0.1, min_lr=1e-4)
PLATEAU_FACTOR = 0.1
MIN_LR = 1e-4
RANGE_STATS = ("range",)  # running statistics whose ZeroQ update over batches is the maximum


def zeroq_config(w_bits: int, a_bits: int) -> QuantConfig:
    """ZeroQ's quantizer as a ``QuantConfig``: ``AbsMax(per_channel=True)`` (uniform grids, no learning).

    Weights: one symmetric scale per output channel from max|w|; activations (conv inputs after a ReLU): an unsigned
    grid on [0, r], r the running "range" statistic that :func:`zeroq_calibrate` sets to the maximum activation
    on the distilled data. Bits 2..8 or 32 (AbsMax has no 1-bit grid).
    """
    return QuantConfig(w_bits=w_bits, a_bits=a_bits, method=AbsMax(per_channel=True))


# ------------------------------------------------------------------------------------------------------------------
# Distilled data


def _check_image_shape(image_shape) -> tuple[int, int, int]:
    shape = tuple(image_shape) if isinstance(image_shape, (tuple, list)) else None
    if shape is None or len(shape) != 3 or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise ValueError(f"image_shape must be (H, W, C) with positive ints; got {image_shape!r}")
    return tuple(int(d) for d in shape)


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


def _bn_pairs(moments: dict, stats: dict, path: tuple[str, ...] = ()) -> list:
    """[(path, batch mean, batch biased var, running mean, running var)] for every sown call of every BatchNorm."""
    pairs = []
    for name, sub in moments.items():
        if name != "moments":
            pairs += _bn_pairs(sub, stats, (*path, name))
            continue
        running = stats
        for key in path:
            running = running.get(key, {}) if isinstance(running, dict) else {}
        if not (isinstance(running, dict) and "mean" in running and "var" in running):
            raise ValueError(f"BatchNorm {'/'.join(path)!r} sowed moments but batch_stats has no mean/var for it")
        for mean, var in sub:
            pairs.append(("/".join(path), mean, var, running["mean"], running["var"]))
    return pairs


def _std(var):
    return jnp.sqrt(var + STD_EPS)


def distillation_loss(model: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
    """ZeroQ's objective on a batch of candidate images (a pure function of ``images``; differentiate it).

    ``model.apply(variables, images, train=True)`` with ``BN_MOMENTS_COLLECTION`` mutable gives every BatchNorm
    input's batch mean and biased variance (C,); the loss is

        sum_BN ||mean - running_mean||^2 + ||sqrt(var + eps) - sqrt(running_var + eps)||^2
        + ||mean_c(images)||^2 + ||std_c(images) - 1||^2            (the input, per channel c, over N, H, W)

    with eps = 1e-6. The running statistics are ``variables["batch_stats"]`` (left unchanged: the train-mode
    update is discarded).

    Args:
      model: a Linen model called as ``model(x, train=...)`` whose BatchNorms are ``QuantBatchNorm``.
      variables: {"params", "batch_stats"} of the trained FP model.
      images: (N, H, W, C) float32, normalised input space.
    Returns: () float32.
    """
    images = jnp.asarray(images, jnp.float32)
    _, state = model.apply(variables, images, train=True, mutable=["batch_stats", BN_MOMENTS_COLLECTION])
    pairs = _bn_pairs(state.get(BN_MOMENTS_COLLECTION, {}), variables.get("batch_stats", {}))
    if not pairs:
        raise ValueError(
            "the model recorded no BatchNorm moments: ZeroQ needs QuantBatchNorm layers with running statistics"
        )
    axes = tuple(range(images.ndim - 1))
    in_mean = jnp.mean(images, axes)
    in_var = jnp.mean(jnp.square(images - in_mean), axes)
    loss = jnp.sum(jnp.square(in_mean)) + jnp.sum(jnp.square(_std(in_var) - 1.0))
    for _, mean, var, run_mean, run_var in pairs:
        loss = loss + jnp.sum(jnp.square(mean - run_mean)) + jnp.sum(jnp.square(_std(var) - _std(run_var)))
    return loss


def _optimizer(lr: float) -> optax.GradientTransformationExtraArgs:
    return optax.chain(
        optax.adam(lr),
        optax.contrib.reduce_on_plateau(factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE,
                                        min_scale=min(1.0, MIN_LR / lr)),
    )


@partial(jax.jit, static_argnums=(0, 1))
def _distill_step(model, lr, variables, x, opt_state):
    """One Adam (+ plateau) step on the images x; jitted once per model, learning rate and batch shape."""
    loss, grad = jax.value_and_grad(lambda x: distillation_loss(model, variables, x))(x)
    updates, opt_state = _optimizer(lr).update(grad, opt_state, x, value=loss)
    return optax.apply_updates(x, updates), opt_state, loss


def distill_images(
    model: nn.Module,
    variables: dict,
    image_shape,
    *,
    key: jax.Array,
    num_images: int = 32,
    steps: int = 500,
    lr: float = 0.5,
    batch_size: int | None = None,
    progress: Callable[[dict], Any] | None = None,
) -> np.ndarray:
    """ZeroQ's Distilled Data: images whose BatchNorm-input statistics match the FP model's running statistics.

    The start is ``jax.random.normal(key, (num_images, H, W, C))``; it is split into batches of ``batch_size``
    (the last may be smaller), and each batch minimises :func:`distillation_loss` on its own for ``steps``
    Adam steps (learning rate ``lr``, divided by 10 after 100 steps without improvement, not below 1e-4), one
    jitted step at a time (compiled once per model, learning rate and batch shape). No data is read: only the
    model and its variables. Deterministic given ``key``.

    Args:
      model: the FP model (``model(x, train=...)``, QuantBatchNorm layers).
      variables: its {"params", "batch_stats"}.
      image_shape: (H, W, C) of one image.
      key: PRNG key of the starting noise.
      num_images: N, the number of images distilled (ZeroQ: 32).
      steps: optimisation steps per batch (ZeroQ: 500); 0 returns the Gaussian start.
      lr: Adam's initial learning rate (ZeroQ: 0.5).
      batch_size: images optimised together (their moments are the batch's); None: all N at once.
      progress: called after every step with {"batch", "num_batches", "step", "steps", "loss"} (0-based batch,
        1-based step, this step's loss before its update, as a float).
    Returns: (N, H, W, C) float32 numpy array in the normalised input space.
    """
    shape = _check_image_shape(image_shape)
    num_images = _check_positive_int("num_images", num_images)
    steps = _check_positive_int("steps", steps, minimum=0)
    batch_size = num_images if batch_size is None else _check_positive_int("batch_size", batch_size)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number; got {lr!r}")
    lr = float(lr)
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    images = jax.random.normal(key, (num_images, *shape), jnp.float32)
    starts = range(0, num_images, batch_size)
    out = []
    for b, start in enumerate(starts):
        x = images[start:start + batch_size]
        opt_state = _optimizer(lr).init(x)
        for i in range(steps):
            x, opt_state, loss = _distill_step(model, lr, variables, x, opt_state)
            if progress is not None:
                progress({"batch": b, "num_batches": len(starts), "step": i + 1, "steps": steps,
                          "loss": float(loss)})
        out.append(np.asarray(x, np.float32))
    return np.concatenate(out, axis=0)


# ------------------------------------------------------------------------------------------------------------------
# Calibration on the distilled data


def _range_input(module: nn.Module, args):
    """(config, method, tensor it quantizes) for a module that keeps running ranges of its quantized input, else
    None: a conv/dot quantizer of a QuantConv/QuantDense (the layer input) or a QuantActivation of a method placed
    on conv inputs (its input, after the ReLU when it applies one)."""
    if isinstance(module, (ConvQuantizer, DotQuantizer)):
        layer = module.parent
        config = layer.config.resolve(module_path(layer))
        if not (config.quantizes_conv_input and layer.quantize_input):
            return None
        x = args[0]
    elif isinstance(module, QuantActivation):
        config = module.config.resolve(module_path(module))
        if config.a_bits == 32 or config.quantizes_bn_output:
            return None
        x = jax.nn.relu(args[0]) if module.relu else args[0]
    else:
        return None
    method = config.quantizer
    if not method.activation_stats or not module.has_variable("batch_stats", "activation"):
        return None
    if tuple(method.activation_stats) != RANGE_STATS:
        raise ValueError(
            f"ZeroQ sets activation ranges (the running statistic 'range'); {config.method_name} keeps "
            f"{tuple(method.activation_stats)}"
        )
    return config, method, x


def _range_interceptor(reset: bool):
    """Before a module quantizes its input, its range becomes this batch's range (``reset``) or
    max(range, this batch's range): ZeroQ's update of the activation ranges over the distilled batches."""

    def intercept(next_fun, args, kwargs, context):
        found = _range_input(context.module, args) if context.method_name == "__call__" else None
        if found is not None:
            config, method, x = found
            module = context.module
            batch = jax.lax.stop_gradient(method.activation_batch_stats(x, config.a_bits))
            old = module.get_variable("batch_stats", "activation")
            new = {k: jnp.asarray(batch[k], jnp.float32) if reset else jnp.maximum(jnp.asarray(old[k], jnp.float32),
                                                                                    batch[k]) for k in old}
            module.put_variable("batch_stats", "activation", new)
        return next_fun(*args, **kwargs)

    return intercept


@partial(jax.jit, static_argnums=0)
def _calibrate(model, variables, x):
    return calibrate(model, variables, x, train=False)


@partial(jax.jit, static_argnums=(0, 3))
def _update_ranges(model, variables, x, reset: bool):
    """Evaluation-mode forward of x that sets every activation range to x's range (``reset``) or to
    max(range, x's range) on the way, each layer before it quantizes."""
    with nn.intercept_methods(_range_interceptor(reset)):
        _, state = model.apply(variables, x, train=False, mutable=["batch_stats"])
    return {**variables, "batch_stats": state["batch_stats"]}


def zeroq_calibrate(quant_model: nn.Module, fp_variables: dict, images, *, batch_size: int | None = None) -> dict:
    """The quantized model's variables with its quantizer state set from ``images`` (the distilled data).

    The weights and BatchNorm statistics are the FP model's (``fp_variables``, unchanged). Every quantizer parameter
    or statistic the FP variables lack is created by :func:`alignq_jax.quantize.calibrate` (evaluation mode) on the
    first batch; then, batch by batch in order and in evaluation mode, each activation range becomes this batch's
    range (first batch: any range already in ``fp_variables`` is replaced) or max(range, this batch's range) just
    before that layer quantizes: ZeroQ's running-max update over the distilled batches. Ranges are kept by the
    conv/dot quantizers of QuantConv/QuantDense and by QuantActivation layers of conv-input methods. With one batch
    the range of every layer is the maximum of its input over all images, the earlier layers quantized with their
    final ranges.

    Args:
      quant_model: the quantized model (e.g. built with :func:`zeroq_config`), called as ``model(x, train=...)``.
      fp_variables: {"params", "batch_stats"} of the trained FP model (same architecture and names).
      images: (N, H, W, C) float, normalised input space.
      batch_size: images per forward; None: all at once.
    Returns: {"params", "batch_stats"} for ``quant_model``.
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, H, W, C) array; got shape {images.shape}")
    n = images.shape[0]
    batch_size = n if batch_size is None else _check_positive_int("batch_size", batch_size)
    variables = {"params": fp_variables["params"], "batch_stats": fp_variables.get("batch_stats", {})}
    variables = _calibrate(quant_model, variables, images[:batch_size])
    for start in range(0, n, batch_size):  # the first batch replaces any range the variables already had
        variables = _update_ranges(quant_model, variables, images[start:start + batch_size], start == 0)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def zeroq_quantize(
    fp_model: nn.Module,
    quant_model: nn.Module,
    fp_variables: dict,
    image_shape,
    *,
    key: jax.Array,
    num_images: int = 32,
    steps: int = 500,
    batch_size: int | None = None,
    lr: float = 0.5,
    progress: Callable[[dict], Any] | None = None,
) -> dict:
    """ZeroQ end to end: :func:`distill_images` from ``fp_model``, then :func:`zeroq_calibrate` of ``quant_model``
    on those images (same ``batch_size``). No training data, no fine-tuning.

    Args:
      fp_model, fp_variables: the trained FP model and its {"params", "batch_stats"}.
      quant_model: the same architecture with the quantized config (e.g. ``zeroq_config(4, 4)``).
      image_shape: (H, W, C). key, num_images, steps, lr, progress: as :func:`distill_images`.
      batch_size: distilled images optimised together and fed per calibration forward; None: all at once.
    Returns: {"params", "batch_stats"} for ``quant_model``: the FP weights and BatchNorm statistics, plus the
    quantizer state with activation ranges from the distilled data.
    """
    images = distill_images(fp_model, fp_variables, image_shape, key=key, num_images=num_images, steps=steps,
                            lr=lr, batch_size=batch_size, progress=progress)
    return zeroq_calibrate(quant_model, fp_variables, images, batch_size=batch_size)


__all__ = ["distill_images", "distillation_loss", "zeroq_calibrate", "zeroq_config", "zeroq_quantize"]
