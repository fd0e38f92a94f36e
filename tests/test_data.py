"""Tests for alignq_jax.data (docs/method.md §8 recipes). No network, no TensorFlow."""

from __future__ import annotations

import gzip
import pickle
import tarfile
import time

import numpy as np
import pytest

from alignq_jax import data
from alignq_jax.data import (
    ArrayDataset,
    DataNotFoundError,
    crop_flip,
    epoch_indices,
    iterate_batches,
    load_cifar10_python,
    load_dataset,
    load_digits_dataset,
    load_idx,
    load_tfds,
    normalize,
    num_batches,
    prefetch_in_thread,
    random_crop_flip,
    read_idx,
)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


# ------------------------------------------------------------------------------------------------ helpers


def _images(rng, n, h, w, c):
    return rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def _write_tfds_metadata(name: str, data_dir, num_examples: int) -> None:
    """Writes dataset_info.json + features.json (no records) so the builder counts as prepared (array_record)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import naming

    builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record")
    template = naming.ShardedFileTemplate(
        data_dir=builder.data_path, dataset_name=builder.name, filetype_suffix="array_record"
    )
    builder.info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(
                    name=s, shard_lengths=[num_examples], num_bytes=0, filename_template=template.replace(split=s)
                )
                for s in ("train", "test")
            ]
        )
    )
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)


def _write_cifar_batches(folder, rng, n_train_per_batch=20, n_test=10):
    """Fake cifar-10-batches-py; returns the NHWC arrays written."""
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = _images(rng, n_train_per_batch, 32, 32, 3)
        y = rng.integers(0, 10, n_train_per_batch)
        rows = x.transpose(0, 3, 1, 2).reshape(n_train_per_batch, 3072)  # HWC -> CHW rows as in the files
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": rows, b"labels": y.tolist()}))
        xs.append(x)
        ys.append(y)
    xt = _images(rng, n_test, 32, 32, 3)
    yt = rng.integers(0, 10, n_test)
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": xt.transpose(0, 3, 1, 2).reshape(n_test, 3072), b"labels": yt.tolist()})
    )
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x"] * 10}))
    return np.concatenate(xs), np.concatenate(ys), xt, yt


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return header + arr.astype(np.uint8).tobytes()


def _write_idx_set(folder, rng, n_train=12, n_test=7, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": _images(rng, n_train, 28, 28, 1)[..., 0],
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": _images(rng, n_test, 28, 28, 1)[..., 0],
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for name, arr in arrays.items():
        raw = _idx_bytes(arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


def _crop_flip_reference(images, oy, ox, flip, pad):
    """Per-image loop: the obvious implementation."""
    out = np.empty_like(images)
    _, h, w, _ = images.shape
    for i, img in enumerate(images):
        p = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
        window = p[oy[i] : oy[i] + h, ox[i] : ox[i] + w]
        out[i] = window[:, ::-1] if flip[i] else window
    return out


# ------------------------------------------------------------------------------------------------ normalisation


def test_loaders_normalise_pixels_like_torchvision(tmp_path):
    """The batches training sees: (x / 255 - mean) / std per channel, with torchvision's published CIFAR-10
    constants and MNIST's 0.5 / 0.5, applied to the pixels written to the data files (RGB order kept)."""
    rng = np.random.default_rng(11)
    _, _, xt, yt = _write_cifar_batches(tmp_path / "cifar" / "cifar-10-batches-py", rng, 4, 10)
    cifar = load_dataset("cifar10", tmp_path / "cifar")
    (batch,) = list(cifar.test_batches(10))
    expected = (xt.astype(np.float64) / 255.0 - np.array([0.4914, 0.4822, 0.4465])) / np.array([0.2023, 0.1994, 0.2010])
    np.testing.assert_allclose(batch["image"], expected, atol=2e-6)
    np.testing.assert_array_equal(batch["label"], yt)
    # Training batches (augmentation off) use the same normalisation on the shuffled rows.
    (train,) = list(cifar.train_batches(20, seed=0, epoch=0, augment=False))
    order = epoch_indices(20, shuffle=True, seed=0, epoch=0)
    raw = cifar.train_images[order].astype(np.float64)
    np.testing.assert_allclose(train["image"], (raw / 255.0 - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD), atol=2e-6)

    arrays = _write_idx_set(tmp_path / "mnist", rng)
    mnist = load_dataset("mnist", tmp_path / "mnist")
    (batch,) = list(mnist.test_batches(7))
    expected = (arrays["t10k-images-idx3-ubyte"][..., None] / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(batch["image"], expected, atol=2e-6)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*cifar10"):
        data.get_spec("imagenet")


# ------------------------------------------------------------------------------------------------ augmentation


def test_crop_flip_matches_per_image_reference():
    rng = np.random.default_rng(0)
    x = _images(rng, 16, 32, 32, 3)
    oy, ox = rng.integers(0, 9, 16), rng.integers(0, 9, 16)
    fl = rng.random(16) < 0.5
    np.testing.assert_array_equal(crop_flip(x, oy, ox, fl, pad=4), _crop_flip_reference(x, oy, ox, fl, 4))


def test_crop_is_a_shifted_window_and_identity_at_centre():
    rng = np.random.default_rng(1)
    x = _images(rng, 3, 32, 32, 3)
    n = x.shape[0]
    np.testing.assert_array_equal(crop_flip(x, np.full(n, 4), np.full(n, 4), np.zeros(n, bool), pad=4), x)
    # Offset (0, 8): the image moves 4 down and 4 left; the top 4 rows and right 4 columns are zero padding.
    out = crop_flip(x, np.zeros(n, int), np.full(n, 8), np.zeros(n, bool), pad=4)
    np.testing.assert_array_equal(out[:, 4:, :28], x[:, :28, 4:])
    assert not out[:, :4].any() and not out[:, :, 28:].any()
    # Flip only.
    np.testing.assert_array_equal(crop_flip(x, np.full(n, 4), np.full(n, 4), np.ones(n, bool), pad=4), x[:, :, ::-1])
    with pytest.raises(ValueError, match=r"offsets must lie in \[0, 8\]"):
        crop_flip(x, np.full(n, 9), np.zeros(n, int), np.zeros(n, bool), pad=4)


def test_random_crop_flip_shapes_determinism_and_variety():
    rng = np.random.default_rng(2)
    x = _images(rng, 64, 32, 32, 3)
    a = random_crop_flip(x, np.random.default_rng(7))
    b = random_crop_flip(x, np.random.default_rng(7))
    c = random_crop_flip(x, np.random.default_rng(8))
    assert a.shape == x.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Each output equals the reference for *some* offset/flip: reproduce the draws and compare.
    r = np.random.default_rng(7)
    oy, ox = r.integers(0, 9, 64), r.integers(0, 9, 64)
    fl = r.random(64) < 0.5
    np.testing.assert_array_equal(a, _crop_flip_reference(x, oy, ox, fl, 4))
    assert 0 < fl.sum() < 64


def test_normalize_matches_formula():
    rng = np.random.default_rng(3)
    x = _images(rng, 5, 4, 4, 3)
    out = normalize(x, CIFAR_MEAN, CIFAR_STD)
    ref = (x / 255.0 - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # Float input is taken as [0, 1] pixels (not divided by 255 again).
    np.testing.assert_allclose(normalize(x / 255.0, CIFAR_MEAN, CIFAR_STD), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(normalize(x), x / 255.0, rtol=1e-6)
    with pytest.raises(ValueError, match="1 or 3"):
        normalize(x, (0.5, 0.5), (0.5, 0.5))


# ------------------------------------------------------------------------------------------------ batching


@pytest.mark.parametrize("prefetch", [0, 2])
def test_training_epoch_covers_each_example_once(prefetch):
    n, bs = 103, 10
    x = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
    y = (np.arange(n) % 7).astype(np.int64)
    batches = list(iterate_batches(x, y, bs, shuffle=True, seed=3, epoch=0, prefetch=prefetch, normalise=False))
    assert len(batches) == n // bs == num_batches(n, bs, drop_last=True)
    for b in batches:
        assert b["image"].shape == (bs, 2, 2, 1) and b["label"].shape == (bs,) and b["label"].dtype == np.int32
        assert b["mask"].dtype == bool and b["mask"].all()
    ids = np.concatenate([b["image"][:, 0, 0, 0] for b in batches]).astype(int)
    assert len(ids) == len(set(ids.tolist())) == 100  # each at most once; only the n % bs = 3 dropped
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), ids % 7)  # pairs stay together
    ids_again = np.concatenate(
        [b["image"][:, 0, 0, 0] for b in iterate_batches(x, y, bs, shuffle=True, seed=3, epoch=0, normalise=False)]
    )
    np.testing.assert_array_equal(ids, ids_again)
    ids_next = np.concatenate(
        [b["image"][:, 0, 0, 0] for b in iterate_batches(x, y, bs, shuffle=True, seed=3, epoch=1, normalise=False)]
    )
    assert not np.array_equal(ids, ids_next)


def test_epoch_indices_orders():
    a = epoch_indices(50, shuffle=True, seed=0, epoch=0)
    assert sorted(a.tolist()) == list(range(50))
    assert not np.array_equal(a, epoch_indices(50, shuffle=True, seed=0, epoch=1))
    assert not np.array_equal(a, epoch_indices(50, shuffle=True, seed=1, epoch=0))
    np.testing.assert_array_equal(a, epoch_indices(50, shuffle=True, seed=0, epoch=0))
    np.testing.assert_array_equal(epoch_indices(50, shuffle=False), np.arange(50))


def test_augmented_batches_are_deterministic_and_independent_of_prefetch():
    rng = np.random.default_rng(4)
    x, y = _images(rng, 40, 32, 32, 3), rng.integers(0, 10, 40)
    kw = dict(shuffle=True, seed=5, epoch=2, augment="crop_flip", mean=CIFAR_MEAN, std=CIFAR_STD)
    a = list(iterate_batches(x, y, 8, prefetch=0, **kw))
    b = list(iterate_batches(x, y, 8, prefetch=3, **kw))
    for ba, bb in zip(a, b):
        for k in ("image", "label", "mask"):
            np.testing.assert_array_equal(ba[k], bb[k])
    assert a[0]["image"].dtype == np.float32 and a[0]["image"].shape == (8, 32, 32, 3)
    plain = list(iterate_batches(x, y, 8, **{**kw, "augment": "none"}))
    assert not np.array_equal(a[0]["image"], plain[0]["image"])


def test_eval_batches_pad_and_mask():
    rng = np.random.default_rng(5)
    n, bs = 23, 10
    x, y = _images(rng, n, 4, 4, 1), rng.integers(0, 10, n)
    batches = list(iterate_batches(x, y, bs, drop_last=False, mean=(0.5,), std=(0.5,)))
    assert len(batches) == 3 == num_batches(n, bs, drop_last=False)
    assert all(b["image"].shape == (bs, 4, 4, 1) for b in batches)
    assert sum(int(b["mask"].sum()) for b in batches) == n
    last = batches[-1]
    assert last["mask"].tolist() == [True] * 3 + [False] * 7
    np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in batches]), y)
    np.testing.assert_allclose(
        np.concatenate([b["image"][b["mask"]] for b in batches]), (x / 255.0 - 0.5) / 0.5, atol=1e-6
    )


