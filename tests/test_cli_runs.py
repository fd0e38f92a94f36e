"""The classification CLI's run handling with a stand-in for ``fit`` (fast): workdir reuse, --overwrite, --resume
with saved settings, the lock, Ctrl-C, validation before training, exit codes, --init-from, ADMM defaults and the
ADMM state down the progressive chain, --dtype, results in %, level counts, plots, and --download offline.

End-to-end runs with the real training loop are in test_experiments.py."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from alignq_jax.admm import ADMMState
from alignq_jax.cli import classification as cli
from alignq_jax.cli import digits_demo, report
from alignq_jax.training.loop import FitResult

sys.path.insert(0, str(Path(__file__).parent))
from test_experiments import _write_fake_cifar  # noqa: E402

SMALL = ["--model", "small_cnn", "--devices", "1", "--fp-epochs", "1", "--epochs", "2", "--batch-size", "8",
         "--eval-batch-size", "8", "--limit-train", "16", "--no-progress"]


class FakeFit:
    """Stands in for ``fit``: records its arguments, returns made-up histories (accuracy rising 0.5 -> 0.9123; with
    BatchNorm re-estimation on, the last record's headline is 0.9321 and 0.9123 its running-statistics accuracy), a
    final ADMM state whose entries say which call made it, and marks a checkpoint folder like the real one."""

    def __init__(self, fail_at_call=None, exc=None):
        self.calls = []
        self.fail_at_call, self.exc = fail_at_call, exc

    def __call__(self, config, dataset, *, workdir, init_variables=None, resume=False, progress=True, log=None):
        self.calls.append(dict(config=config, workdir=Path(workdir), init=init_variables, resume=resume,
                               progress=progress, log=log))
        if self.fail_at_call == len(self.calls):
            raise self.exc
        (Path(workdir) / "checkpoints" / str(config.epochs)).mkdir(parents=True, exist_ok=True)
        e = config.epochs
        history = [{"epoch": i, "test_accuracy": 0.5 + (0.91234 - 0.5) * i / e, "test_loss": 1.0}
                   for i in range(1, e + 1)]
        admm_state = None
        if config.admm:
            b = config.batch_size
            mark = float(len(self.calls))
            admm_state = ADMMState(z={"q": {"gap": np.full((b, b), mark, np.float32)}},
                                   gamma={"q": {"gap": np.full((b, b), -mark, np.float32)}})
        state = types.SimpleNamespace(params={"w": len(self.calls)}, batch_stats={}, admm_state=admm_state)
        last = {**history[-1], "bn_statistics": "running"}
        if config.bn_reestimate_batches:
            last = {**last, "test_accuracy": 0.93214, "test_accuracy_running_stats": history[-1]["test_accuracy"],
                    "bn_statistics": "reestimated", "bn_reestimate_batches": 2}
        return FitResult(history, last, max(history, key=lambda r: r["test_accuracy"]), state, config)


@pytest.fixture
def data_dir(tmp_path):
    return _write_fake_cifar(tmp_path / "data")


@pytest.fixture
def fake_fit(monkeypatch):
    fake = FakeFit()
    monkeypatch.setattr(cli, "fit", fake)
    return fake


def run_cli(argv):
    return cli.main([str(a) for a in argv], dataset="cifar10")


def test_default_workdir_names_what_distinguishes_runs():
    parser = cli.build_parser("cifar10", "")

    def name(*flags):
        args = parser.parse_args(list(flags))
        cli.resolve_defaults(args)
        return str(cli.default_workdir(args))

    assert name("--bits", "4") == "runs/cifar10-resnet20-alignq-w4-exact-admm"
    variants = [name("--bits", "4", *f) for f in
                ([], ["--no-admm"], ["--admm-mode", "paper"], ["--levels", "paper"], ["--method", "uniform"],
                 ["--model", "resnet56"], ["--progressive"], ["--dtype", "bfloat16"])]
    variants.append(name("--bits", "2"))
    assert len(set(variants)) == len(variants), variants
    assert name("--method", "uniform").endswith("uniform-w4-exact-noadmm")


def test_rerun_is_refused_and_overwrite_starts_clean(tmp_path, data_dir, fake_fit, capsys):
    workdir = tmp_path / "run"
    argv = ["--bits", "4", "--data-dir", data_dir, "--workdir", workdir, *SMALL]
    assert run_cli(argv) == 0
    before = (workdir / "results.json").read_text()
    capsys.readouterr()

    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and "usage:" not in err and "Traceback" not in err
    assert (workdir / "results.json").read_text() == before and len(fake_fit.calls) == 2

    stale = workdir / "w4a4" / "checkpoints" / "99"
    stale.mkdir(parents=True)
    assert run_cli(argv + ["--overwrite"]) == 0
    assert not stale.exists()  # the old run's checkpoints are gone, not mixed with the new run's
    assert sorted(p.name for p in (workdir / "w4a4" / "checkpoints").iterdir()) == ["2"]


def test_overwrite_only_deletes_run_folders(tmp_path, data_dir, fake_fit, capsys):
    workdir = tmp_path / "mine"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("precious")
    assert run_cli(["--data-dir", data_dir, "--workdir", workdir, "--overwrite", *SMALL]) == 2
    assert (workdir / "notes.txt").read_text() == "precious"
    assert "does not look like a run folder" in capsys.readouterr().err
    assert not fake_fit.calls


def test_resume_takes_saved_settings_and_refuses_contradicting_flags(tmp_path, data_dir, monkeypatch, capsys):
    workdir = tmp_path / "run"
    interrupted = FakeFit(fail_at_call=2, exc=KeyboardInterrupt())
    monkeypatch.setattr(cli, "fit", interrupted)
    argv = ["--bits", "3", "--lr", "0.02", "--seed", "5", "--data-dir", data_dir, "--workdir", workdir, *SMALL]
    assert run_cli(argv) == 130
    saved = json.loads((workdir / cli.SETTINGS_FILE).read_text())
    assert saved["settings"]["bits"] == 3 and saved["settings"]["epochs"] == 2 and saved["data_dir"] == str(data_dir)
    capsys.readouterr()

    # The FP32 stage finished; its checkpoint is a stand-in, so loading it is stubbed.
    monkeypatch.setattr(cli, "load_init", lambda path: {"params": {}, "batch_stats": {}, "admm_state": None,
                                                        "admm_mode": None})
    resumed = FakeFit()
    monkeypatch.setattr(cli, "fit", resumed)
    assert run_cli(["--resume", "--workdir", workdir, "--epochs", "5"]) == 2
    err = capsys.readouterr().err
    assert "--epochs: saved 2, given 5" in err and "usage:" not in err
    assert not resumed.calls

    # No flag but --resume --workdir: the saved settings (not the defaults: 4 bits, 200 epochs, lr 0.04).
    assert run_cli(["--resume", "--workdir", workdir, "--bits", "3"]) == 0
    (call,) = resumed.calls  # the finished FP32 stage is not trained again
    config = call["config"]
    assert (config.quant.w_bits, config.epochs, config.lr, config.seed, config.model) == (3, 2, 0.02, 5, "small_cnn")
    assert call["workdir"] == workdir / "w3a3"
    assert call["resume"] is False  # that stage had no checkpoint yet: it starts clean
    assert json.loads((workdir / cli.SETTINGS_FILE).read_text()) == saved


def test_resume_needs_an_existing_run(tmp_path, fake_fit, capsys):
    missing = tmp_path / "nothing"
    assert run_cli(["--resume", "--workdir", missing]) == 2
    assert "no run" in capsys.readouterr().err and not missing.exists()
    (tmp_path / "empty").mkdir()
    assert run_cli(["--resume", "--workdir", tmp_path / "empty"]) == 2
    assert cli.SETTINGS_FILE in capsys.readouterr().err
    assert not fake_fit.calls


def test_second_run_into_a_locked_workdir_fails_at_once(tmp_path, data_dir, fake_fit, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('locked', flush=True); time.sleep(60)",
         str(workdir / cli.LOCK_FILE)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_cli(["--data-dir", data_dir, "--workdir", workdir, *SMALL]) == 1
        err = capsys.readouterr().err
        assert "another run is using" in err and "4242" in err and "Traceback" not in err
        assert not fake_fit.calls and not (workdir / cli.SETTINGS_FILE).exists()
    finally:
        holder.kill()
        holder.wait()
    assert run_cli(["--data-dir", data_dir, "--workdir", workdir, *SMALL]) == 0  # free again


def test_ctrl_c_prints_the_resume_command(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setattr(cli, "fit", FakeFit(fail_at_call=1, exc=KeyboardInterrupt()))
    workdir = tmp_path / "run"
    assert run_cli(["--data-dir", data_dir, "--workdir", workdir, *SMALL]) == 130
    err = capsys.readouterr().err
    assert f"--resume --workdir {workdir}" in err and "Traceback" not in err and "KeyboardInterrupt" not in err

    def interrupted_load(*a, **k):
        raise KeyboardInterrupt

    import alignq_jax.data

    monkeypatch.setattr(alignq_jax.data, "load_dataset", interrupted_load)
    assert run_cli(["--data-dir", data_dir, "--workdir", tmp_path / "run2", *SMALL]) == 130
    assert "nothing to resume" in capsys.readouterr().err


def test_resume_command_repeats_how_the_script_was_started(tmp_path, monkeypatch):
    assert cli.resume_command(Path("runs/a b"), "experiments/cifar10.py", []) == \
        "python experiments/cifar10.py --resume --workdir 'runs/a b'"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "alignq-cifar10").write_text("#!/bin/sh\n")
    (bin_dir / "alignq-cifar10").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    assert cli.resume_command(Path("w"), str(bin_dir / "alignq-cifar10"), ["--no-progress"]) == \
        "alignq-cifar10 --resume --workdir w --no-progress"


def test_recorded_command_names_an_installed_script_as_typed(tmp_path, data_dir, fake_fit, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "alignq-cifar10").write_text("#!/bin/sh\n")
    (bin_dir / "alignq-cifar10").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(sys, "argv", [str(bin_dir / "alignq-cifar10")])
    workdir = tmp_path / "run"
    assert run_cli(["--data-dir", data_dir, "--workdir", workdir, *SMALL]) == 0
    command = json.loads((workdir / cli.SETTINGS_FILE).read_text())["command"]
    assert command.startswith("alignq-cifar10 --data-dir ") and "python" not in command


def test_interrupts_wait_while_a_checkpoint_is_written():
    import signal
    import time

    from alignq_jax.training.loop import interrupts_outside

    # A function defined in a module named orbax.*: Ctrl-C arriving inside it must wait until it returns (an
    # interrupted Orbax write leaves a thread that blocks the process's exit).
    namespace = {"__name__": "orbax.checkpoint.fake", "os": os, "signal": signal, "seen": []}
    exec("def write():\n    os.kill(os.getpid(), signal.SIGINT)\n    for _ in range(300000):\n        pass\n"
         "    seen.append('write finished')\n", namespace)
    with pytest.raises(KeyboardInterrupt):
        with interrupts_outside(retry_s=0.01):
            namespace["write"]()
            namespace["seen"].append("after the write")
            for _ in range(500):
                time.sleep(0.01)
    assert namespace["seen"][0] == "write finished"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    # An interrupt still waiting when the block ends (the write was the last thing in it) is raised there.
    with pytest.raises(KeyboardInterrupt):
        with interrupts_outside(retry_s=30):
            namespace["write"]()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_is_an_interrupt_inside_and_default_again_outside():
    import signal

    from alignq_jax.training.loop import interrupts_outside

    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(KeyboardInterrupt):
        with interrupts_outside():
            os.kill(os.getpid(), signal.SIGTERM)  # without the handler this would end the test process
            signal.pause()  # the handler raises here
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.slow
def test_sigterm_stops_a_cli_run_with_the_resume_hint_and_resume_finishes_it(tmp_path):
    import signal
    import time

    # A real process, stopped as a preempted VM stops it: SIGTERM during training, then --resume in a new process.
    workdir = tmp_path / "run"
    script = Path(__file__).resolve().parents[1] / "experiments" / "cifar10.py"
    cmd = [sys.executable, str(script), "--dataset", "digits", "--model", "small_cnn", "--bits", "4", "--method",
           "uniform", "--fp-epochs", "2", "--epochs", "20", "--batch-size", "32", "--limit-train", "256",
           "--limit-test", "64", "--devices", "1", "--no-progress", "--workdir", str(workdir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not any(
            len(m.read_text().splitlines()) >= 1 for m in workdir.glob("*w4a4*/metrics.jsonl")):
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted; continue this run with:" in err and "--resume --workdir" in err
    assert not (workdir / "results.json").exists()
    resumed = subprocess.run([sys.executable, str(script), "--resume", "--workdir", str(workdir), "--no-progress"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    (quantized,) = workdir.glob("*w4a4*/metrics.jsonl")
    assert [json.loads(line)["epoch"] for line in quantized.read_text().splitlines()] == list(range(1, 21))
    assert (workdir / "results.json").is_file()


@pytest.mark.parametrize("flags, named", [
    (["--lr", "-1"], "--lr must be positive; got -1.0"),
    (["--fp-lr", "0"], "--fp-lr"),
    (["--limit-train", "0"], "--limit-train"),
    (["--limit-train", "-5"], "--limit-train"),
    (["--limit-test", "0"], "--limit-test"),
    (["--epochs", "0"], "--epochs"),
    (["--milestones", "80", "150"], "--milestones"),
    (["--correlation-features", "1"], "--correlation-features"),
    (["--method", "uniform", "--admm-mode", "paper"], "--admm-mode"),
    (["--no-admm", "--admm-weight", "2"], "--admm-weight"),
    (["--init-from", "/nonexistent/run"], "--init-from"),
    (["--devices", "64"], "num_devices=64"),
    (["--batch-size", "12", "--devices", "8"], "--batch-size 12 must be divisible"),
    (["--bn-reestimate-batches", "-1"], "--bn-reestimate-batches must be 0 (off) or more"),
    (["--bn-reestimate-batches", "0", "--bn-reestimate-every-epoch"], "--bn-reestimate-every-epoch needs"),
])
def test_bad_settings_fail_before_training_naming_the_flag(tmp_path, fake_fit, capsys, flags, named):
    with pytest.raises(SystemExit) as exc:
        run_cli(["--data-dir", tmp_path, "--workdir", tmp_path / "run", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "usage:" in err
    assert not fake_fit.calls and not (tmp_path / "run").exists()


def test_runtime_error_is_not_a_usage_error(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setattr(cli, "fit", FakeFit(fail_at_call=1, exc=ValueError("shapes do not fit")))
    assert run_cli(["--data-dir", data_dir, "--workdir", tmp_path / "run", *SMALL]) == 1
    err = capsys.readouterr().err
    assert "usage:" not in err and "Traceback" in err  # unexpected: the traceback is kept
    assert err.strip().splitlines()[-1] == "error: ValueError: shapes do not fit"


def test_missing_data_is_a_runtime_error(tmp_path, fake_fit, capsys):
    assert run_cli(["--data-dir", tmp_path, "--workdir", tmp_path / "run", *SMALL]) == 1
    err = capsys.readouterr().err
    assert "--data-dir" in err and "Traceback" not in err and "usage:" not in err


def test_unwritable_workdir_is_a_clear_error(tmp_path, data_dir, fake_fit, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert run_cli(["--data-dir", data_dir, "--workdir", blocker / "run", *SMALL]) == 1
    err = capsys.readouterr().err
    assert "cannot write to --workdir" in err and "Traceback" not in err
    assert not fake_fit.calls


def _fake_run(folder: Path, stages, finished=True):
    folder.mkdir(parents=True)
    (folder / cli.SETTINGS_FILE).write_text("{}")
    for s in stages:
        (folder / s / "checkpoints" / "3").mkdir(parents=True)
        (folder / s / "stage.json").write_text("{}")
    if finished:
        (folder / "results.json").write_text(json.dumps({"stages": [{"stage": s} for s in stages]}))
    return folder


def test_init_from_accepts_a_run_a_stage_or_a_checkpoints_folder(tmp_path):
    run = _fake_run(tmp_path / "run", ["fp32", "w8a8", "w4a4"])
    assert cli.resolve_init_from(run) == run / "w4a4"  # a finished run: its last stage
    assert cli.resolve_init_from(run / "w8a8") == run / "w8a8"
    assert cli.resolve_init_from(run / "w8a8" / "checkpoints") == run / "w8a8" / "checkpoints"
    unfinished = _fake_run(tmp_path / "unfinished", ["fp32"], finished=False)
    with pytest.raises(ValueError, match="not finished.*fp32"):
        cli.resolve_init_from(unfinished)
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="not a run folder"):
        cli.resolve_init_from(tmp_path / "junk")
    (tmp_path / "nockpt" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        cli.resolve_init_from(tmp_path / "nockpt")


def test_init_from_a_run_folder_loads_its_last_stage(tmp_path, data_dir, fake_fit, monkeypatch):
    run = _fake_run(tmp_path / "run", ["fp32", "w4a4"])
    loaded = []
    monkeypatch.setattr(cli, "load_init", lambda path: loaded.append(path) or {
        "params": {"from": str(path)}, "batch_stats": {}, "admm_state": None, "admm_mode": None})
    assert run_cli(["--bits", "2", "--init-from", run, "--data-dir", data_dir, "--workdir", tmp_path / "new",
                    "--model", "small_cnn", "--devices", "1", "--epochs", "1", "--batch-size", "8",
                    "--eval-batch-size", "8", "--limit-train", "16"]) == 0
    assert loaded == [run / "w4a4"]
    (call,) = fake_fit.calls
    assert call["init"]["params"] == {"from": str(run / "w4a4")}


def test_baselines_get_no_admm_unless_asked(tmp_path, data_dir, fake_fit):
    assert run_cli(["--method", "uniform", "--data-dir", data_dir, "--workdir", tmp_path / "a", *SMALL]) == 0
    assert [c["config"].admm for c in fake_fit.calls] == [False, False]
    assert run_cli(["--method", "uniform", "--admm", "--data-dir", data_dir, "--workdir", tmp_path / "b", *SMALL]) == 0
    assert [c["config"].admm for c in fake_fit.calls[2:]] == [False, True]
    assert run_cli(["--data-dir", data_dir, "--workdir", tmp_path / "c", *SMALL]) == 0
    assert [c["config"].admm for c in fake_fit.calls[4:]] == [False, True]  # alignq: on by default


def test_progressive_chain_carries_the_admm_state(tmp_path, data_dir, fake_fit):
    workdir = tmp_path / "run"
    assert run_cli(["--bits", "3", "--progressive", "--data-dir", data_dir, "--workdir", workdir, *SMALL]) == 0
    names = [c["workdir"].name for c in fake_fit.calls]
    assert names == ["fp32", "w8a8", "w4a4", "w3a3"]
    fp, w8, w4, w3 = fake_fit.calls
    assert fp["init"] is None
    assert "admm_state" not in w8["init"]  # FP32 has no ADMM state: a new one
    for stage, previous_call in ((w4, 2), (w3, 3)):  # each starts from the previous stage's final state
        carried = stage["init"]["admm_state"]
        assert float(carried.z["q"]["gap"][0, 0]) == previous_call
        assert float(carried.gamma["q"]["gap"][0, 0]) == -previous_call
    stages = json.loads((workdir / "results.json").read_text())["stages"]
    assert [s["admm_state"] for s in stages] == [None, "new (the model it starts from had no ADMM)"] + [
        "carried over from the model it starts from"] * 2


def test_admm_state_is_not_carried_when_it_does_not_fit(tmp_path):
    parser = cli.build_parser("cifar10", "")
    args = parser.parse_args(["--model", "small_cnn", "--devices", "1", "--batch-size", "8"])
    cli.resolve_defaults(args)
    config = cli.stage_config(args, 4)
    state = ADMMState(z={"q": {"gap": np.zeros((8, 8))}}, gamma={"q": {"gap": np.zeros((8, 8))}})
    assert cli.admm_to_carry(state, "textbook", config)[0] is state
    assert cli.admm_to_carry(state, "paper", config)[0] is None  # another ADMM mode: not reused
    other = ADMMState(z={"q": {"gap": np.zeros((16, 16))}}, gamma={"q": {"gap": np.zeros((16, 16))}})
    carried, why = cli.admm_to_carry(other, "textbook", config)
    assert carried is None and "(16, 16)" in why and "(8, 8)" in why


def test_dtype_flag_reaches_every_stage_and_the_results(tmp_path, data_dir, fake_fit):
    workdir = tmp_path / "run"
    assert run_cli(["--dtype", "bfloat16", "--data-dir", data_dir, "--workdir", workdir, *SMALL]) == 0
    assert [c["config"].dtype for c in fake_fit.calls] == ["bfloat16", "bfloat16"]
    results = json.loads((workdir / "results.json").read_text())
    assert results["settings"]["dtype"] == "bfloat16"
    assert [s["dtype"] for s in results["stages"]] == ["bfloat16", "bfloat16"]


def test_results_in_percent_with_1_based_epochs_and_measured_levels(tmp_path, data_dir, fake_fit):
    workdir = tmp_path / "run"
    assert run_cli(["--bits", "4", "--data-dir", data_dir, "--workdir", workdir, *SMALL]) == 0
    results = json.loads((workdir / "results.json").read_text())
    fp, q = results["stages"]
    assert (fp["weight_levels"], fp["activation_levels"]) == (None, None)
    assert (q["weight_levels"], q["activation_levels"]) == (16, 16)  # 4 bits = 16 stored values, after the ReLU too
    cells = _results_row(workdir, "w4a4")
    assert cells["levels (weights / activations)"] == "16 / 16"
    assert cells["test acc % (last epoch)"] == "93.21"  # the headline: BN statistics re-estimated (default)
    assert cells["BN statistics (last epoch)"] == "re-estimated (2 batches)"
    assert cells["test acc % (last epoch, running BN statistics)"] == "91.23"
    assert cells["test acc % (best epoch)"] == "91.23" and cells["best epoch"] == "2"


def _results_row(workdir, stage):
    """The results.md row of ``stage`` as {column header: cell}."""
    lines = (workdir / "results.md").read_text().splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| stage")).strip("|").split("|")]
    row = next(line for line in lines if line.startswith(f"| {stage} "))
    return dict(zip(header, (c.strip() for c in row.strip("|").split("|"))))


def test_bn_reestimation_flags_reach_every_stage_and_the_results_say_which_accuracy_is_the_headline(
        tmp_path, data_dir, fake_fit):
    workdir = tmp_path / "run"
    assert run_cli(["--bn-reestimate-batches", "7", "--bn-reestimate-every-epoch", "--data-dir", data_dir,
                    "--workdir", workdir, *SMALL]) == 0
    assert [(c["config"].bn_reestimate_batches, c["config"].bn_reestimate_every_epoch) for c in fake_fit.calls] == \
        [(7, True), (7, True)]
    results = json.loads((workdir / "results.json").read_text())
    assert results["bn_statistics"]["headline"] == "reestimated"
    assert (results["bn_statistics"]["reestimate_batches"], results["bn_statistics"]["every_epoch"]) == (7, True)
    q = results["stages"][1]
    assert (q["last_epoch_test_accuracy"], q["last_epoch_test_accuracy_running_stats"]) == (0.93214, 0.91234)
    assert q["bn_statistics"] == "reestimated"
    assert "headline last-epoch accuracy is measured after re-estimating" in (workdir / "results.md").read_text()

    off = tmp_path / "off"
    assert run_cli(["--bn-reestimate-batches", "0", "--data-dir", data_dir, "--workdir", off, *SMALL]) == 0
    assert [c["config"].bn_reestimate_batches for c in fake_fit.calls[2:]] == [0, 0]
    results = json.loads((off / "results.json").read_text())
    assert results["bn_statistics"]["headline"] == "running"
    assert results["stages"][1]["last_epoch_test_accuracy"] == 0.91234
    cells = _results_row(off, "w4a4")
    assert cells["BN statistics (last epoch)"] == "running"
    assert cells["test acc % (last epoch)"] == cells["test acc % (last epoch, running BN statistics)"] == "91.23"
    assert "re-estimation off" in (off / "results.md").read_text()


@pytest.mark.parametrize("method, levels", [("alignq", "exact"), ("uniform", "exact")])
@pytest.mark.parametrize("bits", [2, 4])
def test_level_counts_are_two_to_the_bits(method, levels, bits):
    from alignq_jax.quantize import QuantConfig

    counts = report.level_counts(QuantConfig(w_bits=bits, a_bits=bits, method=method, levels=levels))
    assert counts == {"weight_levels": 2 ** bits, "activation_levels": 2 ** bits}


def test_no_progress_bars_when_output_is_not_a_terminal(tmp_path, data_dir, fake_fit):
    argv = ["--data-dir", data_dir, "--workdir", tmp_path / "run", *[a for a in SMALL if a != "--no-progress"]]
    assert not sys.stderr.isatty()  # pytest captures it
    assert run_cli(argv) == 0
    assert all(c["progress"] is False and c["log"] is not None for c in fake_fit.calls)


def test_run_plot_puts_stages_back_to_back_with_integer_epochs():
    from matplotlib.ticker import MaxNLocator

    histories = [("fp32", [{"epoch": e, "test_accuracy": 0.5} for e in (1, 2, 3)]),
                 ("w8a8", [{"epoch": e, "test_accuracy": 0.6} for e in (1, 2)]),
                 ("w4a4", [{"epoch": e, "test_accuracy": 0.7} for e in (1, 2)])]
    segments, boundaries = report.stage_chain_segments(histories)
    fig = report.history_figure(segments, "cifar10, resnet20: alignq 4-bit, ADMM textbook", boundaries)
    ax = fig.axes[0]
    xs = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert xs == {"fp32": [1, 2, 3], "w8a8": [4, 5], "w4a4": [6, 7]}
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert ax.get_xlabel() == "epoch" and "%" in ax.get_ylabel() and "ADMM" in ax.get_title()
    parser = cli.build_parser("cifar10", "")
    args = parser.parse_args(["--bits", "4"])
    cli.resolve_defaults(args)
    title = cli.run_title("cifar10", args)
    assert all(w in title for w in ("cifar10", "resnet20", "alignq", "4-bit", "ADMM textbook"))


def test_digits_history_plot_puts_qat_after_fp32():
    fp = [{"epoch": e, "test_accuracy": 0.8} for e in range(1, 5)]
    qat = [{"epoch": e, "test_accuracy": 0.9} for e in range(1, 3)]
    args = digits_demo.build_parser().parse_args(["--bits", "4"])
    fig = digits_demo.history_figure({"fp32": fp, "uniform": qat, "alignq": qat, "alignq+admm": qat}, args)
    ax = fig.axes[0]
    xs = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert xs["fp32"] == [1, 2, 3, 4]
    assert all(xs[v] == [5, 6] for v in ("uniform", "alignq", "alignq+admm"))
    assert "4-bit" in ax.get_title() and "ADMM" in ax.get_title()


# --download without a network


def test_download_fails_fast_when_the_network_is_off(monkeypatch):
    from alignq_jax.data import DataNotFoundError, tfds_source

    monkeypatch.setenv("TFDS_DISABLE_NETWORK", "1")
    monkeypatch.setattr(tfds_source.socket, "create_connection", lambda *a, **k: pytest.fail("touched the network"))
    with pytest.raises(DataNotFoundError, match="TFDS_DISABLE_NETWORK"):
        tfds_source.check_download_possible("cifar10")


def test_download_probe_names_the_unreachable_host(monkeypatch):
    from alignq_jax.data import DataNotFoundError, tfds_source

    def unreachable(address, timeout=None):
        assert timeout is not None and timeout <= 30
        raise OSError(101, "Network is unreachable")

    monkeypatch.delenv("TFDS_DISABLE_NETWORK", raising=False)
    monkeypatch.setattr(tfds_source.socket, "create_connection", unreachable)
    with pytest.raises(DataNotFoundError, match=r"www\.cs\.toronto\.edu:443 cannot be reached.*unreachable"):
        tfds_source.check_download_possible("cifar10")


class _FailingBuilder:
    """A TFDS builder whose download writes partial files, then fails (as a dropped connection would)."""

    def __init__(self, root: Path):
        self.data_dir_root = str(root)
        self.data_path = root / "cifar10" / "3.0.2"
        self.calls = 0

    def is_prepared(self):
        return False

    def download_and_prepare(self, **kwargs):
        self.calls += 1
        root = Path(self.data_dir_root)
        (root / "downloads").mkdir(parents=True, exist_ok=True)
        (root / "downloads" / "cifar-10-binary.tar.gz.tmp.123").write_bytes(b"partial")
        (root / "cifar10" / "3.0.2.incomplete42").mkdir(parents=True)
        raise ConnectionError("connection reset")


@pytest.mark.parametrize("existing", [False, True])
def test_failed_download_removes_what_it_created(tmp_path, monkeypatch, existing):
    from alignq_jax.data import DataNotFoundError, tfds_source

    root = tmp_path / "tfds"
    if existing:  # a data dir already in use: what was there stays
        (root / "downloads").mkdir(parents=True)
        (root / "downloads" / "other.zip").write_bytes(b"x")
        (root / "mnist").mkdir()
    builder = _FailingBuilder(root)
    monkeypatch.setattr(tfds_source, "tfds_builder", lambda name, data_dir=None: builder)
    monkeypatch.setattr(tfds_source, "check_download_possible", lambda *a, **k: None)
    with pytest.raises(DataNotFoundError, match="connection reset.*partial download was removed"):
        tfds_source.load_tfds("cifar10", root, download=True)
    assert builder.calls == 1
    if existing:
        assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == ["downloads", "downloads/other.zip",
                                                                             "mnist"]
    else:
        assert not root.exists()


def test_download_offline_from_the_cli_is_fast_and_clean(tmp_path, fake_fit, capsys):
    data = tmp_path / "tfds"  # TFDS_DISABLE_NETWORK is set for every test (conftest)
    assert run_cli(["--download", "--data-dir", data, "--workdir", tmp_path / "run", *SMALL]) == 1
    err = capsys.readouterr().err
    assert "--download needs the internet" in err and "Traceback" not in err
    assert not data.exists() and not fake_fit.calls
