"""reestimate_batch_stats: BatchNorm statistics over the union of batches (checked against a numpy forward), masked
rows never entering, ``which`` restricting the leaves, quantizer statistics averaged by rows, one compile per batch
shape."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax.methods import CONV_INPUT, QuantMethod
from alignq_jax.models import get_model
from alignq_jax.quantize import QuantConfig
from alignq_jax.training import batch_stats_paths, reestimate_batch_stats
from alignq_jax.training import batchnorm as bn_module
from tiny_data import tiny_dataset

EPS = 1e-5
TRACES = []


@dataclasses.dataclass(frozen=True)
class MaxRange(QuantMethod):
    """A test method with a running statistic: the input's max |x| per tensor (as absmax keeps), identity weights.
    Its quantize_activation records every trace (a Python side effect runs only while JAX traces)."""

    name = "test_max_range"
    placement = CONV_INPUT
    activation_stats = ("range",)

    def quantize_weight(self, params, w, bits):
        return w

    def activation_batch_stats(self, x, bits):
        return {"range": jnp.max(jnp.abs(x))}

    def quantize_activation(self, params, x, bits):
        TRACES.append(x.shape)
        n = 2 ** bits - 1
        return jnp.round(jnp.clip(x / params["range"], 0, 1) * n) / n * params["range"]


def _model_and_variables(config, seed=0, widths=(4, 6, 6)):
    model = get_model("small_cnn", config=config, num_classes=3, widths=widths)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(4, 8, 8, 1)), jnp.float32)
    variables = model.init(jax.random.key(seed), x, train=True)
    # Non-trivial BN affine parameters, so later layers' inputs depend on them.
    rng = np.random.default_rng(seed + 1)
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.asarray(rng.normal(1.0 if "scale" in jax.tree_util.keystr(p) else 0.3, 0.3, v.shape),
                                 v.dtype) if "bn" in jax.tree_util.keystr(p) else v,
        variables["params"],
    )
    return model, {"params": params, "batch_stats": variables["batch_stats"]}


def _batches(sizes, seed=0):
    """Batches of different sizes and brightness (so the batch means differ and the union variance is not the
    average of the batch variances)."""
    rng = np.random.default_rng(seed)
    return [{"image": (rng.normal(size=(n, 8, 8, 1)) + 0.7 * i).astype(np.float32)} for i, n in enumerate(sizes)]


def _np_conv(x, k, stride):
    """3x3 convolution, padding 1 (float64 numpy)."""
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ho = (x.shape[1] + 2 - 3) // stride + 1
    wo = (x.shape[2] + 2 - 3) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, k.shape[-1]))
    for i in range(3):
        for j in range(3):
            patch = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            out += patch @ k[i, j]
    return out


def _np_bn_inputs_fp32(params, images):
    """The inputs of bn0..bn2 of the FP32 SmallCNN in training mode (batch statistics), in float64 numpy."""
    h, inputs = np.asarray(images, np.float64), []
    for i, stride in enumerate((1, 2, 1)):
        h = _np_conv(h, np.asarray(params[f"conv{i}"]["kernel"], np.float64), stride)
        inputs.append(h)
        mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
        scale, bias = (np.asarray(params[f"bn{i}"][k], np.float64) for k in ("scale", "bias"))
        h = np.maximum((h - mean) / np.sqrt(var + EPS) * scale + bias, 0.0)
    return inputs


def _union(per_batch):
    """Mean and unbiased variance per channel of the union of several (B, H, W, C) arrays."""
    flat = np.concatenate([x.reshape(-1, x.shape[-1]) for x in per_batch])
    return flat.mean(0), flat.var(0, ddof=1)


def _captured_bn_inputs(model, variables, images):
    """The inputs of bn0..bn2 as the model computes them in training mode on this batch alone (the outputs of
    conv0..conv2)."""
    def run(variables, images):
        _, state = model.apply(
            variables, images, train=True, mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda m, name: name == "__call__" and m.name in ("conv0", "conv1", "conv2"),
        )
        return [state["intermediates"][f"conv{i}"]["__call__"][0] for i in range(3)]

    return [np.asarray(x, np.float64) for x in jax.jit(run)(variables, jnp.asarray(images))]


def test_fp32_statistics_are_the_union_of_the_batches_as_numpy_computes_them():
    model, variables = _model_and_variables(QuantConfig())
    batches = _batches((4, 2, 4))
    stats = reestimate_batch_stats(model, variables, batches)
    per_layer = list(zip(*(_np_bn_inputs_fp32(variables["params"], b["image"]) for b in batches)))
    for i, inputs in enumerate(per_layer):
        mean, var = _union(inputs)
        np.testing.assert_allclose(stats[f"bn{i}"]["mean"], mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats[f"bn{i}"]["var"], var, rtol=1e-4, atol=1e-6)
        # Not the average of the per-batch variances: the batches' means differ.
        averaged = np.average([x.var((0, 1, 2), ddof=1) for x in inputs], 0, [len(x) for x in inputs])
        assert np.max(np.abs(averaged - var) / var) > 1e-3
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(stats))


def test_4bit_alignq_statistics_are_the_union_of_the_batch_inputs():
    model, variables = _model_and_variables(QuantConfig(4, 4, method="alignq"))
    batches = _batches((4, 2, 4), seed=3)
    stats = reestimate_batch_stats(model, variables, batches)
    per_layer = list(zip(*(_captured_bn_inputs(model, variables, b["image"]) for b in batches)))
    for i, inputs in enumerate(per_layer):
        mean, var = _union(inputs)
        np.testing.assert_allclose(stats[f"bn{i}"]["mean"], mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats[f"bn{i}"]["var"], var, rtol=1e-4, atol=1e-6)


def test_masked_rows_never_enter_the_statistics():
    model, variables = _model_and_variables(QuantConfig(4, 4))
    batches = _batches((4, 6), seed=1)
    padded = []
    for b in batches:
        n = len(b["image"])
        garbage = np.full((3, 8, 8, 1), 50.0, np.float32)  # far outside the data: would move every statistic
        padded.append({"image": np.concatenate([b["image"][:2], garbage, b["image"][2:]]),
                       "mask": np.array([True, True, False, False, False] + [True] * (n - 2))})
    clean = reestimate_batch_stats(model, variables, batches)
    masked = reestimate_batch_stats(model, variables, padded)
    for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(masked)):
        np.testing.assert_array_equal(a, b)
    unmasked = reestimate_batch_stats(model, variables, [{"image": b["image"]} for b in padded])
    assert np.abs(unmasked["bn0"]["mean"] - clean["bn0"]["mean"]).max() > 1.0


def test_padded_evaluation_batches_do_not_reach_train_mode_statistics():
    """A test split in evaluation batches (the last one padded with zero images, mask False) re-estimates exactly
    as its real rows do."""
    ds = tiny_dataset(n_train=16, n_test=17)
    model, variables = _model_and_variables(QuantConfig(2, 2))
    padded = list(ds.test_batches(5))
    assert not padded[-1]["mask"].all()
    real = [{"image": b["image"][b["mask"]]} for b in padded]
    expected = reestimate_batch_stats(model, variables, real)
    got = reestimate_batch_stats(model, variables, padded)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)
    with_padding = reestimate_batch_stats(model, variables, [{"image": b["image"]} for b in padded])
    assert np.abs(np.asarray(with_padding["bn0"]["var"]) - np.asarray(got["bn0"]["var"])).max() > 1e-3


def test_which_replaces_only_the_chosen_leaves():
    model, variables = _model_and_variables(QuantConfig(4, 4))
    batches = _batches((4, 4))
    full = reestimate_batch_stats(model, variables, batches)
    assert batch_stats_paths(full) == ["bn0/mean", "bn0/var", "bn1/mean", "bn1/var", "bn2/mean", "bn2/var"]
    only = reestimate_batch_stats(model, variables, batches, which=lambda p: p.startswith("bn1/"))
    for path in ("bn0", "bn2"):
        for k in ("mean", "var"):
            np.testing.assert_array_equal(only[path][k], variables["batch_stats"][path][k])
    for k in ("mean", "var"):
        np.testing.assert_array_equal(only["bn1"][k], full["bn1"][k])
        assert np.abs(np.asarray(only["bn1"][k]) - np.asarray(variables["batch_stats"]["bn1"][k])).max() > 1e-3


def test_quantizer_statistics_are_the_row_weighted_average_of_the_batch_values():
    config = QuantConfig(4, 4, method=MaxRange())
    model, variables = _model_and_variables(config)
    assert "ConvQuantizer_0" in variables["batch_stats"]["conv1"]
    batches = _batches((2, 6), seed=5)
    stats = reestimate_batch_stats(model, variables, batches)

    def conv_input_max(images, layer):
        _, state = model.apply(variables, jnp.asarray(images), train=True, mutable=["batch_stats", "intermediates"],
                               capture_intermediates=lambda m, name: name == "__call__" and m.name == f"bn{layer - 1}")
        return float(np.abs(np.asarray(state["intermediates"][f"bn{layer - 1}"]["__call__"][0])).max())

    for layer in (1, 2):
        values = [conv_input_max(b["image"], layer) for b in batches]
        expected = (2 * values[0] + 6 * values[1]) / 8
        got = float(stats[f"conv{layer}"]["ConvQuantizer_0"]["activation"]["range"])
        assert got == pytest.approx(expected, rel=1e-5)
        assert values[0] != pytest.approx(values[1], rel=1e-3)  # so weighting by rows matters
    only_quantizers = reestimate_batch_stats(model, variables, batches, which=lambda p: "Quantizer" in p)
    np.testing.assert_array_equal(only_quantizers["bn0"]["var"], variables["batch_stats"]["bn0"]["var"])
    np.testing.assert_array_equal(only_quantizers["conv1"]["ConvQuantizer_0"]["activation"]["range"],
                                  stats["conv1"]["ConvQuantizer_0"]["activation"]["range"])


def test_num_batches_takes_the_first_batches():
    model, variables = _model_and_variables(QuantConfig(4, 4))
    batches = _batches((3, 4, 5, 6), seed=2)
    first_two = reestimate_batch_stats(model, variables, batches[:2])
    got = reestimate_batch_stats(model, variables, iter(batches), num_batches=2)
    for a, b in zip(jax.tree.leaves(first_two), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)


def test_one_compile_per_batch_shape():
    config = QuantConfig(4, 4, method=MaxRange())
    model, variables = _model_and_variables(config, widths=(3, 5, 5))  # a model no other test compiles
    TRACES.clear()
    reestimate_batch_stats(model, variables, _batches((4, 4, 4)))
    per_trace = len(TRACES)  # one entry per quantized conv input per trace
    assert per_trace > 0
    reestimate_batch_stats(model, variables, _batches((4, 4), seed=7))
    assert len(TRACES) == per_trace  # same shape, another call: no new trace
    reestimate_batch_stats(model, variables, _batches((4, 2), seed=7))
    assert len(TRACES) == 2 * per_trace  # one more shape, one more trace


def test_errors_name_what_is_wrong():
    model, variables = _model_and_variables(QuantConfig(4, 4))

    class NoMomentum(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            return nn.BatchNorm(use_running_average=not train)(x)

    with pytest.raises(ValueError, match="bn_momentum field"):
        reestimate_batch_stats(NoMomentum(), variables, _batches((2,)))
    with pytest.raises(ValueError, match="no batch with a real"):
        reestimate_batch_stats(model, variables, [])
    with pytest.raises(ValueError, match="no batch with a real"):
        reestimate_batch_stats(model, variables, [{"image": np.zeros((2, 8, 8, 1), np.float32),
                                                   "mask": np.zeros(2, bool)}])
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        reestimate_batch_stats(model, variables, _batches((2,)), num_batches=0)


def test_union_update_is_order_free():
    """The float64 pairwise combination gives the same union whatever the grouping of the parts."""
    rng = np.random.default_rng(0)
    parts = [rng.normal(3.0 + i, 1.0 + i, size=(n, 2)) for i, n in enumerate((3, 8, 5))]

    def acc(x):
        return bn_module._Union(float(len(x)), x.mean(0), x.var(0) * len(x))

    left = acc(parts[0]).merge(acc(parts[1])).merge(acc(parts[2]))
    right = acc(parts[0]).merge(acc(parts[1]).merge(acc(parts[2])))
    flat = np.concatenate(parts)
    for u in (left, right):
        np.testing.assert_allclose(u.mean, flat.mean(0), rtol=1e-12)
        np.testing.assert_allclose(u.m2 / (u.count - 1), flat.var(0, ddof=1), rtol=1e-12)