def test_sharded_epochs_are_disjoint_and_equal_length():
    n, bs, shards = 37, 4, 3
    x = np.arange(n, dtype=np.uint8)[:, None, None, None]
    y = np.zeros(n, np.int64)
    train, test = [], []
    for s in range(shards):
        tb = list(iterate_batches(x, y, bs, shuffle=True, seed=1, num_shards=shards, shard_index=s, normalise=False))
        eb = list(iterate_batches(x, y, bs, drop_last=False, num_shards=shards, shard_index=s, normalise=False))
        train.append(np.concatenate([b["image"].ravel() for b in tb]))
        test.append(np.concatenate([b["image"].ravel()[b["mask"]] for b in eb]))
        assert len(tb) == num_batches(n, bs, drop_last=True, num_shards=shards)
        assert len(eb) == num_batches(n, bs, drop_last=False, num_shards=shards)
    all_train = np.concatenate(train)
    assert len(set(all_train.tolist())) == len(all_train) == shards * (n // shards // bs) * bs
    assert sorted(np.concatenate(test).tolist()) == list(range(n))


@pytest.mark.parametrize("augment", ["none", "flip", "crop_flip"])
def test_training_shards_put_together_are_the_one_shard_batch(augment):
    """Several processes: shard s of global batch b is block s of the one-process batch b, augmentation included
    (so a multi-process run trains on the batches of a one-process run)."""
    rng = np.random.default_rng(12)
    n, bs, shards = 50, 4, 3
    x, y = _images(rng, n, 6, 6, 2), rng.integers(0, 10, n)
    kw = dict(shuffle=True, seed=2, epoch=1, augment=augment, pad=2, normalise=False)
    whole = list(iterate_batches(x, y, shards * bs, **kw))
    parts = [list(iterate_batches(x, y, bs, num_shards=shards, shard_index=s, **kw)) for s in range(shards)]
    assert all(len(p) == len(whole) == num_batches(n, bs, drop_last=True, num_shards=shards) == 4 for p in parts)
    for b, batch in enumerate(whole):
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([p[b][key] for p in parts]), batch[key])
    if augment != "none":  # the augmentation really changed the images
        plain = next(iter(iterate_batches(x, y, shards * bs, **{**kw, "augment": "none"})))
        assert not np.array_equal(whole[0]["image"], plain["image"])


