"""Quantizer state in the Flax variables: where learned parameters and running statistics live, how they are
initialised (the method's own rule, from the kernel and the first batch; from a full-precision run's kernels when
starting from one), that gradients reach them in a train step, that checkpoints keep them, and that a train step
on 8 devices equals one on 1 device."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignq_jax.methods import METHODS, get_method
from alignq_jax.models import get_model
from alignq_jax.quantize import ConvQuantizer, QuantBatchNorm, QuantConfig, module_path
from alignq_jax.training import (
    TrainConfig, canonical_state, create_train_state, fit, load_variables, make_model, make_steps,
)
from tiny_data import tiny_dataset

BITS = 4
LEARNED = ("apot", "lsq", "pact")  # methods with learned parameters
STATEFUL = LEARNED + ("absmax",)  # ... or running statistics
CONVS = ("conv0", "conv1", "conv2")  # the SmallCNN's; conv0 convolves the image
_rng = np.random.default_rng(0)
IMAGES = _rng.normal(size=(16, 8, 8, 1)).astype(np.float32)
LABELS = _rng.integers(0, 10, 16).astype(np.int32)


def _registered(names):
    return [
        pytest.param(n, marks=pytest.mark.skipif(n not in METHODS, reason=f"method {n!r} is not registered yet"))
        for n in names
    ]


# Options that make every learned parameter receive a gradient on these inputs: PACT's alpha has a gradient only
# where an input reaches it, and its default init (10) is above every activation of this small network.
TRAINABLE_OPTIONS = {"pact": {"alpha_init": 0.5}}


def _config(method_name, options=None, **kw):
    base = dict(model="small_cnn", batch_size=16, eval_batch_size=16, lr=0.1, milestones=(), parallel="none")
    if "quant" not in kw:
        method = get_method(method_name, **options) if options else method_name
        base["quant"] = QuantConfig(BITS, BITS, method=method)
    return TrainConfig(**{**base, **kw})


def _record_raw_inputs(seen):
    def intercept(next_fun, args, kwargs, context):
        if isinstance(context.module, ConvQuantizer) and context.method_name == "__call__":
            seen[module_path(context.module.parent)] = args[0]
        return next_fun(*args, **kwargs)

    return intercept


def _raw_conv_inputs(model, variables, images, train):
    """Each conv's input (before its quantizer) in ``model.apply(variables, images, train=train)``."""

    def run(v):
        seen = {}
        with nn.intercept_methods(_record_raw_inputs(seen)):
            model.apply(v, images, train=train, mutable=["batch_stats"])
        return seen

    return jax.jit(run)(variables)


def _lsq_step(v, qp):
    """LSQ's init rule, written here: 2 * mean|v| / sqrt(Q_P), in float64."""
    return 2.0 * np.mean(np.abs(np.asarray(v, np.float64))) / math.sqrt(qp)


def _check_init_rule(method, params, batch_stats, kernels, inputs):
    """Every conv's quantizer state equals the method's init rule on its kernel and its input; conv0 (the image)
    has no activation state."""
    for conv in CONVS:
        quantizer = params[conv].get("ConvQuantizer_0", {})
        if method.weight_params:
            want = method.init_weight(kernels[conv], BITS)
            assert set(quantizer["weight"]) == set(method.weight_params)
            for k, v in want.items():
                np.testing.assert_allclose(quantizer["weight"][k], v, rtol=1e-6, err_msg=f"{conv} weight {k}")
        else:
            assert "weight" not in quantizer
        stats = batch_stats.get(conv, {}).get("ConvQuantizer_0", {})
        if conv == "conv0":
            assert "activation" not in quantizer and "activation" not in stats
            continue
        if method.activation_params:
            want = method.init_activation(inputs[conv], BITS)
            assert set(quantizer["activation"]) == set(method.activation_params)
            for k, v in want.items():
                np.testing.assert_allclose(quantizer["activation"][k], v, rtol=1e-6, err_msg=f"{conv} act {k}")
        if method.activation_stats:
            want = method.activation_batch_stats(inputs[conv], BITS)
            for k, v in want.items():
                np.testing.assert_allclose(stats["activation"][k], v, rtol=1e-6, err_msg=f"{conv} stat {k}")


# ----------------------------------------------------------------------------------------------------------------
# Where the state lives and how it starts


