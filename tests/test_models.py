"""Models: where every quantizer sits (docs/method.md §7), parameter counts, and bfloat16 compute.

The forward is recorded with Flax method interception: every module call with its inputs and output, so the
tests check the data flow itself (which array feeds which layer), not only how many layers there are.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignq_jax import quantizers
from alignq_jax.models import get_model
from alignq_jax.quantize import GAP_COLLECTION, QuantBatchNorm, QuantConfig, QuantConv, gap_shapes

CFG = QuantConfig(4, 4, correlation=True)


@dataclasses.dataclass
class Call:
    path: tuple
    module: nn.Module  # a clone with the call's fields, unbound
    args: tuple
    kwargs: dict
    out: object


def record_calls(model, variables, x, **kwargs):
    """``model.apply`` eagerly, returning (result, {path: [Call, ...]}) for every module's ``__call__``."""
    calls = {}

    def interceptor(next_fun, args, kw, context):
        out = next_fun(*args, **kw)
        if context.method_name == "__call__":
            m = context.module
            calls.setdefault(m.path, []).append(Call(m.path, m.clone(parent=None), args, kw, out))
        return out

    with nn.intercept_methods(interceptor):
        result = model.apply(variables, x, **kwargs)
    return result, calls


class _Slot:
    def __init__(self, i):
        self.i = i


def record_calls_traced(model, variables, x, *, abstract=False, **kwargs):
    """``record_calls`` traced once instead of run op by op (an eager forward compiles every op for every new
    shape): under ``jax.jit``, or with ``abstract=True`` under ``jax.eval_shape`` (arrays come back as
    ``jax.ShapeDtypeStruct``; no computation at all, for the structure of a large network). Each traced value
    comes back as one object wherever it appeared, so ``a is b`` still says which layer's output fed which."""
    structure = {}

    def run(variables, x):
        result, calls = record_calls(model, variables, x, **kwargs)
        arrays, index = [], {}

        def slot(leaf):
            if not isinstance(leaf, jax.Array):
                return leaf  # static arguments (train=True, ...)
            if id(leaf) not in index:  # every tracer is alive (held by `calls`), so ids are unique
                index[id(leaf)] = len(arrays)
                arrays.append(leaf)
            return _Slot(index[id(leaf)])

        structure["result"] = jax.tree.map(slot, result)
        structure["calls"] = {p: [(c, jax.tree.map(slot, (c.args, c.kwargs, c.out))) for c in cs]
                              for p, cs in calls.items()}
        return arrays

    arrays = jax.eval_shape(run, variables, x) if abstract else jax.jit(run)(variables, x)
    fill = lambda tree: jax.tree.map(lambda s: arrays[s.i] if isinstance(s, _Slot) else s, tree)  # noqa: E731
    calls = {}
    for path, cs in structure["calls"].items():
        for call, slots in cs:
            args, kw, out = fill(slots)
            calls.setdefault(path, []).append(Call(call.path, call.module, args, kw, out))
    return fill(structure["result"]), calls


def _only(calls, path):
    assert len(calls[path]) == 1, f"{path} called {len(calls[path])} times"
    return calls[path][0]


