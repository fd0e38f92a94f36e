"""Tests for alignq_jax.data.corruptions: the common-corruption benchmark as shifted test sets. No network."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pytest

from alignq_jax.data import ArrayDataset, DataNotFoundError
from alignq_jax.data import corruptions as C


def _gray_images(rng, n, h, w):
    return rng.integers(0, 256, size=(n, h, w, 1), dtype=np.uint8)


class CountingStub:
    """A corruption that records its inputs and adds np.random noise (so results depend on the image's seed)."""

    def __init__(self, fail_on=None):
        self.calls = []
        self.fail_on = fail_on

    def __call__(self, image, corruption, severity):
        if (corruption, severity) == self.fail_on:
            raise RuntimeError("interrupted")
        self.calls.append((corruption, severity, image.copy()))
        noise = np.random.randint(0, 5, size=image.shape)
        return np.clip(image.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def identity(image, corruption, severity):
    return image.copy()


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("bad", ["identity", "clean", "none", "glass", "speckle_noise", ["fog", "fog"], []])
def test_bad_corruption_names_raise_listing_the_allowed_ones(bad):
    with pytest.raises(ValueError) as info:
        C.check_corruptions(bad)
    if bad not in (["fog", "fog"],):
        assert all(name in str(info.value) for name in C.CORRUPTIONS)


@pytest.mark.parametrize("bad", [0, 6, -1, 1.0, True, [1, 1], [], [2, 0]])
def test_bad_severities_raise_listing_the_allowed_ones(bad):
    with pytest.raises(ValueError, match=r"1, 2, 3, 4, 5|repeat"):
        C.check_severities(bad)


def test_no_corruption_runs_before_the_arguments_are_checked():
    stub = CountingStub()
    images = _gray_images(np.random.default_rng(0), 3, 8, 8)
    for corruptions, severities in (("identity", 1), ("fog", 0), (["fog", "blur"], 1)):
        with pytest.raises(ValueError):
            C.corrupt_test_split(images, np.zeros(3, int), corruptions, severities, corrupt_fn=stub, progress=False)
    with pytest.raises(ValueError, match="pad_mode"):
        C.corrupt_images(images, "fog", 1, pad_mode="wrap", corrupt_fn=stub)
    with pytest.raises(ValueError, match="num_examples=4"):
        C.corrupt_test_split(images, np.zeros(3, int), "fog", 1, num_examples=4, corrupt_fn=stub, progress=False)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        C.corrupt_images(np.zeros((2, 8, 8, 2), np.uint8), "fog", 1, corrupt_fn=stub)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        C.corrupt_images(np.full((2, 8, 8, 1), 2.0, np.float32), "fog", 1, corrupt_fn=stub)
    assert stub.calls == []


def test_groups_keys_and_parsing():
    assert C.check_corruptions() == C.CORRUPTIONS and len(C.CORRUPTIONS) == 15
    assert sum(C.CORRUPTION_GROUPS.values(), ()) == C.CORRUPTIONS
    assert C.check_corruptions("blur") == ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur")
    assert C.check_severities(np.int64(3)) == (3,) and C.check_severities() == (1, 2, 3, 4, 5)
    for name in C.CORRUPTIONS:  # names contain underscores: the severity is the part after the last one
        for s in C.SEVERITIES:
            assert C.parse_corruption_key(C.corruption_key(name, s)) == (name, s)
    assert C.corruption_key("elastic_transform", 2) == "elastic_transform_2"
    for key in ("clean", "brightness+0.2", "contrast x0.5", "fog_0", "fog_6", "fog", "glass_blur_1.0"):
        with pytest.raises(ValueError, match="not a corruption key"):
            C.parse_corruption_key(key)


def test_subset_indices():
    idx = C.subset_indices(100, 10, seed=3)
    assert idx.shape == (10,) and len(set(idx.tolist())) == 10 and np.all(np.diff(idx) > 0) and idx.max() < 100
    np.testing.assert_array_equal(idx, C.subset_indices(100, 10, seed=3))
    assert not np.array_equal(idx, C.subset_indices(100, 10, seed=4))
    np.testing.assert_array_equal(C.subset_indices(7), np.arange(7))
    with pytest.raises(ValueError, match="more than the 5"):
        C.subset_indices(5, 6)


# ------------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3), (30, 41, 3), (40, 33, 1)])
@pytest.mark.parametrize("pad_mode", C.PAD_MODES)
def test_padding_and_cropping_round_trip(shape, pad_mode):
    """An identity corruption gives the images back exactly; the corruption sees the image centred in a padded
    RGB canvas of at least 32x32, padded as np.pad does it, grayscale replicated to 3 channels."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, *shape), dtype=np.uint8)
    seen = []

    def record(image, corruption, severity):
        seen.append(image.copy())
        return image.copy()

    out = C.corrupt_images(images, "contrast", 2, pad_mode=pad_mode, corrupt_fn=record)
    np.testing.assert_array_equal(out, images)
    assert out.dtype == np.uint8
    h, w, c = shape
    H, W = max(h, 32), max(w, 32)
    top, left = (H - h) // 2, (W - w) // 2
    for image, canvas in zip(images, seen):
        assert canvas.shape == (H, W, 3) and canvas.dtype == np.uint8
        rgb = np.repeat(image, 3, axis=-1) if c == 1 else image
        expected = np.pad(rgb, ((top, H - h - top), (left, W - w - left), (0, 0)), mode=pad_mode)
        np.testing.assert_array_equal(canvas, expected)


def test_grayscale_comes_back_as_channel_zero():
    images = _gray_images(np.random.default_rng(2), 4, 28, 28)

    def paint_other_channels(image, corruption, severity):
        out = image.copy()
        out[..., 1:] = 255
        return out

    def darken_channel_zero(image, corruption, severity):
        out = image.copy()
        out[..., 0] //= 2
        return out

    np.testing.assert_array_equal(C.corrupt_images(images, "fog", 1, corrupt_fn=paint_other_channels), images)
    np.testing.assert_array_equal(C.corrupt_images(images, "fog", 1, corrupt_fn=darken_channel_zero), images // 2)


def test_float_images_come_back_as_float_in_the_unit_range():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(5, 8, 8, 1), dtype=np.uint8)
    as_float = images.astype(np.float32) / 255.0
    out_float = C.corrupt_images(as_float, "snow", 4, seed=5, corrupt_fn=CountingStub())
    out_uint8 = C.corrupt_images(images, "snow", 4, seed=5, corrupt_fn=CountingStub())
    assert out_float.dtype == np.float32 and out_float.shape == images.shape
    np.testing.assert_allclose(out_float, out_uint8 / 255.0, atol=1e-7)
    assert not np.array_equal(out_uint8, images)


def test_a_corruption_that_changes_the_shape_is_an_error():
    with pytest.raises(ValueError, match="keep the shape"):
        C.corrupt_images(np.zeros((1, 32, 32, 3), np.uint8), "fog", 1, corrupt_fn=lambda x, c, s: x[:-1])
    with pytest.raises(ValueError, match="return uint8"):
        C.corrupt_images(np.zeros((1, 32, 32, 3), np.uint8), "fog", 1, corrupt_fn=lambda x, c, s: x / 255.0)


# ------------------------------------------------------------------------------------------------ test sets


def test_test_split_shapes_labels_subset_and_seeding():
    rng = np.random.default_rng(4)
    images = _gray_images(rng, 12, 28, 28)
    labels = rng.integers(0, 10, size=(12, 1))
    stub = CountingStub()
    full = C.corrupt_test_split(images, labels, ["fog", "snow"], [1, 3], seed=7, corrupt_fn=stub, progress=False)
    assert list(full) == ["fog_1", "fog_3", "snow_1", "snow_3"]
    assert len(stub.calls) == 4 * 12
    assert {(c, s) for c, s, _ in stub.calls} == {("fog", 1), ("fog", 3), ("snow", 1), ("snow", 3)}
    for x, y in full.values():
        assert x.shape == images.shape and x.dtype == np.uint8
        assert y.dtype == np.int32 and np.array_equal(y, labels[:, 0])
    # Every image has its own seed, so the cells differ from each other ...
    assert not np.array_equal(full["fog_1"][0], full["fog_3"][0])
    assert not np.array_equal(full["fog_1"][0], full["snow_1"][0])
    # ... and a subset holds exactly the full split's corrupted images at its indices.
    sub = C.corrupt_test_split(images, labels, ["fog", "snow"], [1, 3], seed=7, num_examples=5, corrupt_fn=stub,
                               progress=False)
    idx = C.subset_indices(12, 5, seed=7)
    for key, (x, y) in sub.items():
        assert x.shape == (5, 28, 28, 1)
        np.testing.assert_array_equal(x, full[key][0][idx])
        np.testing.assert_array_equal(y, labels[idx, 0])
    again = C.corrupt_test_split(images, labels, ["fog", "snow"], [1, 3], seed=7, corrupt_fn=stub, progress=False)
    other = C.corrupt_test_split(images, labels, ["fog", "snow"], [1, 3], seed=8, corrupt_fn=stub, progress=False)
    for key in full:
        np.testing.assert_array_equal(again[key][0], full[key][0])
        assert not np.array_equal(other[key][0], full[key][0])


def test_cache_hit_returns_identical_arrays_without_corrupting_again(tmp_path):
    rng = np.random.default_rng(5)
    images, labels = _gray_images(rng, 6, 8, 8), rng.integers(0, 10, 6)
    stub = CountingStub()
    args = dict(num_examples=4, seed=1, cache_dir=tmp_path, dataset_name="digits", corrupt_fn=stub, progress=False)
    first = C.corrupt_test_split(images, labels, ["fog", "pixelate"], [2, 5], **args)
    assert len(stub.calls) == 4 * 4
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("digits-")
    assert sorted(p.name for p in folder.iterdir()) == ["fog_2.npz", "fog_5.npz", "pixelate_2.npz", "pixelate_5.npz"]
    second = C.corrupt_test_split(images, labels, ["fog", "pixelate"], [2, 5], **args)
    assert len(stub.calls) == 16  # nothing generated
    for key in first:
        np.testing.assert_array_equal(second[key][0], first[key][0])
        np.testing.assert_array_equal(second[key][1], first[key][1])
    # A new cell is generated alone; other inputs get another folder.
    C.corrupt_test_split(images, labels, ["fog", "pixelate"], [2, 3, 5], **args)
    assert len(stub.calls) == 16 + 2 * 4
    C.corrupt_test_split(images, labels, ["fog"], [2], **{**args, "seed": 2})
    changed = images.copy()
    changed[C.subset_indices(6, 4, 1)[0], 0, 0, 0] ^= 1
    C.corrupt_test_split(changed, labels, ["fog"], [2], **args)
    C.corrupt_test_split(images, labels, ["fog"], [2], **{**args, "corrupt_fn": CountingStub()})  # another function
    assert len(list(tmp_path.iterdir())) == 3  # seed 2 and changed images; the other stub instance shares the class
    assert len(stub.calls) == 16 + 8 + 4 + 4
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_cache_key_includes_the_corruption_function(tmp_path):
    images, labels = _gray_images(np.random.default_rng(6), 2, 8, 8), np.zeros(2, int)
    args = dict(cache_dir=tmp_path, progress=False)
    a = C.corrupt_test_split(images, labels, "fog", 1, corrupt_fn=identity, **args)
    b = C.corrupt_test_split(images, labels, "fog", 1, corrupt_fn=CountingStub(), **args)
    assert len(list(tmp_path.iterdir())) == 2
    assert not np.array_equal(a["fog_1"][0], b["fog_1"][0])


def test_an_interrupted_generation_resumes_after_the_last_finished_cell(tmp_path):
    images, labels = _gray_images(np.random.default_rng(7), 3, 8, 8), np.arange(3)
    failing = CountingStub(fail_on=("frost", 1))
    args = dict(cache_dir=tmp_path, progress=False)
    with pytest.raises(RuntimeError, match="interrupted"):
        C.corrupt_test_split(images, labels, ["fog", "frost"], [1], corrupt_fn=failing, **args)
    (folder,) = tmp_path.iterdir()
    assert [p.name for p in folder.iterdir()] == ["fog_1.npz"]  # written when its cell finished; no temp file left
    resumed = CountingStub()  # same class, so the same cache folder
    out = C.corrupt_test_split(images, labels, ["fog", "frost"], [1], corrupt_fn=resumed, **args)
    assert {(c, s) for c, s, _ in resumed.calls} == {("frost", 1)} and len(resumed.calls) == 3
    assert set(out) == {"fog_1", "frost_1"}


def test_a_damaged_cache_file_is_an_error_naming_it(tmp_path):
    images, labels = _gray_images(np.random.default_rng(8), 2, 8, 8), np.arange(2)
    args = dict(cache_dir=tmp_path, progress=False, corrupt_fn=identity)
    C.corrupt_test_split(images, labels, "fog", 1, **args)
    (path,) = tmp_path.rglob("fog_1.npz")
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="fog_1.npz"):
        C.corrupt_test_split(images, labels, "fog", 1, **args)


def test_progress_callback_counts_generated_images(tmp_path):
    images, labels = _gray_images(np.random.default_rng(9), 4, 8, 8), np.arange(4)
    seen = []
    args = dict(cache_dir=tmp_path, corrupt_fn=identity, progress=lambda done, total: seen.append((done, total)))
    C.corrupt_test_split(images, labels, ["fog", "snow"], [1], **args)
    assert seen == [(i, 8) for i in range(1, 9)]
    seen.clear()
    C.corrupt_test_split(images, labels, ["fog", "snow", "frost"], [1], **args)  # two cells cached
    assert seen == [(i, 4) for i in range(1, 5)]


def test_corrupted_test_sets_keep_the_data_sets_recipe():
    rng = np.random.default_rng(10)
    ds = ArrayDataset(_gray_images(rng, 20, 8, 8), rng.integers(0, 10, 20), _gray_images(rng, 6, 8, 8),
                      rng.integers(0, 10, 6), 10, name="digits")
    sets = C.corrupted_test_sets(ds, ["fog"], [1, 2], num_examples=4, corrupt_fn=CountingStub(), progress=False)
    assert list(sets) == ["fog_1", "fog_2"]
    idx = C.subset_indices(6, 4, 0)
    for shifted in sets.values():
        assert shifted.mean == ds.mean and shifted.std == ds.std and shifted.train_images is ds.train_images
        assert shifted.num_test == 4 and np.array_equal(shifted.test_labels, ds.test_labels[idx])
        assert not np.array_equal(shifted.test_images, ds.test_images[idx])
        batch = next(iter(shifted.test_batches(4, prefetch=0)))
        expected = (shifted.test_images / 255.0 - ds.mean[0]) / ds.std[0]
        np.testing.assert_allclose(batch["image"], expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ real package


imagecorruptions = pytest.importorskip("imagecorruptions")


@pytest.fixture(scope="module")
def digits():
    from alignq_jax.data import load_digits_dataset

    ds = load_digits_dataset()
    return ds.test_images[:4], ds.test_labels[:4]


def test_every_corruption_runs_with_numpy_2_and_changes_the_images(digits):
    """All 15 corruptions of the real package (one 8x8 digit, padded to 32x32), glass_blur included (about 30 ms
    at 32x32) and fog (NumPy 2 shim)."""
    images = digits[0][:1]
    for name in C.CORRUPTIONS:
        out = C.corrupt_images(images, name, 3, seed=0)
        assert out.shape == images.shape and out.dtype == np.uint8
        assert not np.array_equal(out, images), name


def test_apply_corruption_takes_only_what_the_package_can_corrupt():
    for bad in (np.zeros((31, 32, 3), np.uint8), np.zeros((32, 32, 1), np.uint8), np.zeros((32, 32, 3), np.float32)):
        with pytest.raises(ValueError, match="H, W >= 32"):
            C.apply_corruption(bad, "fog", 1)
    # The pkg_resources stand-in (used only where setuptools no longer ships it) finds the frost photographs.
    assert os.path.isfile(C._resource_filename("imagecorruptions.corruptions", "./frost/frost1.png"))


def test_brightness_of_a_gray_image_matches_the_formula(digits):
    """On a gray image the HSV value is the pixel itself: brightness adds c * 255 (c = 0.1 .. 0.5) and truncates."""
    images = digits[0]
    for severity, c in zip(C.SEVERITIES, (0.1, 0.2, 0.3, 0.4, 0.5)):
        out = C.corrupt_images(images, "brightness", severity)
        expected = np.clip(images / 255.0 + c, 0.0, 1.0) * 255.0
        np.testing.assert_allclose(out.astype(np.float64), np.floor(expected + 1e-6), atol=1.0)
        assert out.mean() > images.mean() + 0.9 * c * 255 * (images < 255 * (1 - c)).mean()


def test_gaussian_noise_keeps_its_per_pixel_strength_on_grayscale():
    """Channel 0 keeps the benchmark's noise: std 0.08 * 255 at severity 1 (a channel mean would give 1/sqrt(3))."""
    images = np.full((5, 28, 28, 1), 128, np.uint8)
    out = C.corrupt_images(images, "gaussian_noise", 1, seed=3).astype(np.float64)
    assert abs(out.std() / (0.08 * 255) - 1.0) < 0.1
    assert abs(out.mean() - 127.5) < 2.0  # truncation by np.uint8 lowers the mean by about half a level


def test_real_corruptions_are_deterministic_and_leave_the_global_rng_alone(digits):
    images = digits[0]
    np.random.seed(123)
    state = np.random.get_state()
    for name in ("gaussian_noise", "impulse_noise", "frost"):  # impulse_noise: skimage's own generator, seeded
        a = C.corrupt_images(images, name, 5, seed=11)
        b = C.corrupt_images(images, name, 5, seed=11)
        c = C.corrupt_images(images, name, 5, seed=12)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c), name
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1]) and after[2:] == state[2:]


