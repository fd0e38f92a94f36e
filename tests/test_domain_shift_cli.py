"""experiments/digits_shift.py and experiments/office31.py (alignq_jax.cli.domain_shift): cell order and the init
chain (every quantized cell starts from its seed's FP32 adapted model), tables equal to the per-cell records, AdaBN
accuracy equal to an independent re-estimation and evaluation, an interrupted run resumed to the same tables, bad
flags, default batch sizes on 1-8 devices, and the Office-31 runner on a tiny folder of real JPEGs with a
pretrained backbone file.

The end-to-end runs use the real training loop on UCI digits -> MNIST 8x8 (small_cnn, 48 images per split, 2
seeds, 2 quantizer rows)."""

import csv
import json
import shutil
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ablation import table_rows  # {row label: cells} of a Markdown table file

from alignq_jax.adaptation import DSAN
from alignq_jax.cli import domain_shift
from alignq_jax.data.digit_domains import digit_shift_task
from alignq_jax.models import MODELS
from alignq_jax.training import TrainConfig, load_variables, make_model, reestimate_batch_stats

TASK = "digits_to_mnist8"
LIMIT = 48
BASE = ["--tasks", TASK, "--limit", LIMIT, "--seeds", "2", "--methods", "uniform", "cdf_admm", "--bits", "4",
        "--fp-epochs", "1", "--epochs", "2", "--batch-size", "16", "--eval-batch-size", "64", "--adabn-batches", "2",
        "--devices", "1", "--no-progress"]
ROWS = ["fp32_source_only", "fp32_adapted", "uniform-w4a4", "cdf_admm-w4a4"]
CELLS = [f"seed{s}/{TASK}/{r}" for s in (0, 1) for r in ROWS]


