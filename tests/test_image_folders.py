"""Image-folder data (Office-31 layout) through grain, on a tiny generated folder of real JPEG photos.

The photos are crops of scikit-learn's two sample photographs, written with PIL in several sizes (square and not,
one grayscale, one RGBA PNG, one upper-case extension). Expected pixels are computed here with PIL and numpy in
float64, the torchvision semantics spelled out: Resize on a PIL image is PIL's bilinear resize, CenterCrop's offset
is round((size - crop) / 2), ToTensor divides by 255, Normalize subtracts the mean and divides by the std.
"""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from alignq_jax.data.image_folders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    find_classes,
    image_folder_domain,
    office31_task,
    split_per_class,
)
from alignq_jax.data.specs import DataNotFoundError

CLASSES = ("back_pack", "bike", "mug")  # written in another order below: discovery must sort them
# Images per (domain, class): different counts so that split sizes and per-class strata are visible.
COUNTS = {"amazon": {"mug": 6, "back_pack": 5, "bike": 4},
          "dslr": {"mug": 3, "back_pack": 4, "bike": 5},
          "webcam": {"mug": 5, "back_pack": 4, "bike": 4}}
SIZES = [(45, 60), (60, 45), (50, 50), (38, 70), (70, 52), (41, 41)]  # (width, height)
MEAN = np.asarray(IMAGENET_MEAN)
STD = np.asarray(IMAGENET_STD)


def _photo_crop(rng, width, height):
    photos = load_sample_images().images
    photo = photos[int(rng.integers(len(photos)))]
    side = int(rng.integers(80, 200))
    y, x = int(rng.integers(0, photo.shape[0] - side)), int(rng.integers(0, photo.shape[1] - side))
    return Image.fromarray(photo[y : y + side, x : x + side]).resize((width, height), Image.Resampling.LANCZOS)


def _write_tree(root: Path, counts=COUNTS, seed=0, sizes=SIZES):
    rng = np.random.default_rng(seed)
    for domain, per_class in counts.items():
        for cls, n in per_class.items():
            folder = root / domain / "images" / cls
            folder.mkdir(parents=True)
            for i in range(n):
                img = _photo_crop(rng, *sizes[int(rng.integers(len(sizes)))])
                if i == 1:
                    img.convert("L").save(folder / f"frame_{i:04d}.jpg", quality=90)
                elif i == 2 and cls == "bike":
                    img.convert("RGBA").save(folder / f"frame_{i:04d}.png")
                elif i == 3:
                    img.save(folder / f"frame_{i:04d}.JPG", quality=90)
                else:
                    img.save(folder / f"frame_{i:04d}.jpg", quality=90)
            (folder / "Thumbs.db").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def office(tmp_path_factory):
    return _write_tree(tmp_path_factory.mktemp("office31"))


def _expected(path, *, transform, size, resize):
    """The test transform, float64, from PIL directly."""
    img = Image.open(path).convert("RGB")
    if transform == "dsan":
        arr = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))
    else:
        w, h = img.size
        if transform == "alignq":
            new = (resize, resize)
        else:  # shorter side to `resize`, the longer one truncated
            new = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        arr = np.asarray(img.resize(new, Image.Resampling.BILINEAR))
        top, left = int(round((arr.shape[0] - size) / 2)), int(round((arr.shape[1] - size) / 2))
        arr = arr[top : top + size, left : left + size]
    return (arr / 255.0 - MEAN) / STD


def _all(batches):
    batches = list(batches)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ---------------------------------------------------------------------------------------------- discovery


def test_discovery_sorts_classes_and_keeps_only_image_files(office):
    assert find_classes(office, ["amazon", "dslr", "webcam"]) == CLASSES
    files = image_folder_domain(office, "amazon")
    assert files.classes == CLASSES and len(files) == sum(COUNTS["amazon"].values())
    for path, label in zip(files.paths, files.labels):
        assert Path(path).parent.name == CLASSES[label]
        assert Path(path).suffix.lower() in (".jpg", ".png")  # the .JPG and .png files are in, Thumbs.db is not
    assert np.bincount(files.labels).tolist() == [COUNTS["amazon"][c] for c in CLASSES]
    assert any(p.endswith(".JPG") for p in files.paths) and any(p.endswith(".png") for p in files.paths)


