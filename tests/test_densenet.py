"""DenseNet (plain, no bottleneck or compression): parameter count of DenseNet-40 against the paper's 1.0M and a
count from the architecture for other depths, the pre-activation quantizer placement for BN-output and conv-input
methods (docs/method.md §7) on the recorded forward, the FP network against a plain Flax DenseNet, jit == no-jit,
1 device == 8 devices, and the correlation gaps (sampled features included)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from alignq_jax.methods import get_method
from alignq_jax.models.densenet import DenseNet, densenet40
from alignq_jax.quantize import (
    CORRELATION_RNG, GAP_COLLECTION, QuantBatchNorm, QuantConfig, QuantConv, QuantRules, gap_shapes,
    without_quantizer_state,
)
from test_models import (
    CFG, _assert_equal_up_to_threshold_flips, _at, _check_fp_classifier, _only, _plain_conv_outputs,
    _reference_bn_quant, record_calls_traced,
)
from test_placement_conv_input import (
    BITS, CONV_INPUT_NAMES, _expected_state, _registered, numpy_batchnorm, random_variables, run_recorded,
)

SMALL = dict(depth=10, growth_rate=4)  # 2 layers per block: every kind of layer, quick to run on CPU


def _param_count(variables) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


def _shapes(model, x_shape):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x_shape), train=True))


def _count_by_hand(depth, k, in_channels, num_classes, stem=16) -> int:
    """From the architecture: a 3x3 stem conv; per block n = (depth - 4) / 3 layers, the layer on c channels
    having a BN (2c) and a 3x3 conv c -> k; per transition on c channels a BN (2c) and a 1x1 conv c -> c; a final
    BN and a Dense with bias. Convs have no bias."""
    n = (depth - 4) // 3
    total = 9 * in_channels * stem
    c = stem
    for block in range(3):
        if block:
            total += 2 * c + c * c
        for _ in range(n):
            total += 2 * c + 9 * c * k
            c += k
    return total + 2 * c + c * num_classes + num_classes


def test_densenet40_parameter_count_is_the_papers():
    """1,019,722 (Huang et al. 2017, Table 2: DenseNet (L=40, k=12), 1.0M). By block: layer i of block b has
    16 + 144 b + 12 i input channels (c), a BN (2c) and a 3x3 conv (108c); transitions on 160 and 304 channels."""
    hand = (
        3 * 9 * 16
        + sum(2 * c + 108 * c for c in range(16, 160, 12))
        + (2 * 160 + 160 * 160)
        + sum(2 * c + 108 * c for c in range(160, 304, 12))
        + (2 * 304 + 304 * 304)
        + sum(2 * c + 108 * c for c in range(304, 448, 12))
        + 2 * 448 + 448 * 10 + 10
    )
    assert hand == 1_019_722
    assert _count_by_hand(40, 12, 3, 10) == hand
    for config in (QuantConfig(), CFG):
        shapes = _shapes(densenet40(config=config), (2, 32, 32, 3))
        assert _param_count(shapes) == 1_019_722
        params = shapes["params"]
        assert params["fc"]["kernel"].shape == (448, 10)
        assert params["transition0"]["conv"]["kernel"].shape == (1, 1, 160, 160)
        assert params["transition1"]["conv"]["kernel"].shape == (1, 1, 304, 304)
        assert params["block2_layer11"]["conv"]["kernel"].shape == (3, 3, 436, 12)
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        assert not any("conv" in jax.tree_util.keystr(p) and "bias" in jax.tree_util.keystr(p) for p, _ in flat)
        # 39 convs (stem, 36 layers, 2 transitions) and 39 BatchNorms (36 layers, 2 transitions, the final one).
        names = [jax.tree_util.keystr(p) for p, _ in flat]
        assert sum(n.endswith("['kernel']") for n in names) == 40  # + the Dense
        assert sum(n.endswith("['scale']") for n in names) == 39


@pytest.mark.parametrize("depth, k, channels, classes", [(13, 12, 3, 10), (22, 6, 1, 7), (7, 5, 3, 4)])
def test_other_depths_parameter_count_matches_the_architecture(depth, k, channels, classes):
    """depth 13, k=12, 3 -> 10: 432 + (16..40: 2c + 108c) + (52: 2c + c^2) + ... = _count_by_hand."""
    model = DenseNet(config=CFG, depth=depth, growth_rate=k, num_classes=classes)
    assert _param_count(_shapes(model, (2, 16, 16, channels))) == _count_by_hand(depth, k, channels, classes)


def test_depth13_count_by_hand_worked_out():
    # depth 13: n = 3; block 0 on 16, 28, 40 channels -> 52; transition 52; block 1 on 52, 64, 76 -> 88;
    # transition 88; block 2 on 88, 100, 112 -> 124; final BN 124; Dense 124 * 10 + 10.
    layer = lambda c: 2 * c + 108 * c  # noqa: E731
    want = (432 + layer(16) + layer(28) + layer(40) + 2 * 52 + 52 * 52 + layer(52) + layer(64) + layer(76)
            + 2 * 88 + 88 * 88 + layer(88) + layer(100) + layer(112) + 2 * 124 + 1240 + 10)
    assert _count_by_hand(13, 12, 3, 10) == want
    assert _param_count(_shapes(DenseNet(depth=13), (1, 8, 8, 3))) == want


def test_official_alignq_stem_width_24():
    """The official AlignQ DenseNet-40 starts with 24 = 2k channels: 24 -> 168 -> 312 -> 456 (docs/method.md §7),
    1,059,298 parameters: 16 -> 24 adds 8 input channels to every layer (2 + 108 each), the stem's 8 filters, the
    wider transitions and the classifier."""
    layer = lambda c: 2 * c + 108 * c  # noqa: E731
    want = (3 * 9 * 24 + sum(layer(c) for c in range(24, 168, 12)) + 2 * 168 + 168 ** 2
            + sum(layer(c) for c in range(168, 312, 12)) + 2 * 312 + 312 ** 2
            + sum(layer(c) for c in range(312, 456, 12)) + 2 * 456 + 456 * 10 + 10)
    assert want == 1_059_298
    shapes = _shapes(densenet40(config=CFG, stem_width=24), (2, 32, 32, 3))
    assert _param_count(shapes) == want
    assert shapes["params"]["stem_conv"]["kernel"].shape == (3, 3, 3, 24)
    assert shapes["params"]["fc"]["kernel"].shape == (456, 10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(depth=41), "depth"), (dict(depth=4), "depth"), (dict(depth=1), "depth"), (dict(depth=40.0), "depth"),
    (dict(growth_rate=0), "growth_rate"), (dict(stem_width=0), "stem_width"), (dict(stem_width=True), "stem_width"),
])
def test_bad_depth_or_growth_rate_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DenseNet(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Placement: BN-output methods (AlignQ)


def _check_quantized_conv(call, kernel, cfg):
    """The conv convolves its input (as given) with the AlignQ-quantized kernel, not with the FP kernel."""
    assert isinstance(call.module, QuantConv) and call.module.config == cfg
    quantized, fp = _plain_conv_outputs(call.module, kernel, call.args[0], cfg.w_bits)
    np.testing.assert_allclose(call.out, quantized, atol=1e-5)
    assert np.abs(np.asarray(call.out) - np.asarray(fp)).max() > 1e-3


def _check_bn_q_relu(calls, path, params, h, cfg, values):
    """``path`` is a QuantBatchNorm fed by ``h`` whose output is ReLU(Q(BN(h))) (the output checked if
    ``values``)."""
    bn = _only(calls, path)
    assert isinstance(bn.module, QuantBatchNorm) and bn.module.config == cfg
    assert bn.args[0] is h, f"{path} is not fed by the features before it"
    assert bn.module.relu is True, path
    assert bn.out.shape == h.shape, path
    if values:
        _assert_equal_up_to_threshold_flips(bn.out, _reference_bn_quant(h, _at(params, path), cfg, relu=True, jit=True),
                                            cfg)
        assert len(np.unique(np.asarray(bn.out))) <= 2**cfg.a_bits
    return bn


def _check_alignq_placement(model, v, x, values):
    """The AlignQ placement of ``model`` (config CFG) on the forward recorded under jit (``values``: every output
    checked against its reference) or under ``jax.eval_shape`` (the data flow, module settings and shapes only)."""
    (logits, _), calls = record_calls_traced(model, v, x, abstract=not values, train=True,
                                             mutable=["batch_stats", GAP_COLLECTION])
    params = v["params"]
    n, k, batch, size = model.layers_per_block, model.growth_rate, x.shape[0], x.shape[1]

    stem = _only(calls, ("stem_conv",))
    assert isinstance(stem.module, QuantConv) and stem.module.config == CFG and stem.module.kernel_size == (3, 3)
    if values:
        np.testing.assert_array_equal(stem.args[0], x)  # the image itself, unquantized
        _check_quantized_conv(stem, params["stem_conv"]["kernel"], CFG)
    h = stem.out
    assert h.shape == (batch, size, size, 16)
    n_bn, n_conv = 0, 1  # the stem conv has no BN of its own (pre-activation)
    for block in range(3):
        if block:
            name = f"transition{block - 1}"
            tr = _only(calls, (name,))
            assert tr.args[0] is h
            bn = _check_bn_q_relu(calls, (name, "bn"), params, h, CFG, values)
            conv = _only(calls, (name, "conv"))
            assert conv.args[0] is bn.out and conv.module.kernel_size == (1, 1) and conv.module.features == h.shape[-1]
            assert isinstance(conv.module, QuantConv) and conv.module.config == CFG
            size //= 2
            assert tr.out.shape == (batch, size, size, h.shape[-1])
            if values:
                _check_quantized_conv(conv, params[name]["conv"]["kernel"], CFG)
                np.testing.assert_allclose(tr.out, nn.avg_pool(conv.out, (2, 2), strides=(2, 2)), atol=1e-6)
            h = tr.out
            n_bn, n_conv = n_bn + 1, n_conv + 1
        for layer in range(n):
            name = f"block{block}_layer{layer}"
            dl = _only(calls, (name,))
            assert dl.args[0] is h, f"{name} is not fed by the features before it"
            bn = _check_bn_q_relu(calls, (name, "bn"), params, h, CFG, values)
            conv = _only(calls, (name, "conv"))
            assert conv.args[0] is bn.out and conv.module.kernel_size == (3, 3) and conv.module.features == k
            assert isinstance(conv.module, QuantConv) and conv.module.config == CFG
            assert dl.out.shape == (batch, size, size, h.shape[-1] + k)
            if values:
                _check_quantized_conv(conv, params[name]["conv"]["kernel"], CFG)
                # Concatenation: the layer's input passes on unquantized, the new features appended.
                np.testing.assert_array_equal(dl.out, jnp.concatenate([h, conv.out], axis=-1))
            h = dl.out
            n_bn, n_conv = n_bn + 1, n_conv + 1
    assert h.shape == (batch, size, size, 16 + 3 * n * k)
    final = _check_bn_q_relu(calls, ("final_bn",), params, h, CFG, values)
    n_bn += 1
    assert (n_bn, n_conv) == (3 * n + 3, 3 * n + 3)
    assert len([p for p, c in calls.items() if isinstance(c[0].module, QuantBatchNorm)]) == n_bn
    assert len([p for p, c in calls.items() if isinstance(c[0].module, QuantConv)]) == n_conv
    assert len(jax.tree.leaves(gap_shapes(model, v, x, train=True))) == n_bn  # one correlation term per BN
    fc = _only(calls, ("fc",))
    assert type(fc.module) is nn.Dense and logits.shape == (batch, model.num_classes)
    if values:
        _check_fp_classifier(calls, params, final.out)
        np.testing.assert_array_equal(fc.out, logits)
    assert not any("ConvQuantizer_0" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(v)[0])


def test_alignq_placement_bn_q_relu_before_every_conv_and_the_pool():
    """Stem conv on the image (quantized weights) -> per layer: BN -> Q -> ReLU -> conv (quantized weights), its
    output concatenated to the layer's full-precision input; per transition: BN -> Q -> ReLU -> 1x1 conv -> 2x2
    average pool; final BN -> Q -> ReLU -> global average pool -> FP Dense. One correlation gap per BN. Every
    value on a small DenseNet; the same data flow, module settings and shapes on DenseNet-40."""
    model = DenseNet(config=CFG, **SMALL)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    v = jax.jit(lambda x: model.init(jax.random.key(1), x, train=True))(x)
    _check_alignq_placement(model, v, x, values=True)
    big = densenet40(config=CFG)
    xb = jnp.zeros((2, 32, 32, 3))
    _check_alignq_placement(big, _shapes(big, xb.shape), xb, values=False)


# ----------------------------------------------------------------------------------------------------------------
# Placement: conv-input methods


@pytest.mark.parametrize("method_name", _registered(CONV_INPUT_NAMES))
def test_conv_input_methods_quantize_every_conv_input_but_the_stems(method_name):
    """Every conv but the stem convolves a quantized copy of its input, which is the ReLU'd output of the BN
    before it; the stem convolves the image; every BN (final one included) is a plain BN -> ReLU; no gaps."""
    method = get_method(method_name)
    model = DenseNet(config=QuantConfig(BITS, BITS, method=method_name), **SMALL)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    variables = random_variables(model, x, method)
    seen, written = run_recorded(model, variables, x, train=True)
    convs = {p for p, r in seen.items() if "op" in r}
    bns = {p for p, r in seen.items() if "in" in r}
    layers = [f"block{b}_layer{i}" for b in range(3) for i in range(2)] + ["transition0", "transition1"]
    assert convs == {"stem_conv", *(f"{n}/conv" for n in layers)}
    assert bns == {"final_bn", *(f"{n}/bn" for n in layers)}
    # Every conv owns a weight quantizer; all but the stem an activation quantizer too (if the method has state).
    np.testing.assert_array_equal(seen["stem_conv"]["op"], x)
    for name in layers:
        raw, used = np.asarray(seen[f"{name}/conv"]["__call__"]), np.asarray(seen[f"{name}/conv"]["op"])
        np.testing.assert_array_equal(raw, seen[f"{name}/bn"]["out"])  # the conv follows its BN -> ReLU
        assert raw.min() >= 0.0
        want = method.quantize_activation(_expected_state(method, variables, f"{name}/conv", raw, True),
                                          jnp.asarray(raw), BITS)
        np.testing.assert_allclose(used, want, rtol=0, atol=1e-6, err_msg=name)
        assert len(np.unique(used)) <= 2**BITS, name
        assert np.abs(used - raw).max() > 1e-3, f"{name}: the input was not quantized"
    for path in bns:
        p, s = variables["params"], variables["batch_stats"]
        for part in path.split("/"):
            p, s = p[part], s[part]
        want = numpy_batchnorm(seen[path]["in"], p["scale"], p["bias"], s["mean"], s["var"], relu=True, train=True)
        got = np.asarray(seen[path]["out"])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=path)
        assert len(np.unique(got)) > 4 * 2**BITS, f"{path}: its output looks quantized"
    assert GAP_COLLECTION not in written


def test_rules_target_layers_by_name():
    """APoT on the last dense block's convs, AlignQ elsewhere: block 2's convs get input quantizers, its BNs no
    gaps; every other BN records one."""
    rules = QuantRules((("block2_", QuantConfig(BITS, BITS, method="apot")),), default=QuantConfig(BITS, BITS,
                                                                                                  correlation=True))
    model = DenseNet(config=rules, **SMALL)
    x = jnp.zeros((4, 8, 8, 3))
    shapes = _shapes(model, x.shape)
    owners = {
        "/".join(str(q.key) for q in path[: [q.key for q in path].index("ConvQuantizer_0")])
        for path, _ in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
        if "ConvQuantizer_0" in [q.key for q in path]
    }
    assert owners == {"block2_layer0/conv", "block2_layer1/conv"}
    gaps = gap_shapes(model, shapes, x, train=True)
    assert set(gaps) == {"block0_layer0", "block0_layer1", "transition0", "block1_layer0", "block1_layer1",
                         "transition1", "final_bn"}


# ----------------------------------------------------------------------------------------------------------------
# Full precision, jit, data parallel, gaps


class _PlainDenseNet(nn.Module):
    """The same network written with Flax's own layers (nn.BatchNorm, nn.Conv), same names, evaluation mode."""

    depth: int
    growth_rate: int
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        bn = lambda name: nn.BatchNorm(use_running_average=True, epsilon=1e-5, name=name)  # noqa: E731
        conv = lambda f, k, name: nn.Conv(f, (k, k), padding=k // 2, use_bias=False, name=name)  # noqa: E731

        class Sub(nn.Module):  # "bn" and "conv" under one name
            features: int
            kernel: int

            @nn.compact
            def __call__(self, x):
                return conv(self.features, self.kernel, "conv")(nn.relu(bn("bn")(x)))

        x = conv(16, 3, "stem_conv")(x)
        for block in range(3):
            if block:
                x = nn.avg_pool(Sub(x.shape[-1], 1, name=f"transition{block - 1}")(x), (2, 2), strides=(2, 2))
            for layer in range((self.depth - 4) // 3):
                x = jnp.concatenate([x, Sub(self.growth_rate, 3, name=f"block{block}_layer{layer}")(x)], -1)
        x = jnp.mean(nn.relu(bn("final_bn")(x)), axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


def _init(model, key, x):
    """``model.init`` jitted (eagerly, every op of the quantized layers would compile on its own)."""
    return jax.jit(lambda key, x: model.init(key, x, train=True))(key, x)


def _perturbed(variables, seed=3):
    """Non-trivial BN parameters and running statistics, so the BN wiring matters."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        key = path[-1].key
        if key in ("scale", "var"):
            leaf = jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        elif key in ("bias", "mean"):
            leaf = jnp.asarray(rng.normal(0, 0.3, leaf.shape), jnp.float32)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def test_fp_model_has_no_quantizer_state_and_equals_a_plain_flax_densenet():
    model = DenseNet(config=QuantConfig(), num_classes=7, **SMALL)
    x = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
    v = _perturbed(_init(model, jax.random.key(1), x))
    assert set(v) == {"params", "batch_stats"}
    assert jax.tree.structure(without_quantizer_state(v)) == jax.tree.structure(v)
    assert not any("Quantizer" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(v)[0])
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    ref = jax.jit(_PlainDenseNet(SMALL["depth"], SMALL["growth_rate"], 7).apply)(v, x)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
    # Train mode also runs with no gaps recorded.
    _, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats", GAP_COLLECTION]))(v, x)
    assert not jax.tree.leaves(upd.get(GAP_COLLECTION, {}))


def test_eval_forward_jit_equals_no_jit():
    # One layer per block (stem, dense layer, transition, final BN: every kind): an eager forward compiles every
    # op for every new shape.
    model = DenseNet(config=CFG, depth=7, growth_rate=4)
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
    v = _perturbed(_init(model, jax.random.key(3), x))
    eager = model.apply(v, x, train=False)
    jitted = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)


def test_train_forward_one_device_equals_eight():
    """With bn_axis_name and correlation_axis_name over 8 devices (one sample each), the logits, the running
    statistics and the (global, B x B) gaps equal the single-device forward on the whole batch."""
    devices = jax.devices()[:8]
    if len(devices) < 8:
        pytest.skip("needs 8 devices")
    x = jax.random.normal(jax.random.key(4), (8, 8, 8, 3))
    single = DenseNet(config=CFG, **SMALL)
    v = _init(single, jax.random.key(5), x)
    cols = ["batch_stats", GAP_COLLECTION]
    ref_logits, ref_upd = jax.jit(lambda v, x: single.apply(v, x, train=True, mutable=cols))(v, x)

    par = DenseNet(config=CFG, bn_axis_name="data", correlation_axis_name="data", **SMALL)
    mesh = Mesh(np.array(devices), ("data",))
    body = lambda v, x: par.apply(v, x, train=True, mutable=cols)  # noqa: E731
    run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P()),
                                check_vma=False))
    logits, upd = run(v, x)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(upd["batch_stats"]), jax.tree.leaves(ref_upd["batch_stats"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    gaps, ref_gaps = jax.tree.leaves(upd[GAP_COLLECTION]), jax.tree.leaves(ref_upd[GAP_COLLECTION])
    assert len(gaps) == 9 and all(g.shape == (8, 8) for g in gaps)
    np.testing.assert_allclose(gaps, ref_gaps, rtol=1e-4, atol=1e-5)


def test_sampled_correlation_records_one_b_by_b_gap_per_quantized_bn():
    """With correlation_features the train-mode apply (RNG stream "correlation") records one (B, B) gap per
    quantized BN output: every layer's BN, both transitions' and the final one; a new key samples new columns."""
    cfg = QuantConfig(4, 4, correlation=True, correlation_features=64)
    model = DenseNet(config=cfg, **SMALL)
    x = jax.random.normal(jax.random.key(6), (4, 8, 8, 3))
    v = _init(model, jax.random.key(7), x)

    @jax.jit
    def gaps(key):
        _, upd = model.apply(v, x, train=True, mutable=["batch_stats", GAP_COLLECTION], rngs={CORRELATION_RNG: key})
        return upd[GAP_COLLECTION]

    g1, g2 = gaps(jax.random.key(1)), gaps(jax.random.key(2))
    layers = [f"block{b}_layer{i}" for b in range(3) for i in range(2)] + ["transition0", "transition1"]
    paths = {f"{n}/bn" for n in layers} | {"final_bn"}
    flat = {"/".join(str(k.key) for k in p[:-2]): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(g1)[0]}
    assert set(flat) == paths  # one gap each ("gap" is a tuple of one per call)
    assert all(g.shape == (4, 4) and bool(jnp.all(jnp.isfinite(g))) for g in flat.values())
    # Sampled: the 64-column estimate depends on the key (the exact gap would not).
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2))) > 0
    # DenseNet-40: 39 quantized BN outputs, 39 gaps of (B, B).
    big = densenet40(config=cfg)
    xb = jnp.zeros((2, 32, 32, 3))
    shapes = gap_shapes(big, _shapes(big, xb.shape), xb, train=True)
    assert [g.shape for g in jax.tree.leaves(shapes)] == [(2, 2)] * 39