@pytest.mark.parametrize("method_name", _registered(STATEFUL))
def test_state_lives_in_the_conv_and_follows_the_init_rule(method_name):
    method = get_method(method_name)
    model = get_model("small_cnn", config=QuantConfig(BITS, BITS, method=method_name), num_classes=10)
    x = jnp.asarray(IMAGES)
    variables = jax.jit(lambda k: model.init(k, x, train=True))(jax.random.key(3))
    params, batch_stats = variables["params"], variables["batch_stats"]
    for conv in CONVS:
        assert set(params[conv]) <= {"kernel", "bias", "ConvQuantizer_0"}
    # The inputs the layers saw at init: the same forward (train mode) with the initialised variables.
    inputs = _raw_conv_inputs(model, variables, x, train=True)
    kernels = {c: params[c]["kernel"] for c in CONVS}
    _check_init_rule(method, params, batch_stats, kernels, inputs)
    if method_name == "lsq":  # the rule itself, from the paper: Q_P = 7 for 4-bit weights, 15 for activations
        for conv in CONVS:
            q = params[conv]["ConvQuantizer_0"]
            assert float(q["weight"]["step"]) == pytest.approx(_lsq_step(kernels[conv], 7), rel=1e-5)
            if conv != "conv0":
                assert float(q["activation"]["step"]) == pytest.approx(_lsq_step(inputs[conv], 15), rel=1e-5)


@pytest.mark.parametrize("method_name", _registered(STATEFUL))
def test_resnet20_state_location(method_name):
    """Every conv of ResNet-20 holds its state under <conv>/ConvQuantizer_0; only the stem has no activation
    state (it convolves the image); BatchNorms hold only scale/bias and mean/var."""
    method = get_method(method_name)
    model = get_model("resnet20", config=QuantConfig(BITS, BITS, method=method_name), num_classes=10)
    x = jnp.zeros((2, 8, 8, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=True))
    found = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes[collection])[0]:
            names = [p.key for p in path]
            if "ConvQuantizer_0" in names:
                i = names.index("ConvQuantizer_0")
                found.setdefault("/".join(names[:i]), set()).add((collection, *names[i + 1:]))
                assert leaf.shape == () and "conv" in names[i - 1]
            else:
                assert names[-1] in ({"kernel", "bias", "scale"} if collection == "params" else {"mean", "var"})
    convs = {"stem_conv"} | {f"stage{s}_block{b}/conv{i}" for s in range(3) for b in range(3) for i in range(2)}
    convs |= {"stage1_block0/shortcut_conv", "stage2_block0/shortcut_conv"}
    assert len(convs) == 21 and set(found) <= convs
    weight = {("params", "weight", n) for n in method.weight_params}
    activation = {("params", "activation", n) for n in method.activation_params}
    activation |= {("batch_stats", "activation", n) for n in method.activation_stats}
    for conv in convs:
        assert found.get(conv, set()) == (weight if conv == "stem_conv" else weight | activation), conv


@pytest.mark.parametrize("method_name", _registered(STATEFUL))
def test_create_train_state_needs_a_real_batch(method_name):
    with pytest.raises(ValueError, match="init_images"):
        create_train_state(_config(method_name), (8, 8, 1), 10, 10, gap_batch=16)
    with pytest.raises(ValueError, match="init_images"):
        create_train_state(_config(method_name), (8, 8, 1), 10, 10, gap_batch=16, init_images=IMAGES[..., :4, :])