def test_different_class_lists_name_the_difference(tmp_path):
    counts = {"amazon": {"mug": 1, "bike": 1}, "webcam": {"mug": 1, "bike": 1, "ruler": 1}}
    root = _write_tree(tmp_path, counts, sizes=[(40, 40)])
    with pytest.raises(ValueError, match=r"only in domain 'amazon': \[\]; only in domain 'webcam': \['ruler'\]"):
        office31_task(root, "amazon", "webcam")
    with pytest.raises(ValueError, match="ruler"):
        image_folder_domain(root, "amazon", classes=("bike", "mug", "ruler"))


def test_missing_folders_and_empty_class(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        office31_task(tmp_path / "nowhere", "amazon", "webcam")
    root = _write_tree(tmp_path / "data", {"amazon": {"mug": 1}}, sizes=[(40, 40)])
    with pytest.raises(DataNotFoundError, match=r"domain 'webcam'.*webcam/images.*\['amazon'\]"):
        office31_task(root, "amazon", "webcam")
    (root / "amazon" / "images" / "bike").mkdir()
    with pytest.raises(ValueError, match=r"amazon/images/bike' holds no image file"):
        image_folder_domain(root, "amazon")
    with pytest.raises(ValueError, match="different domains"):
        office31_task(root, "amazon", "amazon")
    with pytest.raises(ValueError, match="protocol"):
        office31_task(root, "amazon", "webcam", protocol="standard")


def test_unreadable_image_is_named(tmp_path):
    root = _write_tree(tmp_path, {"amazon": {"mug": 2}, "webcam": {"mug": 2}}, sizes=[(40, 40)])
    bad = root / "webcam" / "images" / "mug" / "frame_0001.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG
    task = office31_task(root, "amazon", "webcam", protocol="full", image_size=32)
    with pytest.raises(ValueError, match=re.escape(f"cannot decode image file '{bad}'")):
        _all(task.target.test_batches(2))


def test_batch_larger_than_the_split_is_refused_on_the_call(office):
    task = office31_task(office, "amazon", "dslr", protocol="paper", image_size=32)
    n = task.source.num_train  # 4 + 3 + 4 = 11
    assert n == 11 and task.source.steps_per_epoch(11) == 1
    with pytest.raises(ValueError, match=r"batch_size=12 x 1 shard\(s\) is larger than the split \(11 images\)"):
        task.source.train_batches(12)
    with pytest.raises(ValueError, match=r"batch_size=6 x 2 shard"):
        task.source.train_batches(6, num_shards=2, shard_index=0)


# ---------------------------------------------------------------------------------------------- protocols


def test_paper_protocol_is_a_stratified_disjoint_per_domain_split(office):
    task = office31_task(office, "amazon", "webcam", protocol="paper", image_size=32)
    for domain, train, test in (("amazon", task.source_train, None), ("webcam", task.target_train, task.target_test)):
        everything = image_folder_domain(office, domain)
        # int(0.8 * n) train files per class, as the official split script.
        assert np.bincount(train.labels, minlength=3).tolist() == [int(0.8 * COUNTS[domain][c]) for c in CLASSES]
        assert set(train.paths) <= set(everything.paths)
        if test is not None:
            assert not set(train.paths) & set(test.paths)
            assert sorted(train.paths + test.paths) == sorted(everything.paths)
    # The datasets: source trains on the source's 80 %, both evaluate on the target's held-out 20 %.
    assert task.source.train is task.source_train and task.target.train is task.target_train
    assert task.source.test is task.target_test and task.target.test is task.target_test
    assert task.target.num_test == sum(COUNTS["webcam"][c] - int(0.8 * COUNTS["webcam"][c]) for c in CLASSES)
    # The split rule: within a class, train files are RandomState(seed).choice(n, int(0.8 n)) of the sorted files.
    mugs = [p for p in image_folder_domain(office, "webcam").paths if Path(p).parent.name == "mug"]
    chosen = np.random.RandomState(1).choice(5, 4, replace=False)
    assert sorted(p for p in task.target_train.paths if Path(p).parent.name == "mug") == sorted(mugs[i] for i in chosen)
    # Another seed, another split.
    other = office31_task(office, "amazon", "webcam", protocol="paper", split_seed=2, image_size=32)
    assert set(other.target_test.paths) != set(task.target_test.paths)


def test_full_protocol_uses_every_image(office):
    task = office31_task(office, "dslr", "amazon", protocol="full", image_size=32)
    assert sorted(task.source_train.paths) == sorted(image_folder_domain(office, "dslr").paths)
    assert task.target_train.paths == task.target_test.paths == image_folder_domain(office, "amazon").paths
    train, test = split_per_class(image_folder_domain(office, "amazon"), train_fraction=0.5, seed=0)
    assert np.bincount(train.labels).tolist() == [2, 2, 3]  # int(0.5 * n) of 5, 4, 6


# ---------------------------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("transform", ["alignq", "dsan", "shorter_side"])
def test_test_transform_matches_pil_resize_crop_normalise(office, transform):
    task = office31_task(office, "amazon", "webcam", protocol="full", image_size=32, resize_size=40,
                         transform=transform)
    out = _all(task.target.test_batches(4))
    n = task.target.num_test  # 13 -> 4 batches, 3 padding rows
    assert out["image"].shape == (16, 32, 32, 3) and out["image"].dtype == np.float32
    assert out["mask"].tolist() == [True] * n + [False] * 3
    assert out["label"][:n].tolist() == task.target_test.labels.tolist()
    expected = np.stack([_expected(p, transform=transform, size=32, resize=40) for p in task.target_test.paths])
    np.testing.assert_allclose(out["image"][:n], expected, atol=2e-6)


def test_real_size_224_default(tmp_path):
    root = _write_tree(tmp_path, {"amazon": {"mug": 1, "bike": 1}, "webcam": {"mug": 1, "bike": 1}},
                       sizes=[(300, 300), (320, 240)])
    task = office31_task(root, "amazon", "webcam", protocol="full")
    assert task.target.image_shape == (224, 224, 3) and task.target.resize_size == 256
    out = _all(task.target.test_batches(2))
    expected = np.stack([_expected(p, transform="alignq", size=224, resize=256) for p in task.target_test.paths])
    np.testing.assert_allclose(out["image"], expected, atol=2e-6)
    batch = next(iter(task.source.train_batches(2, seed=3, normalise=False)))
    assert batch["image"].shape == (2, 224, 224, 3) and batch["image"].dtype == np.uint8
    for img, label in zip(batch["image"], batch["label"]):
        path = task.source_train.paths[list(task.source_train.labels).index(label)]
        resized = np.asarray(Image.open(path).convert("RGB").resize((256, 256), Image.Resampling.BILINEAR))
        assert _crop_offsets(img, resized), "not a 224 crop (flipped or not) of the 256 x 256 resize"


def _crop_offsets(crop, resized):
    """Every (top, left, flipped) whose crop of ``resized`` equals ``crop``."""
    s = crop.shape[0]
    found = []
    for top in range(resized.shape[0] - s + 1):
        for left in range(resized.shape[1] - s + 1):
            window = resized[top : top + s, left : left + s]
            found += [(top, left, flip) for flip, w in ((False, window), (True, window[:, ::-1]))
                      if np.array_equal(w, crop)]
    return found


def test_train_crops_are_random_crops_and_flips_of_the_resized_image(office):
    ds = office31_task(office, "amazon", "webcam", protocol="full", image_size=32, resize_size=40).target
    resized = [np.asarray(Image.open(p).convert("RGB").resize((40, 40), Image.Resampling.BILINEAR))
               for p in ds.train.paths]
    seen = []
    for epoch in range(2):
        out = _all(ds.train_batches(4, seed=5, epoch=epoch, normalise=False))
        assert out["image"].shape == (12, 32, 32, 3) and out["mask"].all()  # 13 images: the last partial batch dropped
        files = []
        for img, label in zip(out["image"], out["label"]):
            matches = [(i, m) for i, r in enumerate(resized) for m in _crop_offsets(img, r)]
            assert len({i for i, _ in matches}) == 1, "each row is a crop of exactly one file"
            files.append(matches[0][0])
            assert ds.train.labels[matches[0][0]] == label
            seen += [m for _, m in matches]
        assert len(set(files)) == 12  # no file twice in an epoch
    assert len({(t, l) for t, l, _ in seen}) > 10 and {f for _, _, f in seen} == {False, True}
    # Normalisation of the same batch.
    raw = next(iter(ds.train_batches(4, seed=5, epoch=1, normalise=False)))
    norm = next(iter(ds.train_batches(4, seed=5, epoch=1)))
    np.testing.assert_allclose(norm["image"], (raw["image"] / 255.0 - MEAN) / STD, atol=2e-6)


def test_order_and_crops_are_a_function_of_seed_and_epoch(office):
    ds = office31_task(office, "amazon", "webcam", protocol="full", image_size=32).source
    a = _all(ds.train_batches(5, seed=1, epoch=2))
    b = _all(ds.train_batches(5, seed=1, epoch=2))
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    for other in (_all(ds.train_batches(5, seed=1, epoch=3)), _all(ds.train_batches(5, seed=2, epoch=2))):
        assert not np.array_equal(a["image"], other["image"])


# ---------------------------------------------------------------------------------------------- shards, workers


def test_shards_are_disjoint_and_put_together_give_the_one_shard_batches(office):
    ds = office31_task(office, "amazon", "webcam", protocol="full", image_size=32).source  # 15 amazon images
    whole = list(ds.train_batches(6, seed=4, epoch=1))
    shards = [list(ds.train_batches(3, seed=4, epoch=1, num_shards=2, shard_index=s)) for s in range(2)]
    assert len(whole) == len(shards[0]) == len(shards[1]) == ds.steps_per_epoch(6) == 2
    for b, (s0, s1) in enumerate(zip(*shards)):
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([s0[key], s1[key]]), whole[b][key])
    # Disjoint files: identify rows through the deterministic test transform.
    train_refs = [_expected(p, transform="alignq", size=32, resize=37) for p in ds.train.paths]
    rows = [[_identify(img, train_refs) for b in ds.train_batches(3, seed=4, epoch=1, num_shards=2, shard_index=s,
                                                                  augment=False) for img in b["image"]]
            for s in range(2)]
    assert not set(rows[0]) & set(rows[1]) and len(set(rows[0] + rows[1])) == 12
    # Evaluation (the target's images): every test image exactly once over the shards, padding masked.
    test_refs = [_expected(p, transform="alignq", size=32, resize=37) for p in ds.test.paths]
    test = [_all(ds.test_batches(4, num_shards=2, shard_index=s)) for s in range(2)]
    seen = [_identify(img, test_refs) for t in test for img, m in zip(t["image"], t["mask"]) if m]
    assert sorted(seen) == list(range(13)) and [len(t["mask"]) for t in test] == [8, 8]


