"""ZeroQ (zero-shot PTQ): the distillation objective against float64 numpy moments of the BatchNorm inputs, the
distilled data approaching the running statistics, determinism, no data read, activation ranges against the
activations computed independently (one batch and the running max over batches), FP weights and BatchNorm
statistics kept, and 8-bit vs 2-bit accuracy of a SmallCNN trained briefly on the real 8x8 digits."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import alignq_jax.data as data_module
from alignq_jax import zeroq
from alignq_jax.data import ArrayDataset, load_dataset
from alignq_jax.data.augment import normalize
from alignq_jax.methods.absmax import AbsMax
from alignq_jax.models import SmallCNN
from alignq_jax.quantize import QuantActivation, QuantBatchNorm, QuantConfig, QuantConv

NUM_BN = 3  # SmallCNN: conv{i} -> bn{i}, i = 0, 1, 2; every BatchNorm input is a conv output
EPS = zeroq.STD_EPS


@pytest.fixture(scope="module")
def trained():
    """A SmallCNN trained for a few Adam steps on the real digits (98% test accuracy), plus the test split."""
    ds = load_dataset("digits")
    xtr, ytr = normalize(ds.train_images, ds.mean, ds.std), ds.train_labels
    xte, yte = normalize(ds.test_images, ds.mean, ds.std), ds.test_labels
    model = SmallCNN(config=QuantConfig(), num_classes=10)
    variables = model.init(jax.random.key(0), xtr[:8], train=False)
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss_fn(p):
            logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]

        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state

    params, stats, opt_state = variables["params"], variables["batch_stats"], opt.init(variables["params"])
    rng = np.random.default_rng(0)
    for _ in range(100):
        idx = rng.choice(len(xtr), 64, replace=False)
        params, stats, opt_state = step(params, stats, opt_state, xtr[idx], ytr[idx])
    return model, {"params": params, "batch_stats": stats}, ds.image_shape, (xte, yte)


@pytest.fixture(scope="module")
def distilled(trained):
    model, variables, shape, _ = trained
    losses = []
    images = zeroq.distill_images(model, variables, shape, key=jax.random.key(7), num_images=32, steps=200,
                                  progress=lambda info: losses.append(info))
    return images, losses


def _accuracy(model, variables, test):
    x, y = test
    return float(np.mean(np.argmax(np.asarray(model.apply(variables, x, train=False)), -1) == y))


def _bn_inputs(model, variables, images):
    """The train-mode input of every BatchNorm (the conv outputs), float64 (N, H, W, C) each."""
    _, state = model.apply(variables, jnp.asarray(images), train=True, mutable=["batch_stats", "intermediates"],
                           capture_intermediates=lambda mdl, name: isinstance(mdl, QuantConv) and name == "__call__")
    inter = state["intermediates"]
    return [np.asarray(inter[f"conv{i}"]["__call__"][0], np.float64) for i in range(NUM_BN)]


def _moment_errors(model, variables, images):
    """Per BatchNorm: (max |mean - running mean|, max |std - running std|), numpy float64."""
    errors = []
    for i, h in enumerate(_bn_inputs(model, variables, images)):
        bn = variables["batch_stats"][f"bn{i}"]
        mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
        run_mean, run_var = np.asarray(bn["mean"], np.float64), np.asarray(bn["var"], np.float64)
        errors.append((np.abs(mean - run_mean).max(), np.abs(np.sqrt(var + EPS) - np.sqrt(run_var + EPS)).max()))
    return errors


def _numpy_loss(model, variables, images):
    """ZeroQ's objective written independently: squared distances of the moments (float64), plus the input's."""
    x = np.asarray(images, np.float64)
    loss = np.sum(x.mean((0, 1, 2)) ** 2) + np.sum((np.sqrt(x.var((0, 1, 2)) + EPS) - 1.0) ** 2)
    for i, h in enumerate(_bn_inputs(model, variables, images)):
        bn = variables["batch_stats"][f"bn{i}"]
        loss += np.sum((h.mean((0, 1, 2)) - np.asarray(bn["mean"], np.float64)) ** 2)
        loss += np.sum((np.sqrt(h.var((0, 1, 2)) + EPS) - np.sqrt(np.asarray(bn["var"], np.float64) + EPS)) ** 2)
    return loss


def _range(variables, conv):
    return float(variables["batch_stats"][conv]["ConvQuantizer_0"]["activation"]["range"])


def _bn_outputs(model, variables, images):
    """Eval-mode outputs of bn0 and bn1 (BN -> ReLU): the inputs of conv1 and conv2, float64."""
    _, state = model.apply(variables, jnp.asarray(images), train=False, mutable=["intermediates"],
                           capture_intermediates=lambda mdl, name: isinstance(mdl, QuantBatchNorm))
    inter = state["intermediates"]
    return [np.asarray(inter[f"bn{i}"]["__call__"][0], np.float64) for i in range(2)]


def _with_range(variables, conv, value):
    stats = {**variables["batch_stats"]}
    stats[conv] = {"ConvQuantizer_0": {"activation": {"range": jnp.asarray(value, jnp.float32)}}}
    return {"params": variables["params"], "batch_stats": stats}


# ---------------------------------------------------------------------------------------------------------------
# Distillation


def test_distillation_loss_equals_numpy_objective(trained, distilled):
    model, variables, shape, _ = trained
    noise = np.asarray(jax.random.normal(jax.random.key(3), (16, *shape)))
    loss = jax.jit(zeroq.distillation_loss, static_argnums=0)
    for images in (noise, distilled[0]):
        got = float(loss(model, variables, images))
        np.testing.assert_allclose(got, _numpy_loss(model, variables, images), rtol=2e-4, atol=1e-6)


def test_distillation_decreases_loss_and_matches_running_statistics(trained, distilled):
    model, variables, shape, _ = trained
    images, losses = distilled
    assert images.shape == (32, *shape) and images.dtype == np.float32
    start = np.asarray(jax.random.normal(jax.random.key(7), (32, *shape)))  # the documented starting point
    assert [d["step"] for d in losses] == list(range(1, 201)) and {d["batch"] for d in losses} == {0}
    assert losses[0]["loss"] == pytest.approx(_numpy_loss(model, variables, start), rel=2e-4)
    before, after = _numpy_loss(model, variables, start), _numpy_loss(model, variables, images)
    assert after < before / 100, (before, after)
    # Every BatchNorm input's moments move to the running statistics: far off at the Gaussian start, close now.
    for (m0, s0), (m1, s1), i in zip(_moment_errors(model, variables, start),
                                     _moment_errors(model, variables, images), range(NUM_BN)):
        run_std = np.sqrt(np.asarray(variables["batch_stats"][f"bn{i}"]["var"]) + EPS)
        assert m1 < 0.1 * run_std.mean() and s1 < 0.1 * run_std.mean(), (i, m1, s1, run_std.mean())
        assert m1 < m0 / 5 and s1 < s0 / 5, (i, (m0, s0), (m1, s1))
    # The input matches mean 0, std 1 per channel.
    np.testing.assert_allclose(images.mean((0, 1, 2)), 0.0, atol=0.05)
    np.testing.assert_allclose(images.std((0, 1, 2)), 1.0, atol=0.05)


def test_distill_is_deterministic_given_the_key(trained):
    model, variables, shape, _ = trained
    run = lambda k: zeroq.distill_images(model, variables, shape, key=jax.random.key(k), num_images=8, steps=15)
    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_distill_batches_are_optimised_separately(trained):
    """batch_size splits the start into batches, each optimised on its own: the second batch's result is what
    distilling that slice of the noise alone gives."""
    model, variables, shape, _ = trained
    key = jax.random.key(4)
    both = zeroq.distill_images(model, variables, shape, key=key, num_images=12, steps=10, batch_size=6)
    start = jax.random.normal(key, (12, *shape))
    optimizer = zeroq._optimizer(0.5)

    @jax.jit
    def step(x, opt_state):  # the same Adam + plateau step written out, on the second slice alone
        loss, grad = jax.value_and_grad(lambda v: zeroq.distillation_loss(model, variables, v))(x)
        updates, opt_state = optimizer.update(grad, opt_state, x, value=loss)
        return optax.apply_updates(x, updates), opt_state

    x, opt_state = start[6:], optimizer.init(start[6:])
    for _ in range(10):
        x, opt_state = step(x, opt_state)
    np.testing.assert_allclose(both[6:], np.asarray(x), rtol=1e-4, atol=1e-5)
    assert np.abs(both[6:] - np.asarray(start[6:])).max() > 0.5  # it did move


def test_steps_zero_returns_the_gaussian_start(trained):
    model, variables, shape, _ = trained
    got = zeroq.distill_images(model, variables, shape, key=jax.random.key(5), num_images=4, steps=0)
    np.testing.assert_array_equal(got, np.asarray(jax.random.normal(jax.random.key(5), (4, *shape))))


# ---------------------------------------------------------------------------------------------------------------
# Quantization


def test_zeroq_config_is_per_channel_absmax():
    config = zeroq.zeroq_config(4, 8)
    assert (config.w_bits, config.a_bits, config.method_name) == (4, 8, "absmax")
    assert config.quantizer == AbsMax(per_channel=True)
    # Per output channel: channel c's levels are multiples of max|w_c| / 7 at 4 bits (numpy, float64).
    w = np.random.default_rng(0).normal(0, 1, (3, 3, 2, 4)) * np.array([0.01, 0.1, 1.0, 10.0])
    step = np.abs(w).max((0, 1, 2)) / 7
    expected = np.round(w / step) * step
    np.testing.assert_allclose(np.asarray(config.quantize_weight(jnp.asarray(w, jnp.float32))), expected,
                               rtol=1e-5, atol=1e-7)


def test_ranges_are_the_max_activation_on_the_distilled_images(trained, distilled):
    model, variables, shape, _ = trained
    images = distilled[0]
    qmodel = SmallCNN(config=zeroq.zeroq_config(4, 4), num_classes=10)
    qv = zeroq.zeroq_calibrate(qmodel, variables, images)
    in1, in2 = _bn_outputs(qmodel, qv, images)  # conv2's input computed with conv1 quantized by its final range
    assert _range(qv, "conv1") == pytest.approx(in1.max(), rel=1e-6)
    assert _range(qv, "conv2") == pytest.approx(in2.max(), rel=1e-6)
    assert "ConvQuantizer_0" not in qv["batch_stats"].get("conv0", {})  # the image is not quantized
    # Distilled data, not noise: the ranges differ from those the Gaussian start gives.
    noise = np.asarray(jax.random.normal(jax.random.key(7), images.shape))
    qn = zeroq.zeroq_calibrate(qmodel, variables, noise)
    assert abs(_range(qn, "conv1") - _range(qv, "conv1")) > 1e-3


def test_ranges_are_the_running_max_over_batches(trained, distilled):
    """batch_size 8 over 32 images: each range is max over batches, every batch quantized with the ranges seen so
    far (ZeroQ's update loop), reproduced here batch by batch with explicit range values."""
    model, variables, shape, _ = trained
    qmodel = SmallCNN(config=zeroq.zeroq_config(3, 3), num_classes=10)
    single = zeroq.zeroq_calibrate(qmodel, variables, distilled[0])
    # Order the images by their largest conv1 input, so that every later batch raises the ranges.
    images = distilled[0][np.argsort(_bn_outputs(qmodel, single, distilled[0])[0].max((1, 2, 3)))]
    qv = zeroq.zeroq_calibrate(qmodel, variables, images, batch_size=8)
    first = zeroq.zeroq_calibrate(qmodel, variables, images[:8])
    r1 = r2 = -np.inf
    for b in range(4):
        batch = images[8 * b:8 * (b + 1)]
        in1 = _bn_outputs(qmodel, single, batch)[0]  # does not depend on any range
        r1 = max(r1, in1.max())
        r2 = max(r2, _bn_outputs(qmodel, _with_range(single, "conv1", r1), batch)[1].max())
    assert _range(first, "conv1") < r1 - 1e-3 and _range(first, "conv2") < r2 - 1e-3  # later batches counted
    assert _range(qv, "conv1") == pytest.approx(r1, rel=1e-6)
    assert _range(qv, "conv2") == pytest.approx(r2, rel=1e-6)
    assert _range(qv, "conv1") == pytest.approx(_range(single, "conv1"), rel=1e-6)


def test_quant_activation_ranges_are_set_too():
    """A QuantActivation of a conv-input method keeps its own range: the max of its (ReLU'd) input over all batches,
    a stale value replaced."""
    import flax.linen as nn

    class ActModel(nn.Module):
        config: QuantConfig

        @nn.compact
        def __call__(self, x, train=True):
            x = nn.Conv(4, (3, 3))(x)
            x = QuantBatchNorm(QuantConfig(), use_running_average=not train, name="bn")(x)
            return QuantActivation(self.config, relu=True, use_running_average=not train, name="act")(x)

    images = np.asarray(jax.random.normal(jax.random.key(0), (6, 5, 5, 2)))
    fp_variables = ActModel(QuantConfig()).init(jax.random.key(1), images[:2], train=False)
    assert "act" not in fp_variables["batch_stats"]
    qmodel = ActModel(zeroq.zeroq_config(8, 8))
    qv = zeroq.zeroq_calibrate(qmodel, fp_variables, images[::-1], batch_size=2)
    _, state = qmodel.apply(qv, jnp.asarray(images), train=False, mutable=["intermediates"],
                            capture_intermediates=lambda mdl, name: isinstance(mdl, QuantBatchNorm))
    expected = np.maximum(np.asarray(state["intermediates"]["bn"]["__call__"][0], np.float64), 0).max()
    assert float(qv["batch_stats"]["act"]["activation"]["range"]) == pytest.approx(expected, rel=1e-6)
    first = zeroq.zeroq_calibrate(qmodel, fp_variables, images[::-1][:2])
    assert float(first["batch_stats"]["act"]["activation"]["range"]) < expected - 1e-3  # later batches count
    stale = {**qv, "batch_stats": {**qv["batch_stats"], "act": {"activation": {"range": jnp.float32(1e6)}}}}
    again = zeroq.zeroq_calibrate(qmodel, stale, images[::-1], batch_size=2)
    assert float(again["batch_stats"]["act"]["activation"]["range"]) == pytest.approx(expected, rel=1e-6)


def test_fp_weights_and_bn_statistics_are_kept(trained, distilled):
    model, variables, shape, _ = trained
    qmodel = SmallCNN(config=zeroq.zeroq_config(4, 4), num_classes=10)
    qv = zeroq.zeroq_calibrate(qmodel, variables, distilled[0])
    jax.tree.map(np.testing.assert_array_equal, qv["params"], variables["params"])
    for i in range(NUM_BN):
        for name in ("mean", "var"):
            np.testing.assert_array_equal(qv["batch_stats"][f"bn{i}"][name], variables["batch_stats"][f"bn{i}"][name])
    # Ranges already present are replaced by the distilled data's, BatchNorm statistics still untouched.
    stale = _with_range(_with_range(qv, "conv1", 1e6), "conv2", 1e6)
    again = zeroq.zeroq_calibrate(qmodel, stale, distilled[0])
    jax.tree.map(np.testing.assert_array_equal, again["batch_stats"], qv["batch_stats"])


def test_zeroq_quantize_reads_no_data_and_is_deterministic(trained, monkeypatch):
    model, variables, shape, _ = trained
    assert not {"dataset", "data", "batches"} & set(inspect.signature(zeroq.zeroq_quantize).parameters)

    def forbidden(*args, **kwargs):
        raise AssertionError("ZeroQ read a data set")

    monkeypatch.setattr(data_module, "load_dataset", forbidden)
    for name in ("train_batches", "test_batches", "take"):
        monkeypatch.setattr(ArrayDataset, name, forbidden)
    qmodel = SmallCNN(config=zeroq.zeroq_config(4, 4), num_classes=10)
    kwargs = dict(key=jax.random.key(9), num_images=8, steps=20)
    a = zeroq.zeroq_quantize(model, qmodel, variables, shape, **kwargs)
    b = zeroq.zeroq_quantize(model, qmodel, variables, shape, **kwargs)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # It is distillation followed by calibration on the distilled images, nothing else.
    images = zeroq.distill_images(model, variables, shape, **kwargs)
    jax.tree.map(np.testing.assert_array_equal, a, zeroq.zeroq_calibrate(qmodel, variables, images))


def test_8_bit_keeps_fp_accuracy_and_2_bit_falls(trained, distilled):
    model, variables, shape, test = trained
    fp = _accuracy(model, variables, test)
    acc = {}
    for bits in (8, 2):
        qmodel = SmallCNN(config=zeroq.zeroq_config(bits, bits), num_classes=10)
        acc[bits] = _accuracy(qmodel, zeroq.zeroq_calibrate(qmodel, variables, distilled[0]), test)
    assert fp > 0.9, fp
    assert acc[8] >= fp - 0.03, (fp, acc)
    assert acc[2] < fp - 0.2, (fp, acc)


# ---------------------------------------------------------------------------------------------------------------
# Validation


def test_bad_arguments_raise(trained):
    model, variables, shape, _ = trained
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="image_shape"):
        zeroq.distill_images(model, variables, (8, 8), key=key)
    with pytest.raises(ValueError, match="steps"):
        zeroq.distill_images(model, variables, shape, key=key, steps=-1)
    with pytest.raises(ValueError, match="num_images"):
        zeroq.distill_images(model, variables, shape, key=key, num_images=0)
    with pytest.raises(ValueError, match="lr"):
        zeroq.distill_images(model, variables, shape, key=key, lr=0.0)
    with pytest.raises(ValueError, match="images"):
        zeroq.zeroq_calibrate(model, variables, np.zeros((8, 8, 1), np.float32))


def test_model_without_batchnorm_raises():
    import flax.linen as nn

    class NoBN(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    model = NoBN()
    variables = {"params": model.init(jax.random.key(0), jnp.zeros((2, 4, 4, 1)))["params"]}
    with pytest.raises(ValueError, match="BatchNorm"):
        zeroq.distillation_loss(model, variables, jnp.zeros((2, 4, 4, 1)))
