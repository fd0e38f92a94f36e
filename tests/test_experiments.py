"""End-to-end: the experiment scripts on generated local files, mocked TFDS data, missing data, the digits demo,
and the README's usage example."""

import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _write_fake_cifar(folder: Path, n_per_batch=8, n_test=12, seed=0):
    rng = np.random.default_rng(seed)
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n_per_batch)]}
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test = {b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n_test)]}
    (d / "test_batch").write_bytes(pickle.dumps(test))
    return folder


def _cifar_main(argv):
    from alignq_jax.cli.classification import main

    return main(argv, dataset="cifar10")


COMMON = ["--fp-epochs", "1", "--epochs", "1", "--batch-size", "8", "--eval-batch-size", "8", "--limit-train", "16",
          "--no-progress"]


@pytest.mark.slow
def test_cifar10_script_on_local_files_two_steps_then_resume(tmp_path):
    data_dir = _write_fake_cifar(tmp_path / "data")
    workdir = tmp_path / "run"
    argv = ["--bits", "4", "--data-dir", str(data_dir), "--workdir", str(workdir), "--devices", "1",
            "--model", "small_cnn", *COMMON]
    assert _cifar_main(argv) == 0
    results = json.loads((workdir / "results.json").read_text())
    assert [s["stage"] for s in results["stages"]] == ["fp32", "w4a4"]
    quant = results["stages"][1]
    assert quant["admm"] is True and quant["method"] == "alignq" and quant["levels"] == "exact"
    assert 0.0 <= quant["last_epoch_test_accuracy"] <= 1.0
    steps = (workdir / "w4a4" / "steps.jsonl").read_text().splitlines()
    assert len(steps) == 2  # 16 images / batch 8
    assert all(np.isfinite(json.loads(line)["loss"]) for line in steps)
    table = (workdir / "results.md").read_text()
    assert "best epoch" in table and "last epoch" in table
    assert (workdir / "accuracy.png").stat().st_size > 1000
    # The quantized stage started from the FP32 stage's weights.
    cfg = json.loads((workdir / "w4a4" / "config.json").read_text())
    assert cfg["quant"]["w_bits"] == 4 and cfg["admm"] is True
    assert cfg["quant"]["correlation_features"] == 1024  # the CLI default: sampled correlation

    # --resume with both stages done trains nothing and reproduces the results.
    mtime = (workdir / "w4a4" / "metrics.jsonl").stat().st_mtime
    assert _cifar_main(argv + ["--resume"]) == 0
    assert (workdir / "w4a4" / "metrics.jsonl").stat().st_mtime == mtime

    # The same command again is refused (it would retrain and overwrite); --overwrite starts clean.
    assert _cifar_main(argv) == 2
    assert (workdir / "w4a4" / "metrics.jsonl").stat().st_mtime == mtime
    assert _cifar_main(argv + ["--overwrite"]) == 0
    assert len((workdir / "w4a4" / "steps.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (workdir / "w4a4" / "checkpoints").iterdir()) == ["1"]

    # --init-from the finished run (its last stage), the uniform baseline with paper ADMM and levels, progressive
    # chain 8 -> 4; the ADMM state goes down the chain.
    from alignq_jax.cli import classification
    from alignq_jax.training import fit as real_fit

    calls = []

    def recording_fit(config, dataset, **kwargs):
        result = real_fit(config, dataset, **kwargs)
        calls.append((kwargs["init_variables"], result))
        return result

    workdir2 = tmp_path / "run2"
    argv2 = ["--bits", "4", "--data-dir", str(data_dir), "--workdir", str(workdir2), "--init-from", str(workdir),
             "--progressive", "--method", "uniform", "--admm", "--admm-mode", "paper", "--levels", "paper",
             "--model", "small_cnn", "--devices", "1", "--epochs", "1", "--batch-size", "8", "--eval-batch-size",
             "8", "--limit-train", "16", "--no-progress"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(classification, "fit", recording_fit)
        assert _cifar_main(argv2) == 0
    stages = json.loads((workdir2 / "results.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["w8a8", "w4a4"]
    assert all(s["method"] == "uniform" and s["admm_mode"] == "paper" for s in stages)
    (init8, result8), (init4, _) = calls
    assert "admm_state" not in init8  # from a textbook-ADMM model: paper mode starts its own state
    import jax

    carried = jax.tree.leaves(init4["admm_state"])
    final8 = jax.tree.leaves(result8.state.admm_state)
    assert len(carried) == len(final8) > 0
    assert all(np.array_equal(a, b) for a, b in zip(carried, final8))
    assert stages[1]["admm_state"].startswith("carried over")


@pytest.mark.slow
def test_cifar10_script_data_parallel_shard_map(tmp_path):
    data_dir = _write_fake_cifar(tmp_path / "data", n_per_batch=16)
    workdir = tmp_path / "run"
    argv = ["--bits", "2", "--data-dir", str(data_dir), "--workdir", str(workdir), "--model", "small_cnn",
            "--devices", "8", "--fp-epochs", "1", "--epochs", "1", "--batch-size", "16", "--eval-batch-size", "8",
            "--limit-train", "32", "--no-progress"]
    assert _cifar_main(argv) == 0
    stages = json.loads((workdir / "results.json").read_text())["stages"]
    assert len(stages) == 2 and all(np.isfinite(s["last_epoch_test_accuracy"]) for s in stages)


def _write_tfds_metadata(name, data_dir, n):
    """Makes TFDS see `name` as prepared under data_dir (metadata only; mock_data supplies the records)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record")
    splits = [tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0) for s in ("train", "test")]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    Path(builder.data_dir).mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)


@pytest.mark.slow
def test_cifar10_script_on_mock_tfds(tmp_path):
    import tensorflow_datasets as tfds

    _write_tfds_metadata("cifar10", tmp_path / "tfds", 16)
    workdir = tmp_path / "run"
    # The default model (ResNet-20) end to end on the real TFDS code path.
    argv = ["--bits", "4", "--data-dir", str(tmp_path / "tfds"), "--workdir", str(workdir), "--devices", "1", *COMMON]
    with tfds.testing.mock_data(num_examples=16, data_dir=str(tmp_path / "tfds")):
        assert _cifar_main(argv) == 0
    stages = json.loads((workdir / "results.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["fp32", "w4a4"]
    assert len((workdir / "w4a4" / "steps.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_default_cli_on_8_devices(tmp_path):
    """`experiments/cifar10.py --bits 4` with every default that matters here (ResNet-20, batches 128/100, all 8
    simulated devices, shard_map, ADMM), on tiny local data: 2 training steps and one evaluation batch of 100."""
    import jax

    assert jax.device_count() == 8
    data_dir = _write_fake_cifar(tmp_path / "data", n_per_batch=52, n_test=100)
    workdir = tmp_path / "run"
    argv = ["--bits", "4", "--data-dir", str(data_dir), "--workdir", str(workdir), "--limit-train", "256",
            "--fp-epochs", "1", "--epochs", "1", "--no-progress"]
    assert _cifar_main(argv) == 0
    results = json.loads((workdir / "results.json").read_text())
    assert [s["stage"] for s in results["stages"]] == ["fp32", "w4a4"]
    assert results["settings"]["batch_size"] == 128 and results["settings"]["eval_batch_size"] == 100
    assert len((workdir / "w4a4" / "steps.jsonl").read_text().splitlines()) == 2
    for stage in ("fp32", "w4a4"):
        (record,) = [json.loads(line) for line in (workdir / stage / "metrics.jsonl").read_text().splitlines()]
        assert record["epoch"] == 1
        # 100 test images: the accuracy is a multiple of 1/100 (no padded row counted, none dropped).
        assert abs(record["test_accuracy"] * 100 - round(record["test_accuracy"] * 100)) < 1e-6


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    """Ctrl-C during the quantized stage (after its first epoch), then --resume: the same metrics as a run that
    was never interrupted, and every step logged once."""
    from alignq_jax.cli import classification
    from alignq_jax.training import fit as real_fit

    data_dir = _write_fake_cifar(tmp_path / "data")
    base = ["--bits", "2", "--data-dir", str(data_dir), "--model", "small_cnn", "--devices", "1", "--fp-epochs", "1",
            "--epochs", "3", "--batch-size", "8", "--eval-batch-size", "8", "--limit-train", "16", "--no-progress"]
    assert _cifar_main(base + ["--workdir", str(tmp_path / "straight")]) == 0

    def fit_then_ctrl_c(config, dataset, **kwargs):
        if config.quant.w_bits == 32:
            return real_fit(config, dataset, **kwargs)
        real_fit(config, dataset, stop_after_epochs=1, **kwargs)
        raise KeyboardInterrupt

    workdir = tmp_path / "interrupted"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(classification, "fit", fit_then_ctrl_c)
        assert _cifar_main(base + ["--workdir", str(workdir)]) == 130
    # Half a step of epoch 2 logged before the interruption must not survive the resume.
    with open(workdir / "w2a2" / "steps.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "step": 3, "loss": 1.0}) + "\n")
    assert _cifar_main(["--resume", "--workdir", str(workdir)]) == 0

    def metrics(run):
        return [json.loads(line) for line in (tmp_path / run / "w2a2" / "metrics.jsonl").read_text().splitlines()]

    straight, resumed = metrics("straight"), metrics("interrupted")
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        assert a["test_accuracy"] == b["test_accuracy"]
        np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=1e-5)
        np.testing.assert_allclose(b["test_loss"], a["test_loss"], rtol=1e-5)
    steps = [json.loads(line)["step"] for line in (workdir / "w2a2" / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


@pytest.mark.slow
def test_ctrl_c_in_a_real_process_prints_the_resume_command(tmp_path):
    """SIGINT to the script while it trains: exit 130, the resume command, no traceback, and the last
    checkpoint is intact (an interrupt never lands half way through a checkpoint write)."""
    import signal

    data_dir = _write_fake_cifar(tmp_path / "data")
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "experiments" / "cifar10.py"), "--bits", "4", "--data-dir", str(data_dir),
         "--workdir", str(workdir), "--model", "small_cnn", "--devices", "1", "--fp-epochs", "100000", "--epochs",
         "1", "--batch-size", "8", "--eval-batch-size", "8", "--limit-train", "16", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "XLA_FLAGS": ""},
    )
    try:
        for _ in range(3000):  # wait until the FP32 stage has finished an epoch or two
            if (workdir / "fp32" / "metrics.jsonl").exists() and proc.poll() is None:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert f"--resume --workdir {workdir}" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    from alignq_jax.training import load_variables

    assert "params" in load_variables(workdir / "fp32")


def test_missing_data_fails_fast_with_instructions(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "cifar10.py"), "--bits", "4", "--data-dir", str(tmp_path),
         "--workdir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 1  # a runtime error, not a usage error
    assert "usage:" not in proc.stderr
    assert "download_and_prepare" in proc.stderr and "--data-dir" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 60  # not TFDS's ~200 s of download retries


def test_cli_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit):
        _cifar_main(["--bits", "9"])
    with pytest.raises(SystemExit):
        _cifar_main(["--bits", "4", "--epochs", "0", "--data-dir", "nowhere"])
    assert "--epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cifar_main(["--bits", "4", "--correlation-features", "1", "--data-dir", "nowhere"])
    assert "--correlation-features" in capsys.readouterr().err


@pytest.mark.slow
def test_digits_demo_tiny_settings(tmp_path):
    from alignq_jax.cli.digits_demo import main

    workdir = tmp_path / "digits"
    assert main(["--bits", "4", "--fp-epochs", "4", "--epochs", "2", "--seeds", "1", "--workdir", str(workdir),
                 "--no-progress"]) == 0
    results = json.loads((workdir / "results.json").read_text())
    summary = results["summary"]
    assert set(summary) == {"fp32", "uniform", "alignq", "alignq+admm"}
    for variant, entry in summary.items():
        assert entry["clean"][0] > 0.5, variant  # chance is 0.1
        assert set(entry) >= {"clean", "brightness+0.2", "contrast x0.5", "blend 0.3"}
    assert (workdir / "accuracy.png").stat().st_size > 1000
    assert (workdir / "history_seed0.png").stat().st_size > 1000
    assert "±" in (workdir / "results.md").read_text()
    assert results["levels"]["alignq+admm"] == {"weight_levels": 16, "activation_levels": 16}
    assert "16 / 16" in (workdir / "results.md").read_text()


def test_readme_usage_example_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    for i, block in enumerate(blocks):
        namespace = {}
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        assert namespace.get("checked") is True, i  # each example ends with checked = True after its asserts


def test_digits_demo_runs_any_registered_method(tmp_path, capsys):
    """--methods takes the baselines too: each variant is trained from the FP32 model with its own method, and its
    measured level counts are its grid's (DoReFa at 4 bits: 16 weight and 16 activation values)."""
    from alignq_jax.cli.digits_demo import main

    workdir = tmp_path / "digits"
    assert main(["--bits", "4", "--fp-epochs", "1", "--epochs", "1", "--seeds", "1", "--limit-train", "256",
                 "--methods", "dorefa", "uniform+admm", "--workdir", str(workdir), "--no-progress"]) == 0
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["summary"]) == {"fp32", "dorefa", "uniform+admm"}
    assert results["levels"]["dorefa"] == {"weight_levels": 16, "activation_levels": 16}
    for run in results["runs"]:  # headline with re-estimated BN statistics, the running ones kept beside it
        assert run["bn_statistics"] == "reestimated"
        assert set(run["last_epoch_running_stats"]) == set(run["last_epoch"])
    for bad in (["--methods", "dorefa+admm"], ["--methods", "apot", "--bits", "8"], ["--methods", "dorefa", "dorefa"]):
        with pytest.raises(SystemExit) as e:
            main([*bad, "--workdir", str(tmp_path / "bad")])
        assert e.value.code == 2
    assert not (tmp_path / "bad").exists()