def run_digits(argv):
    return domain_shift.main_digits([str(a) for a in argv])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (8 cells), with what every fit call was given recorded."""
    workdir = tmp_path_factory.mktemp("domain_shift") / "ref"
    calls = []
    real_fit = domain_shift.fit

    def recording_fit(config, dataset, **kwargs):
        init = kwargs["init_variables"]
        calls.append({"folder": Path(kwargs["workdir"]).relative_to(workdir).as_posix(), "resume": kwargs["resume"],
                      "objective": config.objective.name, "admm": config.admm,
                      "init": None if init is None else jax.device_get(init)})
        return real_fit(config, dataset, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(domain_shift, "fit", recording_fit)
        assert run_digits([*BASE, "--workdir", workdir]) == 0
    return workdir, calls


def cell_results(workdir: Path) -> dict:
    return {c: json.loads((workdir / c / "result.json").read_text()) for c in CELLS}


def expected_cell(values) -> str:
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f} (n={len(values)})"


# ------------------------------------------------------------------------------------------ order and init chain


@pytest.mark.slow
def test_cell_order_objectives_and_init_chain(reference):
    workdir, calls = reference
    assert [c["folder"] for c in calls] == CELLS
    assert all(not c["resume"] for c in calls)
    assert [c["objective"] for c in calls] == ["source_only", "dsan", "dsan", "dsan"] * 2
    assert [c["admm"] for c in calls] == [False, False, False, True] * 2
    for call in calls:
        row = call["folder"].rsplit("/", 1)[1]
        if row.startswith("fp32"):
            assert call["init"] is None  # digits: both FP32 models from scratch
            continue
        # A quantized cell starts from its own seed's FP32 DSAN model: the final variables of that cell's run.
        seed = call["folder"].split("/")[0]
        adapted = load_variables(workdir / seed / TASK / "fp32_adapted")
        for collection in ("params", "batch_stats"):
            got = jax.tree_util.tree_leaves_with_path(call["init"][collection])
            want = jax.tree_util.tree_leaves_with_path(adapted[collection])
            assert [p for p, _ in got] == [p for p, _ in want]
            for (path, a), (_, b) in zip(got, want):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{call['folder']} {path}")
    # The two seeds' adapted models differ, so the check above would see a seed mix-up.
    a0 = load_variables(workdir / "seed0" / TASK / "fp32_adapted")["params"]
    a1 = load_variables(workdir / "seed1" / TASK / "fp32_adapted")["params"]
    assert not np.allclose(a0["classifier"]["kernel"], a1["classifier"]["kernel"])


# ------------------------------------------------------------------------------------------------- outputs


@pytest.mark.slow
def test_tables_csv_and_json_equal_the_per_cell_records(reference):
    workdir, _ = reference
    results = cell_results(workdir)
    by_row = {}
    for folder, r in results.items():
        assert r["status"] == "done" and r["task"] == TASK
        assert r["epochs"] == (1 if "fp32" in folder else 2)
        # The runner's own evaluation of the last epoch equals what fit measured on the target test split.
        assert r["target_training_bn"] == pytest.approx(r["last_epoch_target_accuracy_fit"], abs=1e-9)
        by_row.setdefault(folder.rsplit("/", 1)[1], []).append(r)
    labels = {"fp32_source_only": "FP32 source only", "fp32_adapted": "FP32 DSAN", "uniform-w4a4": "Uniform",
              "cdf_admm-w4a4": "CDF + ADMM (AlignQ)"}
    table1, table2 = table_rows(workdir / "table1.md"), table_rows(workdir / "table2.md")
    best = table_rows(workdir / "best_epoch.md")
    for row, rs in by_row.items():
        want = [expected_cell([r[k] for r in rs]) for k in ("target_training_bn", "target_adabn")]
        assert table1[labels[row]] == want, row
        assert table2[labels[row]] == want, row
        assert best[labels[row]] == [expected_cell([r["best_epoch_target_accuracy"] for r in rs])]
    assert list(table1) == list(labels.values())
    text = (workdir / "table1.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert f"{TASK}: target, training BN" in header and f"{TASK}: target, AdaBN" in header
    for phrase in ("LAST epoch", "seeds 0..1", "Command: `", "--methods uniform cdf_admm", "AdaBN = BatchNorm"):
        assert phrase in text
    best_text = (workdir / "best_epoch.md").read_text()
    assert "MODEL SELECTION ON TEST DATA" in best_text and "BEST epoch" in best_text and "LAST epoch" not in best_text
    with open(workdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(CELLS)
    for row in rows:
        r = results[f"seed{row['seed']}/{TASK}/{row['variant']}" + ("" if "fp32" in row["variant"] else "-w4a4")]
        for key in ("target_training_bn", "target_adabn", "best_epoch_target_accuracy", "source_test_accuracy"):
            assert float(row[key]) == r[key]
    payload = json.loads((workdir / "results.json").read_text())
    assert payload["cells_finished"] == payload["cells_total"] == len(CELLS)
    assert {"command", "machine", "date", "wall_seconds_cells"} <= set(payload)
    assert (workdir / "domain_shift.png").stat().st_size > 0


def _normalised(images, mean, std):
    return ((images.astype(np.float64) / 255.0 - mean) / std).astype(np.float32)


@pytest.mark.slow
def test_adabn_and_training_bn_accuracies_equal_an_independent_evaluation(reference):
    """Every cell: load the final variables, normalise the task's images here (source training statistics),
    re-estimate BatchNorm on the first 2 batches of 16 unlabelled target training images in the documented order
    of seed 0, epoch 0 (``np.random.default_rng([seed, epoch, 0]).permutation``; a train-mode forward normalises
    each batch with its own statistics, so the batches matter, not only the images) and count correct argmaxes
    on the target and source test images."""
    workdir, _ = reference
    task = digit_shift_task(TASK, seed=0, limit=LIMIT)
    mean = task.source_train_images.reshape(-1, 1).astype(np.float64).mean(0) / 255.0
    std = (task.source_train_images.reshape(-1, 1).astype(np.float64) / 255.0).std(0)
    order = np.random.default_rng([0, 0, 0]).permutation(len(task.target_train_images))
    target_train = _normalised(task.target_train_images, mean, std)
    adabn_batches = [{"image": target_train[order[i * 16:(i + 1) * 16]]} for i in range(2)]
    target_test = _normalised(task.target_test_images, mean, std)
    source_test = _normalised(task.source_test_images, mean, std)
    results = cell_results(workdir)
    changed = 0
    for folder, record in results.items():
        config = TrainConfig(**_config_fields(json.loads((workdir / folder / "cell.json").read_text())["config"]))
        model = make_model(config, 10)
        saved = load_variables(workdir / folder)
        variables = {"params": saved["params"], "batch_stats": saved["batch_stats"]}

        def accuracy(v, images, labels):
            logits = model.apply(v, jnp.asarray(images), train=False)
            return float(np.mean(np.argmax(np.asarray(logits), -1) == labels))

        adabn = {**variables, "batch_stats": reestimate_batch_stats(model, variables, adabn_batches)}
        assert record["adabn_batches"] == 2
        assert record["target_training_bn"] == pytest.approx(accuracy(variables, target_test,
                                                                      task.target_test_labels), abs=1e-9)
        assert record["target_adabn"] == pytest.approx(accuracy(adabn, target_test, task.target_test_labels),
                                                       abs=1e-9), folder
        assert record["source_test_accuracy"] == pytest.approx(
            accuracy(variables, source_test, task.source_test_labels), abs=1e-9)
        first = "backbone/bn0/mean".split("/")
        old, new = variables["batch_stats"], adabn["batch_stats"]
        for name in first:
            old, new = old[name], new[name]
        changed += not np.allclose(old, new)
    assert changed == len(CELLS)  # the target statistics really differ from the training ones


def _config_fields(saved: dict) -> dict:
    """The fields of a TrainConfig saved in cell.json that decide the network (the rest: defaults)."""
    from alignq_jax.quantize import QuantConfig

    quant = saved["quant"]
    method = quant["method"] if isinstance(quant["method"], str) else quant["method"]["name"]
    q = QuantConfig(w_bits=quant["w_bits"], a_bits=quant["a_bits"], method=method, levels=quant["levels"])
    return {"model": saved["model"], "quant": q, "objective": DSAN(), "admm": saved["admm"]}


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_tables(reference, tmp_path, monkeypatch, capsys):
    """The reference's files with seed 1's uniform cell never started and its cdf_admm cell stopped after epoch 1
    (its result and epoch-2 checkpoint removed); Ctrl-C as the first missing cell starts, then --resume."""
    ref, _ = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref, workdir)
    shutil.rmtree(workdir / CELLS[6])
    admm_cell = workdir / CELLS[7]
    (admm_cell / "result.json").unlink()
    shutil.rmtree(admm_cell / "checkpoints" / "2")
    for name in ("table1.md", "table2.md", "results.json"):
        (workdir / name).unlink()
    real_fit = domain_shift.fit
    calls = []

    def interrupted(config, dataset, **kwargs):
        calls.append(Path(kwargs["workdir"]).relative_to(workdir).as_posix())
        raise KeyboardInterrupt

    monkeypatch.setattr(domain_shift, "fit", interrupted)
    assert run_digits(["--resume", "--workdir", workdir, "--no-progress"]) == 130
    assert calls == [CELLS[6]]
    assert "--resume --workdir" in capsys.readouterr().err

    def recording(config, dataset, **kwargs):
        calls.append((Path(kwargs["workdir"]).relative_to(workdir).as_posix(), kwargs["resume"]))
        return real_fit(config, dataset, **kwargs)

    calls.clear()
    monkeypatch.setattr(domain_shift, "fit", recording)
    assert run_digits(["--resume", "--workdir", workdir, "--no-progress"]) == 0
    assert calls == [(CELLS[6], False), (CELLS[7], True)]
    assert f"cell 8/8: {TASK} cdf_admm w4a4 seed 1 (resuming from its checkpoint)" in capsys.readouterr().out
    got, want = cell_results(workdir), cell_results(ref)
    for cell in CELLS:
        for key in ("target_training_bn", "target_adabn", "source_test_accuracy", "best_epoch_target_accuracy",
                    "best_epoch", "epochs"):
            assert got[cell][key] == want[cell][key], (cell, key)
    for name in ("table1.md", "table2.md", "best_epoch.md"):
        assert table_rows(workdir / name) == table_rows(ref / name)
    # A used workdir without --resume is refused before anything runs.
    monkeypatch.setattr(domain_shift, "fit", lambda *a, **k: pytest.fail("fit was called"))
    assert run_digits([*BASE, "--workdir", workdir]) == 2
    assert "--resume" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize("flags, message", [
    (["--methods", "uniform", "nope"], "--methods: unknown 'nope'"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--adabn-batches", "0"], "--adabn-batches must be at least 1"),
    (["--admm-weight", "0"], "--admm-weight must be positive"),
    (["--methods", "uniform", "--admm-weight", "2"], "--admm-weight: only used by admm_only and cdf_admm"),
    (["--zeroq-steps", "3"], "--zeroq-steps: only used by zeroq"),
    (["--bits", "4", "4"], "--bits must be distinct bit-widths"),
    (["--bits", "1", "--methods", "apot"], "no quantized cell left"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--milestones", "1.5"], "--milestones must be fractions"),
    (["--batch-size", "12", "--devices", "8"], "--batch-size 12 must be divisible by the number of devices (8"),
    (["--tasks", TASK, TASK], "--tasks must be distinct tasks"),
])
def test_bad_digits_flags_exit_2_naming_the_flag(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(domain_shift, "fit", lambda *a, **k: pytest.fail("fit was called"))
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_digits(["--workdir", workdir, "--methods", "uniform", "cdf_admm", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not workdir.exists()


@pytest.mark.parametrize("flags, message", [
    (["--source", "amazon", "--target", "webcam"], "--data-dir is required"),
    (["--data-dir", "D"], "say which transfer"),
    (["--data-dir", "D", "--source", "amazon"], "--source needs --target"),
    (["--data-dir", "D", "--tasks", "amazon-webcam"], "'amazon-webcam' is not SOURCE:TARGET"),
    (["--data-dir", "D", "--tasks", "amazon:amazon"], "two different domains"),
    (["--data-dir", "D", "--tasks", "amazon:webcam", "--source", "dslr", "--target", "webcam"], "not both"),
    (["--data-dir", "D", "--source", "amazon", "--target", "webcam", "--pretrained", "missing.npz"],
     "--pretrained: no file at"),
    (["--data-dir", "D", "--source", "amazon", "--target", "webcam", "--workers", "-1"], "--workers must be 0"),
])
def test_bad_office_flags_exit_2_naming_the_flag(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(domain_shift, "fit", lambda *a, **k: pytest.fail("fit was called"))
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        domain_shift.main_office(["--workdir", str(workdir), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if "--pretrained" in flags:
        assert "alignq-convert-torchvision" in err
    assert not workdir.exists()


@pytest.mark.parametrize("kind, extra", [("digits", []), ("office31", ["--data-dir", "D", "--tasks", "amazon:dslr"])])
@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_default_batch_sizes_divide_over_1_to_8_devices(kind, extra, devices):
    parser = domain_shift.build_parser(kind)
    argv = [*extra, "--devices", str(devices)]
    args = parser.parse_args(argv)
    domain_shift.resolve_defaults(args, kind)
    domain_shift.validate_args(args, domain_shift.explicit_flags(parser, argv))
    plan, _ = domain_shift.build_plan(args)
    # 3 seeds x tasks (digits: 2 by default) x (2 FP32 + every quantizer row)
    assert len(plan) == 3 * len(args.tasks) * (2 + len(domain_shift.VARIANTS))
    assert {c.num_devices for _, c in plan} == {devices}


def test_average_over_tasks_is_the_mean_over_seeds_of_per_seed_task_means():
    records = []
    values = {("a", 0): 0.5, ("b", 0): 0.7, ("a", 1): 0.6, ("b", 1): 0.9, ("a", 2): 0.4}  # seed 2 lacks task b
    for (task, seed), acc in values.items():
        records.append({"task": task, "variant": "uniform", "label": "Uniform", "bits": 4, "seed": seed,
                        "status": "done", "target_training_bn": acc, "target_adabn": acc / 2,
                        "best_epoch_target_accuracy": acc, "source_test_accuracy": None})
    summary = {(e["task"], e["variant"]): e for e in domain_shift.summarise(records, ["a", "b"])}
    avg = summary[("average", "uniform")]
    assert avg["seeds"] == [0, 1]
    assert avg["target_training_bn"]["mean"] == pytest.approx((0.6 + 0.75) / 2)
    assert avg["target_training_bn"]["std"] == pytest.approx(statistics.stdev([0.6, 0.75]))
    assert avg["target_adabn"]["mean"] == pytest.approx((0.3 + 0.375) / 2)
    assert avg["source_test_accuracy"]["mean"] is None
    assert summary[("a", "uniform")]["target_training_bn"]["mean"] == pytest.approx(0.5)
    assert summary[("a", "uniform")]["target_training_bn"]["n"] == 3


# ------------------------------------------------------------------------------------------------ Office-31


@pytest.mark.slow
def test_office31_runner_on_a_tiny_jpeg_folder_with_a_pretrained_backbone(tmp_path, monkeypatch):
    from test_image_folders import _write_tree

    from alignq_jax.pretrained import flatten_variables, save_pretrained

    root = tmp_path / "office"
    _write_tree(root)
    # A "pretrained" backbone file of small_cnn's layout, in the converter's format.
    backbone = MODELS["small_cnn"](num_classes=0)
    weights = backbone.init(jax.random.key(42), jnp.zeros((1, 16, 16, 3)), train=False)
    save_pretrained(weights, tmp_path / "backbone.npz")
    file_flat = flatten_variables(weights)
    real_fit = domain_shift.fit
    seen = []

    def recording(config, dataset, **kwargs):
        seen.append((Path(kwargs["workdir"]).name, config.lr_multipliers, jax.device_get(kwargs["init_variables"])))
        return real_fit(config, dataset, **kwargs)

    monkeypatch.setattr(domain_shift, "fit", recording)
    workdir = tmp_path / "run"
    argv = ["--data-dir", root, "--source", "amazon", "--target", "webcam", "--model", "small_cnn",
            "--image-size", "16", "--workers", "0", "--batch-size", "8", "--eval-batch-size", "8", "--seeds", "1",
            "--methods", "uniform", "--fp-epochs", "1", "--epochs", "1", "--devices", "1", "--adabn-batches", "1",
            "--pretrained", tmp_path / "backbone.npz", "--workdir", workdir, "--no-progress"]
    assert domain_shift.main_office([str(a) for a in argv]) == 0
    assert [name for name, _, _ in seen] == ["fp32_source_only", "fp32_adapted", "uniform-w4a4"]
    for name, multipliers, init in seen:
        assert multipliers == (("^backbone/", 0.1),)
        if name.startswith("fp32"):  # both FP32 models start from the file's backbone, heads fresh
            flat = flatten_variables({k: init[k] for k in ("params", "batch_stats")})
            for key, value in file_flat.items():
                collection, rest = key.split("/", 1)
                np.testing.assert_array_equal(np.asarray(flat[f"{collection}/backbone/{rest}"]), value)
            assert "params/classifier/kernel" in flat
    record = json.loads((workdir / "seed0" / "amazon_to_webcam" / "uniform-w4a4" / "result.json").read_text())
    assert record["status"] == "done" and record["source_test_accuracy"] is not None  # paper protocol: held out
    assert 0 <= record["target_adabn"] <= 1 and record["adabn_batches"] == 1
    rows = table_rows(workdir / "table1.md")
    assert list(rows) == ["FP32 source only", "FP32 DSAN", "Uniform"]
    assert "pretrained backbone weights in backbone.npz" in (workdir / "table1.md").read_text()


def test_office31_protocols_give_the_source_test_split_only_when_held_out(tmp_path):
    from test_image_folders import COUNTS, _write_tree

    root = tmp_path / "office"
    _write_tree(root)
    parser = domain_shift.build_parser("office31")
    data = {}
    for protocol in ("paper", "full"):
        args = parser.parse_args(["--data-dir", str(root), "--tasks", "amazon:webcam", "--protocol", protocol,
                                  "--workers", "0", "--image-size", "16"])
        domain_shift.resolve_defaults(args, "office31")
        data[protocol] = domain_shift.office_task_data(args, "amazon:webcam")
    amazon, webcam = sum(COUNTS["amazon"].values()), sum(COUNTS["webcam"].values())
    full = data["full"]
    assert full.source_test is None
    assert (full.paired.source.num_train, full.target.num_train, full.target.num_test) == (amazon, webcam, webcam)
    paper = data["paper"]
    # Per class int(0.8 n) files train, the rest held out, in both domains.
    held = {d: sum(n - int(0.8 * n) for n in COUNTS[d].values()) for d in ("amazon", "webcam")}
    assert paper.source_test.num_test == held["amazon"]
    assert paper.paired.source.num_train == amazon - held["amazon"]
    assert (paper.target.num_train, paper.target.num_test) == (webcam - held["webcam"], held["webcam"])
    assert not set(paper.source_test.test.paths) & set(paper.paired.source.train.paths)