def _at(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _plain_conv(conv: QuantConv):
    """The nn.Conv with the same settings as a QuantConv, without a quantizing hook (Flax's default conv)."""
    hooks = ("promote_dtype", "conv_general_dilated", "conv_general_dilated_cls")
    fields = {f.name: getattr(conv, f.name) for f in dataclasses.fields(nn.Conv)
              if f.init and f.name not in ("parent", "name", *hooks)}
    return nn.Conv(**fields)


def _reference_bn_quant(h, params, cfg, relu, eps=1e-5, jit=False):
    """BN with batch statistics (float64 numpy), then the activation quantizer, then the ReLU if ``relu``. The
    quantizer runs jitted with ``jit`` (for a jitted forward: the grid levels can differ by one float32 ulp
    between a compiled and an eager computation)."""
    h64 = np.asarray(h, np.float64)
    mean, var = h64.mean((0, 1, 2)), h64.var((0, 1, 2))
    x = (h64 - mean) / np.sqrt(var + eps) * np.asarray(params["scale"]) + np.asarray(params["bias"])
    x = jnp.asarray(x, jnp.float32)
    return np.asarray(_quantize_activation(x, cfg, relu) if jit else cfg.quantize_activation(x, relu=relu))


# Jitted, so a check compiles one program per shape instead of every op of the quantizer eagerly.
_quantize_activation = jax.jit(lambda x, cfg, relu: cfg.quantize_activation(x, relu=relu),
                               static_argnames=("cfg", "relu"))


def _plain_conv_outputs(conv: QuantConv, kernel, x, w_bits):
    """(conv of ``x`` with the AlignQ-quantized ``kernel``, conv with the FP ``kernel``), for ``conv``'s settings,
    in one jitted program."""
    plain = _plain_conv(conv)
    run = lambda k, x: (plain.apply({"params": {"kernel": quantizers.alignq_weight(k, w_bits)}}, x),  # noqa: E731
                        plain.apply({"params": {"kernel": k}}, x))
    return jax.jit(run)(kernel, x)


def _assert_equal_up_to_threshold_flips(got, ref, cfg):
    """Equal except for a few elements that sit on a rounding threshold (float32 vs float64 BN): those move by
    at most one level."""
    got, ref = np.asarray(got), np.asarray(ref)
    step = 2 * cfg.act_range / (2**cfg.a_bits - 1)
    diff = np.abs(got - ref)
    assert diff.max() <= step * 1.001
    assert np.mean(diff > 0) < 1e-3


def _check_bn_quant(calls, conv_path, bn_path, params, cfg, relu, jit=False):
    """``bn_path`` is a QuantBatchNorm fed by the output of the quantized conv ``conv_path``, with the model's
    config, relu as given, and output Q(BN(conv)) (then ReLU): the quantizer acts on the BN output (``jit``: the
    calls were recorded under jit, see ``_reference_bn_quant``)."""
    conv, bn = _only(calls, conv_path), _only(calls, bn_path)
    assert isinstance(conv.module, QuantConv) and conv.module.config == cfg
    assert isinstance(bn.module, QuantBatchNorm) and bn.module.config == cfg
    assert bn.args[0] is conv.out, f"{bn_path} is not fed by {conv_path}"
    assert bn.module.relu is relu, f"{bn_path}: relu={bn.module.relu}, expected {relu}"
    _assert_equal_up_to_threshold_flips(bn.out, _reference_bn_quant(conv.out, _at(params, bn_path), cfg, relu, jit=jit),
                                        cfg)
    # The conv convolves with the quantized kernel (stem and shortcut convs included).
    quantized, fp = _plain_conv_outputs(conv.module, _at(params, conv_path)["kernel"], conv.args[0], cfg.w_bits)
    np.testing.assert_allclose(conv.out, quantized, atol=1e-5)
    assert np.abs(np.asarray(conv.out) - np.asarray(fp)).max() > 1e-3
    return conv, bn


def _check_fp_classifier(calls, params, features):
    fc = _only(calls, ("fc",))
    assert type(fc.module) is nn.Dense  # not a quantized layer
    np.testing.assert_allclose(fc.args[0], jnp.mean(features, axis=(1, 2)), atol=1e-6)
    p = params["fc"]
    np.testing.assert_allclose(fc.out, fc.args[0] @ p["kernel"] + p["bias"], atol=1e-5)  # the FP kernel
    return fc


def test_resnet20_quantizer_placement():
    """docs/method.md §7: stem conv -> BN -> Q -> ReLU; block conv0 -> BN -> Q -> ReLU -> conv1 -> BN -> Q ->
    (+ shortcut) -> ReLU; stride-2 shortcut 1x1 conv -> BN -> Q (no ReLU); identity shortcut otherwise; the input
    image, the block outputs and the final Dense stay full precision."""
    model = get_model("resnet20", config=CFG)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    v = model.init(jax.random.key(1), x, train=True)
    (logits, _), calls = record_calls(model, v, x, train=True, mutable=["batch_stats", GAP_COLLECTION])
    params = v["params"]

    stem_conv, stem_bn = _check_bn_quant(calls, ("stem_conv",), ("stem_bn",), params, CFG, relu=True)
    np.testing.assert_array_equal(stem_conv.args[0], x)  # the image itself, unquantized
    h = stem_bn.out
    quantized_acts = 1
    for stage in range(3):
        for block in range(3):
            name = f"stage{stage}_block{block}"
            blk = _only(calls, (name,))
            assert blk.args[0] is h, f"{name} is not fed by the previous block"
            c0, b0 = _check_bn_quant(calls, (name, "conv0"), (name, "bn0"), params, CFG, relu=True)
            c1, b1 = _check_bn_quant(calls, (name, "conv1"), (name, "bn1"), params, CFG, relu=False)
            assert c0.args[0] is h and c1.args[0] is b0.out
            quantized_acts += 2
            if stage > 0 and block == 0:
                sc, sb = _check_bn_quant(calls, (name, "shortcut_conv"), (name, "shortcut_bn"), params, CFG,
                                         relu=False)
                assert sc.args[0] is h and sc.module.kernel_size == (1, 1) and sc.module.strides == 2
                shortcut = sb.out
                quantized_acts += 1
            else:
                assert (name, "shortcut_conv") not in calls and (name, "shortcut_bn") not in calls
                shortcut = h  # identity, no padding trick
            # (+ shortcut) -> ReLU: the block output is the full-precision sum after a ReLU.
            np.testing.assert_array_equal(blk.out, jax.nn.relu(b1.out + shortcut))
            h = blk.out
    assert quantized_acts == 21  # one correlation term each (docs/method.md §4)
    assert len([p for p, c in calls.items() if isinstance(c[0].module, QuantBatchNorm)]) == 21
    assert len([p for p, c in calls.items() if isinstance(c[0].module, QuantConv)]) == 21
    fc = _check_fp_classifier(calls, params, h)
    np.testing.assert_array_equal(fc.out, logits)


def test_small_cnn_quantizer_placement():
    model = get_model("small_cnn", config=CFG)
    x = jax.random.normal(jax.random.key(2), (6, 8, 8, 1))
    v = model.init(jax.random.key(3), x, train=True)
    (logits, _), calls = record_calls(model, v, x, train=True, mutable=["batch_stats", GAP_COLLECTION])
    h = x
    for i in range(3):
        conv, bn = _check_bn_quant(calls, (f"conv{i}",), (f"bn{i}",), v["params"], CFG, relu=True)
        if i:
            assert conv.args[0] is h
        else:
            np.testing.assert_array_equal(conv.args[0], x)
        h = bn.out
    np.testing.assert_array_equal(_check_fp_classifier(calls, v["params"], h).out, logits)


@pytest.mark.parametrize("name, gaps, n_params", [("resnet20", 21, 272_474), ("resnet56", 57, 855_770)])
def test_resnet_sizes_and_gap_count(name, gaps, n_params):
    model = get_model(name, config=CFG)
    x = jnp.zeros((2, 32, 32, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=True))
    assert len(jax.tree.leaves(gap_shapes(model, shapes, x, train=True))) == gaps  # stem, 2 per block, 2 shortcuts
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))
    assert abs(count - n_params) / n_params < 0.01  # the usual CIFAR ResNet sizes (0.27M, 0.86M)
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    assert not any("bias" in jax.tree_util.keystr(k) and "conv" in jax.tree_util.keystr(k) for k, _ in flat)