def test_batching_rejects_bad_arguments():
    x, y = np.zeros((5, 2, 2, 1), np.uint8), np.zeros(5, np.int64)
    with pytest.raises(ValueError, match="leaves no batch"):
        iterate_batches(x, y, 8)
    with pytest.raises(ValueError, match="labels must have shape"):
        iterate_batches(x, y[:4], 2)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        iterate_batches(x, y, 0)
    with pytest.raises(ValueError, match="augment must be one of"):
        iterate_batches(x, y, 2, augment="mixup")
    with pytest.raises(ValueError, match="shard_index"):
        iterate_batches(x, y, 1, num_shards=2, shard_index=2)


def test_prefetch_propagates_errors_and_stops_early():
    def gen():
        yield 1
        yield 2
        raise RuntimeError("boom")

    it = prefetch_in_thread(gen(), 1)
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(RuntimeError, match="boom"):
        next(it)
    endless = prefetch_in_thread(iter(range(10**9)), 2)
    assert [next(endless) for _ in range(3)] == [0, 1, 2]
    endless.close()  # joins the producer thread; must not hang


# ------------------------------------------------------------------------------------------------ ArrayDataset


def test_array_dataset_batches_and_stats():
    rng = np.random.default_rng(6)
    ds = ArrayDataset(
        _images(rng, 30, 8, 8, 3), rng.integers(0, 4, 30), _images(rng, 9, 8, 8, 3), rng.integers(0, 4, (9, 1)),
        num_classes=4, augment="crop_flip", pad=2,
    )
    assert ds.image_shape == (8, 8, 3) and ds.num_train == 30 and ds.num_test == 9
    assert ds.test_labels.shape == (9,) and ds.train_labels.dtype == np.int32
    mean, std = data.channel_stats(ds.train_images)
    np.testing.assert_allclose(ds.mean, (ds.train_images / 255.0).mean(axis=(0, 1, 2)))
    assert ds.mean == mean and ds.std == std
    train = list(ds.train_batches(8, seed=0, epoch=0))
    assert len(train) == ds.steps_per_epoch(8) == 3
    test = list(ds.test_batches(4))
    assert len(test) == ds.eval_steps(4) == 3 and sum(int(b["mask"].sum()) for b in test) == 9
    small = ds.take(10, 3)
    assert small.num_train == 10 and small.num_test == 3 and small.mean == ds.mean
    floats = ArrayDataset(ds.train_images / 255.0, ds.train_labels, ds.test_images / 255.0, ds.test_labels, 4)
    assert floats.train_images.dtype == np.float32


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(train_labels=np.zeros(9, np.int64)), "differ in length: 10 images vs 9 labels"),
        (dict(train_labels=np.full(10, 10)), r"must lie in \[0, 10\).*\[10, 10\]"),
        (dict(test_labels=np.full(4, -1)), r"test_labels must lie in \[0, 10\)"),
        (dict(train_labels=np.zeros(10, np.float32)), "must be integers"),
        (dict(train_images=np.zeros((10, 8, 8), np.uint8)), r"\(N, H, W, C\).*channel axis"),
        (dict(train_images=np.zeros((10, 8, 8, 1, 1), np.uint8)), r"\(N, H, W, C\)"),
        (dict(train_images=np.full((10, 8, 8, 1), 255.0)), r"\[0, 1\]"),
        (dict(train_images=np.zeros((10, 8, 8, 1), np.int16)), "uint8"),
        (dict(test_images=np.zeros((4, 9, 9, 1), np.uint8)), "differ in shape"),
        (dict(num_classes=0), "num_classes"),
        (dict(augment="cutout"), "augment must be one of"),
        (dict(mean=(0.5, 0.5)), "mean must have 1 or 1"),
        (dict(std=(0.0,)), "std must be positive"),
    ],
)
def test_array_dataset_rejects_bad_input(change, match):
    args = dict(
        train_images=np.zeros((10, 8, 8, 1), np.uint8), train_labels=np.zeros(10, np.int64),
        test_images=np.zeros((4, 8, 8, 1), np.uint8), test_labels=np.zeros(4, np.int64), num_classes=10,
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ArrayDataset(**args)


# ------------------------------------------------------------------------------------------------ local files


def test_cifar10_python_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    x, y, xt, yt = _write_cifar_batches(tmp_path / "cifar-10-batches-py", rng)
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):
        ds = load_cifar10_python(path)
        assert ds.name == "cifar10" and ds.augment == "crop_flip" and ds.mean == CIFAR_MEAN
        assert ds.train_images.shape == (100, 32, 32, 3) and ds.train_images.dtype == np.uint8
        np.testing.assert_array_equal(ds.train_images, x)
        np.testing.assert_array_equal(ds.train_labels, y)
        np.testing.assert_array_equal(ds.test_images, xt)
        np.testing.assert_array_equal(ds.test_labels, yt)
    assert load_dataset("cifar10", tmp_path).num_train == 100


