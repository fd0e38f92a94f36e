"""experiments/ablation.py (alignq_jax.cli.ablation): tables and CSV equal the per-cell results, --resume trains
no finished cell and an interrupted ablation resumed gives the numbers of an uninterrupted one, bad flags exit 2,
the ADMM strength against jax.grad, "ADMM only" really trains, and (method, bits) pairs a method does not define.

The end-to-end runs use the real training loop on the 8x8 digits (SmallCNN, tiny limits, 2 seeds, 2 methods, one
cheap corruption)."""

import csv
import json
import re
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignq_jax.admm import ADMM, ADMMState
from alignq_jax.cli import ablation
from alignq_jax.models import get_model
from alignq_jax.quantize import CORRELATION_RNG, GAP_COLLECTION, QuantConfig

WEIGHT = "100"  # ADMM weight of the runs: large enough that the term visibly moves the weights
BASE = ["--dataset", "digits", "--model", "small_cnn", "--bits", "2", "--seeds", "2", "--methods", "uniform",
        "admm_only", "--fp-epochs", "1", "--epochs", "2", "--batch-size", "16", "--eval-batch-size", "64",
        "--limit-train", "64", "--limit-test", "60", "--devices", "1", "--bn-reestimate-batches", "2", "--admm-weight",
        WEIGHT, "--admm-strength-batches", "2", "--no-progress"]
SMALL = [*BASE, "--corruptions", "gaussian_noise", "--severities", "1", "--corruption-examples", "20"]
CELLS = ["seed0/fp32", "seed0/uniform-w2a2", f"seed0/admm_only-w2a2-admm{WEIGHT}",
         "seed1/fp32", "seed1/uniform-w2a2", f"seed1/admm_only-w2a2-admm{WEIGHT}"]