# ----------------------------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("method_name", _registered(LEARNED))
def test_train_step_applies_the_gradient_of_every_quantizer_parameter(method_name):
    """One SGD step (no momentum, no weight decay) moves every learned quantizer parameter by -lr * its gradient,
    and that gradient (computed here with jax.grad of the cross-entropy) is finite and non-zero."""
    cfg = _config(method_name, TRAINABLE_OPTIONS.get(method_name), momentum=0.0, weight_decay=0.0)
    steps = make_steps(cfg, 10, steps_per_epoch=10)
    state = create_train_state(cfg, (8, 8, 1), 10, 10, gap_batch=16, init_images=IMAGES)
    model = make_model(cfg, 10)
    batch = {"image": IMAGES, "label": LABELS}

    def loss(params):
        logits, _ = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
                                mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    grads = jax.jit(jax.grad(loss))(state.params)
    before = jax.device_get(state.params)
    after, _ = steps.train(steps.place_state(state), steps.place_batch(batch))
    after = steps.host_state(after).params
    count = 0
    for conv in CONVS:
        for kind, values in before[conv].get("ConvQuantizer_0", {}).items():
            for name, value in values.items():
                g = float(grads[conv]["ConvQuantizer_0"][kind][name])
                assert math.isfinite(g) and g != 0.0, f"{conv}/{kind}/{name}: gradient {g}"
                new = float(after[conv]["ConvQuantizer_0"][kind][name])
                assert new == pytest.approx(float(value) - 0.1 * g, rel=1e-4, abs=1e-7), f"{conv}/{kind}/{name}"
                count += 1
    method = get_method(method_name)
    assert count == 3 * len(method.weight_params) + 2 * len(method.activation_params)


def test_stats_follow_the_model_momentum():
    """absmax keeps running ranges like BatchNorm: new = m * old + (1 - m) * this batch's max, with the model's
    bn_momentum m, and evaluation uses them."""
    if "absmax" not in METHODS:
        pytest.skip("method 'absmax' is not registered yet")
    model = get_model("small_cnn", config=QuantConfig(BITS, BITS, method="absmax"), num_classes=10, bn_momentum=0.5)
    x = jnp.asarray(IMAGES)
    variables = jax.jit(lambda k: model.init(k, x, train=True))(jax.random.key(3))
    old = variables["batch_stats"]
    y = jnp.asarray(_rng.normal(size=(16, 8, 8, 1)) * 3, jnp.float32)
    _, updates = jax.jit(lambda v: model.apply(v, y, train=True, mutable=["batch_stats"]))(variables)
    inputs = _raw_conv_inputs(model, variables, y, train=True)
    for conv in ("conv1", "conv2"):
        prev = float(old[conv]["ConvQuantizer_0"]["activation"]["range"])
        new = float(updates["batch_stats"][conv]["ConvQuantizer_0"]["activation"]["range"])
        assert new == pytest.approx(0.5 * prev + 0.5 * float(np.max(inputs[conv])), rel=1e-5)
        assert abs(new - prev) > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Starting from a full-precision run


@pytest.fixture(scope="module")
def fp_variables():
    """A SmallCNN full-precision state with every parameter and BN statistic moved away from its initial value, so
    that quantizer state initialised from the fresh model's kernels instead of these would be caught."""
    fp = create_train_state(_config(None, quant=QuantConfig()), (8, 8, 1), 10, 10, gap_batch=16)
    rng = np.random.default_rng(7)

    def move(x):
        return jnp.asarray(np.asarray(x) * 1.7 + rng.normal(0, 0.05, np.shape(x)), jnp.float32)

    stats = jax.tree.map(lambda x: jnp.asarray(np.abs(move(x)) + 0.1, jnp.float32), fp.batch_stats)
    return {"params": jax.tree.map(move, fp.params), "batch_stats": stats}


# The data-driven clip starts of PACT and APoT, next to the default (constant) ones.
MSE_STARTS = {"pact": {"alpha_init": "mse"}, "apot": {"weight_alpha_init": "mse", "activation_alpha_init": "mse"}}