# ----------------------------------------------------------------------------------------------------------------
# bfloat16 compute


@pytest.mark.parametrize("name, shape", [("small_cnn", (6, 8, 8, 1)), ("resnet20", (4, 8, 8, 3))])
def test_bfloat16_model_quantizes_exactly_like_float32_then_cast(name, shape):
    """In a bfloat16 model every quantized layer gives exactly its float32 computation on the same input, cast
    to bfloat16: convs use bf16(Q(float32 kernel)); BN -> Q (-> ReLU) and the correlation gaps are float32."""
    cfg = QuantConfig(4, 4, correlation=True)
    model = get_model(name, config=cfg, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(4), shape)
    v = model.init(jax.random.key(5), x, train=True)
    cols = ["batch_stats", GAP_COLLECTION]
    (_, upd), calls = record_calls(model, v, x, train=True, mutable=cols)
    n_bn = n_conv = 0
    for path, (call, *_) in calls.items():
        if isinstance(call.module, (QuantBatchNorm, QuantConv)):
            p = _at(v["params"], path)
        if isinstance(call.module, QuantBatchNorm):
            h = call.args[0]
            assert h.dtype == jnp.bfloat16 and call.out.dtype == jnp.bfloat16
            bn32 = call.module.clone()
            out32, upd32 = bn32.apply({"params": p, "batch_stats": _at(v["batch_stats"], path)},
                                      h.astype(jnp.float32), mutable=cols)
            np.testing.assert_array_equal(call.out, out32.astype(jnp.bfloat16))
            np.testing.assert_array_equal(_at(upd[GAP_COLLECTION], path)["gap"], upd32[GAP_COLLECTION]["gap"])
            n_bn += 1
        elif isinstance(call.module, QuantConv):
            assert call.out.dtype == jnp.bfloat16
            wq = quantizers.alignq_weight(p["kernel"], cfg.w_bits)  # float32 master kernel
            ref = _plain_conv(call.module).apply({"params": {"kernel": wq}}, call.args[0])
            np.testing.assert_array_equal(call.out, ref)
            n_conv += 1
    assert n_bn == n_conv == {"small_cnn": 3, "resnet20": 21}[name]