def test_cifar10_channel_order(tmp_path):
    """A non-symmetric image: rows in the file are R plane, G plane, B plane, each row-major."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    row = np.zeros(3072, np.uint8)
    row[0 * 1024 + 0 * 32 + 1] = 10  # R at (y=0, x=1)
    row[1 * 1024 + 2 * 32 + 0] = 20  # G at (y=2, x=0)
    row[2 * 1024 + 31 * 32 + 5] = 30  # B at (y=31, x=5)
    batch = pickle.dumps({b"data": row[None], b"labels": [3]})
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(batch)
    img = load_cifar10_python(folder).train_images[0]
    assert img[0, 1, 0] == 10 and img[2, 0, 1] == 20 and img[31, 5, 2] == 30 and int(img.sum()) == 60


def test_cifar10_tar_archive_and_errors(tmp_path):
    rng = np.random.default_rng(8)
    x, y, xt, yt = _write_cifar_batches(tmp_path / "src" / "cifar-10-batches-py", rng, 4, 3)
    archive = tmp_path / "dl" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ds = load_cifar10_python(archive.parent)
    np.testing.assert_array_equal(ds.train_images, x)
    np.testing.assert_array_equal(ds.test_labels, yt)
    (tmp_path / "src" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match="missing data_batch_3"):
        load_cifar10_python(tmp_path / "src")
    (tmp_path / "src" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_3.*not a CIFAR-10 python batch"):
        load_cifar10_python(tmp_path / "src")
    with pytest.raises(DataNotFoundError, match="no CIFAR-10 python batches"):
        load_cifar10_python(tmp_path / "nowhere")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(9)
    arrays = _write_idx_set(tmp_path / "fm", rng, gz=gz)
    ds = load_idx(tmp_path / "fm", "fashion_mnist")
    assert ds.name == "fashion_mnist" and ds.image_shape == (28, 28, 1) and ds.mean == (0.5,)
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.train_labels, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.test_images[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_labels, arrays["t10k-labels-idx1-ubyte"])
    # load_dataset finds the files in <data_dir>/fashion_mnist and in torchvision's layout.
    assert load_dataset("fashion_mnist", tmp_path / "fm").num_train == 12
    _write_idx_set(tmp_path / "tv" / "MNIST" / "raw", rng, gz=gz)
    assert load_dataset("mnist", tmp_path / "tv").name == "mnist"


def test_idx_errors(tmp_path):
    rng = np.random.default_rng(10)
    _write_idx_set(tmp_path, rng)
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    good = bad.read_bytes()
    bad.write_bytes(b"\x00\x00\x08\x01" + good[4:-1])  # truncated
    with pytest.raises(ValueError, match="bytes follow"):
        load_idx(tmp_path)
    bad.write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(bad)
    bad.write_bytes(_idx_bytes(np.zeros(3, np.uint8)))  # 3 labels for 7 images
    with pytest.raises(ValueError, match="7 images but 3 labels"):
        load_idx(tmp_path)
    bad.unlink()
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_idx(tmp_path)


def test_svhn_mat_round_trip(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(11)
    x = _images(rng, 6, 32, 32, 3)
    y = np.array([10, 1, 2, 3, 10, 9])
    for split in ("train", "test"):
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x.transpose(1, 2, 3, 0), "y": y[:, None]})
    ds = load_dataset("svhn", tmp_path)
    assert ds.name == "svhn_cropped" and ds.augment == "none"
    np.testing.assert_array_equal(ds.train_images, x)
    np.testing.assert_array_equal(ds.test_labels, [0, 1, 2, 3, 0, 9])


# ------------------------------------------------------------------------------------------------ TFDS


def test_tfds_missing_data_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(DataNotFoundError, match="no prepared TFDS data") as info:
        load_tfds("cifar10", data_dir=tmp_path)
    message = str(info.value)
    assert "download_and_prepare" in message and "cifar-10-batches-py" in message and "--download" in message
    with pytest.raises(DataNotFoundError, match="IDX"):
        load_dataset("mnist", data_dir=tmp_path)
    assert time.monotonic() - start < 10.0
    assert not data.tfds_is_prepared("cifar10", tmp_path)
    assert not (tmp_path / "downloads").exists()


@pytest.mark.parametrize("name, shape, n", [("cifar10", (32, 32, 3), 6), ("mnist", (28, 28, 1), 5)])
def test_tfds_data_source_path_with_mock_data(tmp_path, name, shape, n):
    """The real code path through builder.is_prepared() and as_data_source, with TFDS's own mock records."""
    import tensorflow_datasets as tfds

    _write_tfds_metadata(name, tmp_path, n)
    assert data.tfds_is_prepared(name, tmp_path)
    with tfds.testing.mock_data(num_examples=n, data_dir=str(tmp_path)):
        ds = load_dataset(name, data_dir=tmp_path)
    assert ds.name == name and ds.num_classes == 10
    for images, labels in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
        assert images.shape == (n, *shape) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int32
        assert labels.min() >= 0 and labels.max() < 10
    batch = next(iter(ds.train_batches(2, prefetch=0)))
    assert batch["image"].shape == (2, *shape) and batch["image"].dtype == np.float32