@pytest.mark.parametrize("method_name, options", [
    *[pytest.param(*p.values, None, marks=p.marks) for p in _registered(STATEFUL)],
    *[pytest.param(n, o, marks=p.marks) for p, (n, o) in zip(_registered(MSE_STARTS), MSE_STARTS.items())],
])
def test_create_train_state_calibrates_from_fp_variables(fp_variables, method_name, options):
    method = get_method(method_name, **(options or {}))
    cfg = _config(method_name, options)
    state = create_train_state(cfg, (8, 8, 1), 10, 10, gap_batch=16, init_variables=fp_variables,
                               init_images=IMAGES)
    # Every full-precision parameter and statistic is kept bit for bit.
    for collection, got in (("params", state.params), ("batch_stats", state.batch_stats)):
        for path, value in jax.tree_util.tree_flatten_with_path(fp_variables[collection])[0]:
            mine = got
            for p in path:
                mine = mine[p.key]
            np.testing.assert_array_equal(mine, value, err_msg=f"{collection}{jax.tree_util.keystr(path)}")
    # Quantizer state from the FP kernels and from the batch passed through the model in training mode (BN with
    # the batch's statistics, as the training steps will see it; fp_variables' moved running statistics would give
    # other inputs in evaluation mode).
    model = make_model(cfg, 10)
    inputs = _raw_conv_inputs(model, {"params": state.params, "batch_stats": state.batch_stats},
                              jnp.asarray(IMAGES), train=True)
    kernels = {c: fp_variables["params"][c]["kernel"] for c in CONVS}
    _check_init_rule(method, state.params, state.batch_stats, kernels, inputs)
    if method_name == "lsq":
        fresh = create_train_state(cfg, (8, 8, 1), 10, 10, gap_batch=16, init_images=IMAGES)
        for conv in CONVS:
            step = float(state.params[conv]["ConvQuantizer_0"]["weight"]["step"])
            assert step == pytest.approx(_lsq_step(kernels[conv], 7), rel=1e-5)
            assert abs(step - float(fresh.params[conv]["ConvQuantizer_0"]["weight"]["step"])) > 1e-3


def test_init_variables_of_another_model_are_refused(fp_variables):
    cfg = _config("lsq" if "lsq" in METHODS else "apot")
    resnet = get_model("resnet20", config=QuantConfig(), num_classes=10)
    shapes = jax.eval_shape(lambda: resnet.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), train=True))
    resnet_variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    with pytest.raises(ValueError, match="another model"):
        create_train_state(cfg, (8, 8, 1), 10, 10, gap_batch=16, init_images=IMAGES, init_variables=resnet_variables)
    # The same model with 5 classes: the classifier's shape differs.
    with pytest.raises(ValueError, match="shape"):
        create_train_state(cfg, (8, 8, 1), 5, 10, gap_batch=16, init_images=IMAGES, init_variables=fp_variables)
    # A missing full-precision parameter is not quantizer state that calibration could create.
    params = {k: v for k, v in fp_variables["params"].items() if k != "bn1"}
    with pytest.raises(ValueError, match="bn1"):
        create_train_state(cfg, (8, 8, 1), 10, 10, gap_batch=16, init_images=IMAGES,
                           init_variables={"params": params, "batch_stats": fp_variables["batch_stats"]})
    # An extra entry the model lacks.
    params = {**fp_variables["params"], "conv9": fp_variables["params"]["conv1"]}
    with pytest.raises(ValueError, match="conv9"):
        create_train_state(cfg, (8, 8, 1), 10, 10, gap_batch=16, init_images=IMAGES,
                           init_variables={"params": params, "batch_stats": fp_variables["batch_stats"]})


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and devices


def _max_diff(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in pairs)


def _quantizer_leaves(params):
    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
        if "ConvQuantizer_0" in jax.tree_util.keystr(p)
    }


@pytest.mark.slow
@pytest.mark.parametrize("method_name", _registered(("lsq",)))
def test_checkpoint_round_trip_keeps_quantizer_params(tmp_path, method_name):
    ds = tiny_dataset(64, 24)
    cfg = _config(method_name, epochs=2, eval_batch_size=12, lr=0.05, bn_reestimate_batches=0)
    straight = fit(cfg, ds, progress=False)
    fit(cfg, ds, workdir=tmp_path, progress=False, stop_after_epochs=1)
    after_one = _quantizer_leaves(load_variables(tmp_path)["params"])
    resumed = fit(cfg, ds, workdir=tmp_path, resume=True, progress=False)
    assert _max_diff(resumed.state.params, straight.state.params) < 1e-6
    assert _max_diff(resumed.state.batch_stats, straight.state.batch_stats) < 1e-6
    saved = _quantizer_leaves(load_variables(tmp_path)["params"])
    final = _quantizer_leaves(resumed.state.params)
    assert saved.keys() == final.keys() and len(saved) == 5  # 3 weight steps, 2 activation steps
    for k in saved:
        np.testing.assert_array_equal(saved[k], final[k], err_msg=k)
    # They trained: the checkpoint of epoch 1 differs from the final one.
    assert max(abs(float(after_one[k]) - float(final[k])) for k in final) > 1e-6