def run_main(argv):
    return ablation.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted ablation (6 cells); the tests below read it and compare other runs with it."""
    workdir = tmp_path_factory.mktemp("ablation") / "ref"
    assert run_main([*SMALL, "--workdir", workdir]) == 0
    return workdir


def cell_results(workdir: Path) -> dict:
    return {c: json.loads((workdir / c / "result.json").read_text()) for c in CELLS}


# ------------------------------------------------------------------------------------------------- outputs


PERCENT = re.compile(r"^([\d.]+) ± ([\d.]+) \(n=(\d+)\)$")


def table_rows(path: Path) -> dict[str, list[str]]:
    rows = {}
    for line in path.read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def expected_cell(values, ratio=False) -> str:
    """mean ± sample std (n) computed with the statistics module, formatted as the tables promise."""
    mean, std = statistics.mean(values), statistics.stdev(values)
    if ratio:
        return f"{mean:.3g} ± {std:.2g} (n={len(values)})"
    return f"{100 * mean:.2f} ± {100 * std:.2f} (n={len(values)})"


@pytest.mark.slow
def test_tables_and_csv_equal_the_per_cell_results(reference):
    results = cell_results(reference)
    by_variant = {}
    for folder, r in results.items():
        assert r["status"] == "done" and r["seed"] == int(folder[4]) and r["bits"] == (32 if "fp32" in folder else 2)
        by_variant.setdefault(r["variant"], []).append(r)
    assert {k: len(v) for k, v in by_variant.items()} == {"fp32": 2, "uniform": 2, "admm_only": 2}

    table2 = table_rows(reference / "table2.md")
    labels = {"fp32": "FP32 (reference)", "uniform": "Uniform",
              "admm_only": f"ADMM only (uniform + ADMM), ADMM weight {WEIGHT}"}
    for variant, label in labels.items():
        rs = by_variant[variant]
        want = [expected_cell([r[m] for r in rs]) for m in ("clean", "shift_mean", "corruption_mean")]
        if variant == "admm_only":
            want.append(expected_cell([r["admm_strength"]["ratio"] for r in rs], ratio=True))
        else:
            want.append("–")
        assert table2[label] == want, label
    # The headline is the re-estimated accuracy; the running-statistics one is kept next to it.
    assert all(r["bn_statistics"] == "reestimated" for r in results.values())
    assert all(0 <= r["clean_running_stats"] <= 1 for r in results.values())
    best = table2["best of all"]
    clean_means = {v: statistics.mean(r["clean"] for r in by_variant[v]) for v in ("uniform", "admm_only")}
    winner = max(clean_means, key=clean_means.get)
    assert best[0] == f"{100 * clean_means[winner]:.2f} ({labels[winner]})"

    table1 = table_rows(reference / "table1.md")
    assert set(table1) == {"FP32 (reference)", "Uniform"}  # ADMM only is a Table 2 row
    assert table1["Uniform"] == table2["Uniform"][:3]
    text = (reference / "table2.md").read_text()
    assert "last epoch of training (no model selection on test data)" in text
    assert "re-estimated with the final weights over 2 training batches" in text

    corruptions = table_rows(reference / "corruptions.md")
    rs = by_variant["uniform"]
    values = [r["per_corruption"]["gaussian_noise"] for r in rs]
    assert corruptions["Uniform"][:3] == ["2", "2", f"{100 * statistics.mean(values):.2f} ± "
                                                    f"{100 * statistics.stdev(values):.2f}"]
    # One corruption at one severity: its per-corruption mean is that set's accuracy.
    assert all(r["per_corruption"]["gaussian_noise"] == r["accuracy"]["gaussian_noise_1"] for r in rs)

    with open(reference / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(CELLS)
    for row in rows:
        r = next(r for r in results.values() if r["variant"] == row["variant"] and r["seed"] == int(row["seed"]))
        for key in ("clean", "shift_mean", "corruption_mean", "clean_running_stats", "shift_mean_running_stats",
                    "corruption_mean_running_stats", "best_epoch_test_accuracy"):
            assert float(row[key]) == r[key], key
        for name in ("brightness+0.2", "contrast x0.5", "blend 0.3"):
            assert float(row[f"acc:{name}"]) == r["accuracy"][name]
            assert float(row[f"acc_running_stats:{name}"]) == r["accuracy_running_stats"][name]
        assert r["shift_mean"] == pytest.approx(np.mean([r["accuracy"][k] for k in
                                                         ("brightness+0.2", "contrast x0.5", "blend 0.3")]))
        if r["variant"] == "admm_only":
            assert float(row["admm_grad_ratio"]) == r["admm_strength"]["ratio"]
        else:
            assert row["admm_grad_ratio"] == ""

    payload = json.loads((reference / "results.json").read_text())
    assert payload["cells_finished"] == payload["cells_total"] == len(CELLS)
    summary = {(e["variant"], e["admm_weight"]): e for e in payload["summary"]}
    rs = by_variant["admm_only"]
    entry = summary[("admm_only", float(WEIGHT))]
    assert entry["clean"]["n"] == 2 and entry["seeds"] == [0, 1]
    assert entry["clean"]["mean"] == pytest.approx(statistics.mean(r["clean"] for r in rs), abs=1e-12)
    assert entry["clean"]["std"] == pytest.approx(statistics.stdev(r["clean"] for r in rs), abs=1e-12)
    assert (reference / "ablation.png").stat().st_size > 5000


@pytest.mark.slow
def test_admm_only_really_trains_with_the_term(reference):
    from alignq_jax.training import load_variables

    uniform = load_variables(reference / "seed0/uniform-w2a2")["params"]
    admm = load_variables(reference / f"seed0/admm_only-w2a2-admm{WEIGHT}")["params"]
    fp = load_variables(reference / "seed0/fp32")["params"]
    # Same seed, data order and start (the seed's FP32 model): only the ADMM term differs between the two runs.
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                         uniform, admm))
    assert max(diffs) > 1e-5
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                         admm["conv1"]["kernel"], fp["conv1"]["kernel"]))
    assert max(moved) > 1e-4
    admm_log = [json.loads(line) for line in (reference / f"seed0/admm_only-w2a2-admm{WEIGHT}/metrics.jsonl")
                .read_text().splitlines()]
    uniform_log = [json.loads(line) for line in (reference / "seed0/uniform-w2a2/metrics.jsonl")
                   .read_text().splitlines()]
    assert all(r["train_penalty"] > 0 for r in admm_log) and all(r["train_penalty"] == 0 for r in uniform_log)
    config = json.loads((reference / f"seed0/admm_only-w2a2-admm{WEIGHT}/config.json").read_text())
    assert config["admm"] is True and config["admm_weight"] == float(WEIGHT) and config["quant"]["method"] == "uniform"
    strength = cell_results(reference)[f"seed0/admm_only-w2a2-admm{WEIGHT}"]["admm_strength"]
    assert strength["ratio"] > 0 and strength["batches"] == 2


@pytest.mark.slow
def test_resume_of_a_finished_ablation_trains_nothing(reference, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(ablation, "fit", lambda *a, **k: calls.append(k) or pytest.fail("fit was called"))
    mtimes = {c: (reference / c / "result.json").stat().st_mtime_ns for c in CELLS}
    before = cell_results(reference)
    assert run_main(["--resume", "--workdir", reference, "--no-progress"]) == 0
    assert calls == []
    assert {c: (reference / c / "result.json").stat().st_mtime_ns for c in CELLS} == mtimes
    assert cell_results(reference) == before
    out = capsys.readouterr().out
    assert "cell 5/6: uniform w2a2 seed 1: finished" in out
    # Without --resume a used workdir is refused before anything runs.
    assert run_main([*SMALL, "--workdir", reference]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
def test_interrupted_ablation_resumes_to_the_same_numbers(reference, tmp_path, monkeypatch, capsys):
    real_fit = ablation.fit
    workdir = tmp_path / "run"
    calls = []

    def interrupt_at(call: int, mid_cell: bool):
        def fit(config, dataset, **kwargs):
            calls.append((Path(kwargs["workdir"]).relative_to(workdir).as_posix(), kwargs["resume"]))
            if len(calls) == call:
                if mid_cell:  # one of two epochs done and checkpointed, then Ctrl-C
                    real_fit(config, dataset, **{**kwargs, "stop_after_epochs": 1})
                raise KeyboardInterrupt
            return real_fit(config, dataset, **kwargs)
        calls.clear()
        monkeypatch.setattr(ablation, "fit", fit)

    # Ctrl-C as seed 0's uniform cell starts, then (resumed) half way through seed 0's admm_only cell.
    interrupt_at(2, mid_cell=False)
    assert run_main([*SMALL, "--workdir", workdir]) == 130
    assert "--resume --workdir" in capsys.readouterr().err
    assert calls == [("seed0/fp32", False), ("seed0/uniform-w2a2", False)]
    interrupt_at(2, mid_cell=True)
    assert run_main(["--resume", "--workdir", workdir, "--no-progress"]) == 130
    admm_cell = f"seed0/admm_only-w2a2-admm{WEIGHT}"
    assert calls == [("seed0/uniform-w2a2", False), (admm_cell, False)]
    assert not (workdir / admm_cell / "result.json").exists()
    assert (workdir / admm_cell / "checkpoints" / "1").is_dir()
    interrupt_at(0, mid_cell=False)
    assert run_main(["--resume", "--workdir", workdir, "--no-progress"]) == 0
    assert calls == [(admm_cell, True), ("seed1/fp32", False), ("seed1/uniform-w2a2", False),
                     (f"seed1/admm_only-w2a2-admm{WEIGHT}", False)]
    assert "cell 3/6: admm_only w2a2 admm weight 100 seed 0 (resuming from its checkpoint)" in capsys.readouterr().out

    got, want = cell_results(workdir), cell_results(reference)
    for cell in CELLS:
        for key in ("accuracy", "accuracy_running_stats", "clean", "shift_mean", "corruption_mean",
                    "last_epoch_test_accuracy", "best_epoch", "epochs"):
            assert got[cell][key] == want[cell][key], (cell, key)
        assert [h["train_loss"] for h in got[cell]["history"]] == pytest.approx(
            [h["train_loss"] for h in want[cell]["history"]], rel=1e-6)
    assert got[admm_cell]["admm_strength"]["ratio"] == pytest.approx(want[admm_cell]["admm_strength"]["ratio"],
                                                                    rel=1e-5)
    assert table_rows(workdir / "table2.md") == table_rows(reference / "table2.md")


# ---------------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize("flags, message", [
    (["--methods", "uniform", "nope"], "--methods: unknown 'nope'"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--admm-weight", "0"], "--admm-weight must be positive values"),
    (["--methods", "uniform", "--admm-weight", "10"], "--admm-weight: only used by admm_only and cdf_admm"),
    (["--corruptions", "fog_machine"], "--corruptions: unknown corruption 'fog_machine'"),
    (["--severities", "6"], "--severities: severity must be one of [1, 2, 3, 4, 5]"),
    (["--no-corruptions", "--severities", "1"], "--severities: set the corruption test sets, which --no-corruptions"),
    (["--bits", "2", "2"], "--bits must be distinct bit-widths"),
    (["--bits", "1", "--methods", "apot"], "no quantized cell left"),
    (["--bn-reestimate-batches", "-1"], "--bn-reestimate-batches must be 0 (off) or more"),
    (["--milestones", "1.5"], "--milestones must be fractions"),
    (["--batch-size", "12", "--devices", "8"], "--batch-size 12 must be divisible by the number of devices (8"),
])
def test_bad_flags_exit_2_naming_the_flag_before_anything_runs(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(ablation, "fit", lambda *a, **k: pytest.fail("fit was called"))
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_main(["--dataset", "digits", "--workdir", workdir, "--methods", "uniform", "admm_only", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not workdir.exists()


def test_a_new_ablation_needs_a_dataset(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(["--workdir", tmp_path / "run"])
    assert exit_info.value.code == 2
    assert "--dataset is required" in capsys.readouterr().err


def test_bits_a_method_does_not_define_are_skipped_with_a_note():
    args = ablation.build_parser().parse_args(
        ["--dataset", "digits", "--bits", "2", "8", "--methods", "apot", "uniform", "--seeds", "2"])
    ablation.resolve_defaults(args)
    cells, skipped = ablation.plan_cells(args)
    assert [(s["variant"], s["bits"]) for s in skipped] == [("apot", 8)]
    assert "2..6" in skipped[0]["reason"]
    assert [c.folder for c in cells] == [
        "seed0/fp32", "seed0/apot-w2a2", "seed0/uniform-w2a2", "seed0/uniform-w8a8",
        "seed1/fp32", "seed1/apot-w2a2", "seed1/uniform-w2a2", "seed1/uniform-w8a8"]
    table = ablation.table_markdown(args, ablation.TABLE1_ORDER, [], skipped, best_row=False, with_ratio=False,
                                    has_corruptions=False)
    assert table_like(table)[ablation.VARIANTS["apot"].label] == [
        "not run yet", "not run yet", "n/a (bits not defined)", "n/a (bits not defined)"]
    notes = ablation.notes(args, [], skipped, None, "cmd", 8)
    assert "n/a: apot at 8 bits is not defined" in notes
    # APoT's clips start at the MSE optimum, and the notes say so (uniform has no clip to start).
    assert "APoT: learned clips start at the clip that minimises the quantization MSE" in notes
    method = ablation.cell_config(args, cells[1]).quant.method
    assert (method.name, method.weight_alpha_init, method.activation_alpha_init) == ("apot", "mse", "mse")
    assert ablation.cell_config(args, cells[2]).quant.method == "uniform"


def table_like(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


# ------------------------------------------------------------------------------------------- ADMM strength


def _admm_setup(batch=8):
    model = get_model("small_cnn", config=QuantConfig(2, 2, method="uniform", correlation=True), num_classes=10)
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.key(1), (batch, 8, 8, 1))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    variables = model.init({"params": key, CORRELATION_RNG: key}, x, train=True)
    gaps = model.apply(variables, x, train=True, mutable=["batch_stats", GAP_COLLECTION],
                       rngs={CORRELATION_RNG: key})[1][GAP_COLLECTION]
    leaves, treedef = jax.tree.flatten(gaps)
    keys = iter(jax.random.split(jax.random.key(3), 2 * len(leaves)))
    # A state away from zero, as after some ADMM updates, so both the linear and the quadratic terms count.
    z = jax.tree.unflatten(treedef, [0.1 * jax.random.normal(next(keys), g.shape) for g in leaves])
    gamma = jax.tree.unflatten(treedef, [0.1 * jax.random.normal(next(keys), g.shape) for g in leaves])
    return model, {"params": variables["params"], "batch_stats": variables["batch_stats"]}, ADMMState(z, gamma), x, y


def test_admm_strength_equals_direct_gradients():
    model, variables, state, x, y = _admm_setup()
    admm, weight, key = ADMM("textbook"), 3.0, jax.random.key(4)
    out = ablation.admm_gradient_norms(model, variables, state, x, y, admm=admm, admm_weight=weight, key=key)

    def loss_terms(params):
        logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                      mutable=["batch_stats", GAP_COLLECTION], rngs={CORRELATION_RNG: key})
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce, admm.penalty(updates[GAP_COLLECTION], state)

    g_ce = jax.grad(lambda p: loss_terms(p)[0])(variables["params"])
    g_pen = jax.grad(lambda p: weight * loss_terms(p)[1])(variables["params"])
    g_loss = jax.grad(lambda p: loss_terms(p)[0] + weight * loss_terms(p)[1])(variables["params"])

    def norm(tree):
        return float(np.sqrt(sum(np.sum(np.asarray(leaf, np.float64) ** 2) for leaf in jax.tree.leaves(tree))))

    ce, penalty = loss_terms(variables["params"])
    assert float(out["cross_entropy"]) == pytest.approx(float(ce), rel=1e-6)
    assert float(out["penalty"]) == pytest.approx(float(penalty), rel=1e-6)
    assert float(out["ce_grad_norm"]) == pytest.approx(norm(g_ce), rel=1e-5)
    assert float(out["penalty_grad_norm"]) == pytest.approx(norm(g_pen), rel=1e-5)
    assert float(out["ratio"]) == pytest.approx(norm(g_pen) / norm(g_ce), rel=1e-5)
    assert norm(g_pen) > 1e-3 * norm(g_ce)  # a real comparison, not 0 / x
    # The two terms add up to the training loss's gradient.
    both = jax.tree.map(lambda a, b: a + b, g_ce, g_pen)
    assert norm(jax.tree.map(lambda a, b: a - b, both, g_loss)) < 1e-5 * norm(g_loss)


def test_admm_strength_with_per_device_states_splits_the_batch_like_training():
    model, variables, state, x, y = _admm_setup()
    admm, key = ADMM("textbook"), jax.random.key(4)
    one = ablation.admm_gradient_norms(model, variables, state, x, y, admm=admm, admm_weight=2.0, key=key)
    # Two devices holding the same batch and the same state: BatchNorm statistics synchronised over them equal one
    # device's, each device's gap equals the single one, so every number must be the one-device value.
    synced = get_model("small_cnn", config=QuantConfig(2, 2, method="uniform", correlation=True), num_classes=10,
                       bn_axis_name="data")
    two = jax.tree.map(lambda a: jnp.stack([a, a]), state)
    out = ablation.admm_gradient_norms(synced, variables, two, jnp.concatenate([x, x]), jnp.concatenate([y, y]),
                                       admm=admm, admm_weight=2.0, key=key, axis_name="data")
    for k in one:
        assert float(out[k]) == pytest.approx(float(one[k]), rel=1e-5), k
    with pytest.raises(ValueError, match="axis_name"):
        ablation.admm_gradient_norms(model, variables, two, jnp.concatenate([x, x]), jnp.concatenate([y, y]),
                                     admm=admm, admm_weight=2.0, key=key)


@pytest.mark.slow
def test_zeroq_quantizes_the_fp32_model_without_training(tmp_path, monkeypatch):
    real_fit = ablation.fit
    trained = []
    monkeypatch.setattr(ablation, "fit", lambda config, dataset, **k: trained.append(config) or real_fit(
        config, dataset, **k))
    workdir = tmp_path / "run"
    argv = ["--dataset", "digits", "--model", "small_cnn", "--bits", "8", "--seeds", "1", "--methods", "zeroq",
            "--fp-epochs", "3", "--batch-size", "32", "--limit-train", "256", "--limit-test", "90", "--devices", "1",
            "--no-corruptions", "--zeroq-images", "8", "--zeroq-steps", "20", "--bn-reestimate-batches", "2",
            "--no-progress", "--workdir", workdir]
    assert run_main(argv) == 0
    assert [c.quant.w_bits for c in trained] == [32]  # only the FP32 model trains
    fp = json.loads((workdir / "seed0/fp32/result.json").read_text())
    zq = json.loads((workdir / "seed0/zeroq-w8a8/result.json").read_text())
    assert zq["epochs"] == 0 and zq["history"] == [] and zq["bn_statistics"].startswith("running")
    assert zq["accuracy"] == zq["accuracy_running_stats"]  # no training data: nothing is re-estimated
    # 8-bit per-channel grids on the FP32 weights and statistics: the FP32 model's accuracy, give or take a few
    # images (with training-time statistics, the ones ZeroQ keeps).
    assert abs(zq["clean"] - fp["clean_running_stats"]) <= 0.05
    assert "ZeroQ keeps the FP32 model's statistics" in (workdir / "table1.md").read_text()
    assert table_rows(workdir / "table1.md")["ZeroQ (post-training, no data)"][0].endswith("(n=1)")


@pytest.mark.slow
def test_a_diverged_cell_is_recorded_and_a_diverged_fp32_model_stops(tmp_path, monkeypatch, capsys):
    real_fit = ablation.fit

    def fit(config, dataset, **kwargs):
        if config.admm or diverge_fp:
            raise FloatingPointError("loss became nan at epoch 1, step 3")
        return real_fit(config, dataset, **kwargs)

    monkeypatch.setattr(ablation, "fit", fit)
    small = [*BASE, "--seeds", "1", "--epochs", "1", "--no-corruptions"]
    diverge_fp = False
    assert run_main([*small, "--workdir", tmp_path / "a"]) == 0
    record = json.loads((tmp_path / "a" / f"seed0/admm_only-w2a2-admm{WEIGHT}/result.json").read_text())
    assert record["status"] == "diverged" and "nan" in record["error"] and "clean" not in record
    row = table_rows(tmp_path / "a" / "table2.md")[f"ADMM only (uniform + ADMM), ADMM weight {WEIGHT}"]
    assert row[0] == "– [1 diverged]"
    with open(tmp_path / "a" / "results.csv", newline="") as f:
        statuses = {r["variant"]: r["status"] for r in csv.DictReader(f)}
    assert statuses == {"fp32": "done", "uniform": "done", "admm_only": "diverged"}

    diverge_fp = True
    capsys.readouterr()
    assert run_main([*small, "--workdir", tmp_path / "b"]) == 1
    assert "the FP32 model of seed 0 diverged" in capsys.readouterr().err