# ------------------------------------------------------------------------------------------------ digits


def test_digits_without_scikit_learn_is_a_data_error_naming_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(data.DataNotFoundError, match=r"pip install 'alignq_jax\[demo\]'"):
        load_dataset("digits")


def test_digits_offline_dataset():
    ds = load_digits_dataset()
    assert ds.name == "digits" and ds.image_shape == (8, 8, 1) and ds.num_classes == 10
    assert ds.num_train + ds.num_test == 1797 and ds.num_test == 450
    assert ds.train_images.dtype == np.uint8 and ds.train_images.max() == 255
    assert set(np.unique(ds.train_labels).tolist()) == set(range(10)) == set(np.unique(ds.test_labels).tolist())
    again = load_dataset("digits")
    np.testing.assert_array_equal(ds.train_images, again.train_images)
    np.testing.assert_array_equal(ds.test_labels, again.test_labels)
    np.testing.assert_allclose(ds.mean, [ds.train_images.mean() / 255.0])
    batch = next(iter(ds.train_batches(64, prefetch=0)))
    normed = np.concatenate([b["image"] for b in ds.train_batches(ds.num_train, prefetch=0)])
    assert abs(normed.mean()) < 1e-4 and abs(normed.std() - 1.0) < 1e-3
    assert batch["image"].shape == (64, 8, 8, 1)