def _two_steps(method_name, parallel, num_devices):
    cfg = _config(method_name, parallel=parallel, num_devices=num_devices, batch_size=32, eval_batch_size=32)
    steps = make_steps(cfg, 10, steps_per_epoch=10)
    images = np.concatenate([IMAGES, IMAGES[::-1] * 0.5])
    labels = np.concatenate([LABELS, LABELS[::-1]])
    state = canonical_state(steps, create_train_state(cfg, (8, 8, 1), 10, 10, gap_batch=steps.gap_batch,
                                                      init_images=images))
    init = jax.device_get(state)
    placed = steps.place_state(state)
    for _ in range(2):
        placed, _ = steps.train(placed, steps.place_batch({"image": images, "label": labels}))
    return init, steps.host_state(placed)


@pytest.mark.slow
@pytest.mark.parametrize("method_name", _registered(("lsq", "absmax")))  # learned parameters; running statistics
def test_eight_devices_equal_one_device(method_name):
    init, one = _two_steps(method_name, "none", 1)
    _, eight = _two_steps(method_name, "shard_map", 8)
    assert _max_diff(eight.params, one.params) < 1e-5
    assert _max_diff(eight.batch_stats, one.batch_stats) < 1e-4
    assert _max_diff(eight.opt_state, one.opt_state) < 1e-4
    # The quantizer state moved (learned parameters by the optimizer, statistics by the running average).
    moved = {**_quantizer_leaves(init.params), **_quantizer_leaves(init.batch_stats)}
    now = {**_quantizer_leaves(one.params), **_quantizer_leaves(one.batch_stats)}
    assert moved and max(abs(float(moved[k]) - float(now[k])) for k in moved) > 1e-5


def _filled_variables(model, x, seed=0):
    """Variables of ``model`` filled in numpy (no compiled initialiser): He-normal kernels, positive scales,
    variances and quantizer ranges, small biases and means."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=True))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape), jnp.float32)
        if name in ("scale", "var", "range"):
            return jnp.asarray(rng.uniform(0.8, 1.2, leaf.shape), jnp.float32)
        return jnp.asarray(rng.normal(0, 0.1, leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)




@pytest.mark.parametrize(
    "model_name",
    ["small_cnn", pytest.param("resnet20", marks=pytest.mark.slow),
     pytest.param("small_resnet", marks=pytest.mark.slow)],
)
def test_bn_momentum_zero_keeps_the_last_batch_statistics(model_name):
    """Every model takes ``bn_momentum`` and passes it to its BatchNorms and quantizer statistics: at 0 the running
    statistics after a training forward are that batch's (what BN re-estimation relies on)."""
    if "absmax" not in METHODS:
        pytest.skip("method 'absmax' is not registered yet")
    model = get_model(model_name, config=QuantConfig(BITS, BITS, method="absmax"), num_classes=10, bn_momentum=0.0)
    x = jax.random.normal(jax.random.key(11), (4, 8, 8, 3 if model_name == "resnet20" else 1))
    variables = _filled_variables(model, x)

    def record(seen):
        def intercept(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and isinstance(context.module, (ConvQuantizer, QuantBatchNorm)):
                owner = context.module.parent if isinstance(context.module, ConvQuantizer) else context.module
                seen[module_path(owner)] = args[0]
            return next_fun(*args, **kwargs)

        return intercept

    def run(v):
        seen = {}
        with nn.intercept_methods(record(seen)):
            _, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
        return seen, updates["batch_stats"]

    seen, stats = jax.jit(run)(variables)
    ranges = means = 0
    for path, value in jax.tree_util.tree_flatten_with_path(stats)[0]:
        names = [p.key for p in path]
        if names[-1] == "range":
            owner = "/".join(names[: names.index("ConvQuantizer_0")])
            assert float(value) == pytest.approx(float(np.max(seen[owner])), rel=1e-6), owner
            ranges += 1
        elif names[-1] == "mean":
            h = np.asarray(seen["/".join(names[:-1])], np.float64)
            np.testing.assert_allclose(value, h.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
            var = _get_leaf(stats, names[:-1] + ["var"])
            np.testing.assert_allclose(var, h.var((0, 1, 2), ddof=1), rtol=1e-3, atol=1e-5)
            means += 1
    assert ranges == means - 1  # every conv but the first keeps a range; one BN per conv


def _get_leaf(tree, names):
    for n in names:
        tree = tree[n]
    return tree