@pytest.mark.slow
def test_worker_processes_give_the_same_sets(digits):
    images, labels = digits
    args = dict(seed=2, progress=False)
    serial = C.corrupt_test_split(images, labels, ["gaussian_noise", "contrast"], [1, 5], **args)
    parallel = C.corrupt_test_split(images, labels, ["gaussian_noise", "contrast"], [1, 5], num_workers=2, **args)
    assert list(parallel) == list(serial)
    for key in serial:
        np.testing.assert_array_equal(parallel[key][0], serial[key][0])
        np.testing.assert_array_equal(parallel[key][1], serial[key][1])


# ------------------------------------------------------------------------------------------------ summary


def test_mean_corruption_accuracy_worked_example():
    accs = {("gaussian_noise", 1): 0.9, ("gaussian_noise", 2): 0.7, "fog_1": 0.8, "fog_2": 0.6}
    summary = C.mean_corruption_accuracy(accs)
    assert summary.mean == pytest.approx(0.75) and summary.count == 4
    assert list(summary.per_corruption) == ["gaussian_noise", "fog"]  # benchmark order, not insertion order
    assert summary.per_corruption == pytest.approx({"gaussian_noise": 0.8, "fog": 0.7})
    assert summary.per_severity == pytest.approx({1: 0.85, 2: 0.65})
    assert summary.table == {"gaussian_noise": {1: 0.9, 2: 0.7}, "fog": {1: 0.8, 2: 0.6}}
    assert dataclasses.asdict(summary)["per_corruption"]["fog"] == pytest.approx(0.7)