def _identify(img, refs):
    """The index of the one reference image ``img`` equals (to float32 precision)."""
    hits = [i for i, r in enumerate(refs) if np.allclose(img, r, atol=2e-6, rtol=0)]
    assert len(hits) == 1, f"row matches {len(hits)} reference images"
    return hits[0]


def test_two_worker_processes_give_the_same_batches(office):
    kwargs = dict(protocol="paper", image_size=32)
    ref = office31_task(office, "amazon", "webcam", worker_count=0, **kwargs).target
    with office31_task(office, "amazon", "webcam", worker_count=2, **kwargs).target as ds:
        pipelines = []
        for epoch in (0, 1):  # the second epoch comes from the same workers, decoded ahead
            for b0, b2 in zip(ref.train_batches(2, seed=7, epoch=epoch), ds.train_batches(2, seed=7, epoch=epoch),
                              strict=True):
                for key in ("image", "label", "mask"):
                    np.testing.assert_array_equal(b0[key], b2[key])
            pipelines.append(ds._streams["train"])
        assert pipelines[0] is pipelines[1]
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(_all(ref.test_batches(3))[key], _all(ds.test_batches(3))[key])


def test_bad_dataset_arguments(office):
    files = image_folder_domain(office, "amazon")
    other = image_folder_domain(office, "dslr")
    with pytest.raises(ValueError, match="resize_size"):
        ImageFolderDataset(files, other, image_size=64, resize_size=48)
    with pytest.raises(ValueError, match="transform"):
        ImageFolderDataset(files, other, transform="random_resized_crop")
    with pytest.raises(ValueError, match="empty"):
        ImageFolderDataset(files, files.subset([], "none"))