def test_mean_corruption_accuracy_rejects_incomplete_or_foreign_input():
    with pytest.raises(ValueError, match="missing.*fog_2"):
        C.mean_corruption_accuracy({"gaussian_noise_1": 0.9, "gaussian_noise_2": 0.7, "fog_1": 0.8})
    with pytest.raises(ValueError, match="not a corruption key"):
        C.mean_corruption_accuracy({"clean": 0.9, "fog_1": 0.8})
    with pytest.raises(ValueError, match="twice"):
        C.mean_corruption_accuracy({"fog_1": 0.8, ("fog", 1): 0.7})
    with pytest.raises(ValueError, match="severity"):
        C.mean_corruption_accuracy({("fog", 0): 0.8})
    with pytest.raises(ValueError, match="nan"):
        C.mean_corruption_accuracy({"fog_1": float("nan")})
    with pytest.raises(ValueError, match="no accuracies"):
        C.mean_corruption_accuracy({})


# ------------------------------------------------------------------------------------------------ CIFAR-10-C


def _write_config_metadata(config: str, data_dir, num_examples: int) -> None:
    """dataset_info.json + features.json of one cifar10_corrupted config (test split, no records): prepared."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import naming

    builder = tfds.builder(config, data_dir=str(data_dir), file_format="array_record")
    template = naming.ShardedFileTemplate(
        data_dir=builder.data_path, dataset_name=builder.name, filetype_suffix="array_record"
    )
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name="test", shard_lengths=[num_examples], num_bytes=0,
                            filename_template=template.replace(split="test"))
    ]))
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)


def test_cifar10_corrupted_through_tfds_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    n = 6
    for config in ("gaussian_noise_1", "gaussian_noise_2", "frosted_glass_blur_1", "frosted_glass_blur_2"):
        _write_config_metadata(f"cifar10_corrupted/{config}", tmp_path, n)
    assert C.cifar10_corrupted_is_prepared(tmp_path, ["gaussian_noise", "glass_blur"], [1, 2])
    assert not C.cifar10_corrupted_is_prepared(tmp_path, ["gaussian_noise", "elastic_transform"], [1])
    with tfds.testing.mock_data(num_examples=n, data_dir=str(tmp_path)):
        sets = C.load_cifar10_corrupted(["gaussian_noise", "glass_blur"], [1, 2], tmp_path)
        sub = C.load_cifar10_corrupted("glass_blur", 2, tmp_path, num_examples=4, seed=1)
    assert list(sets) == ["gaussian_noise_1", "gaussian_noise_2", "glass_blur_1", "glass_blur_2"]
    for x, y in sets.values():
        assert x.shape == (n, 32, 32, 3) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int32 and y.min() >= 0 and y.max() < 10
    assert list(sub) == ["glass_blur_2"] and sub["glass_blur_2"][0].shape == (4, 32, 32, 3)


def test_cifar10_corrupted_missing_configs_fail_fast_without_downloading(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    _write_config_metadata("cifar10_corrupted/fog_1", tmp_path, 3)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    start = time.monotonic()
    with pytest.raises(DataNotFoundError) as info:
        C.load_cifar10_corrupted(["fog", "elastic_transform"], [1, 2], tmp_path)
    message = str(info.value)
    assert "3 of 4" in message and "cifar10_corrupted/elastic_1" in message and "cifar10_corrupted/fog_2" in message
    assert "cifar10_corrupted/fog_1," not in message and "corrupted_test_sets" in message
    assert os.environ.get("TFDS_DISABLE_NETWORK")  # tests/conftest.py: no download can start
    with pytest.raises(DataNotFoundError, match="TensorFlow|network is switched off"):
        C.load_cifar10_corrupted("fog", 2, tmp_path, download=True)
    assert time.monotonic() - start < 10.0
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
