"""experiments/svhn.py (MobileNet-v2 on SVHN) through the classification CLI.

The recipe defaults are checked on the stage TrainConfigs the real parser leads to. The end-to-end run uses the
real CLI and training loop on tiny generated .mat files read by the real loader; the images are then subsampled
to 8x8 (MobileNet-v2: 8 -> 4 -> 2 -> 1) to keep the run short, since the loader only reads 32x32 files. (A
DenseNet-40 CLI run is not here: compiling its steps takes minutes on a 2-core CPU.)
"""

import dataclasses
import functools
import json
import shlex
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import alignq_jax.data
from alignq_jax import models
from alignq_jax.cli import classification, svhn
from alignq_jax.quantize import without_quantizer_state
from alignq_jax.training import load_variables

sys.path.insert(0, str(Path(__file__).parent))
from tiny_data import write_svhn_mat  # noqa: E402

TINY = ["--fp-epochs", "1", "--epochs", "1", "--limit-train", "32", "--limit-test", "16", "--batch-size", "16",
        "--eval-batch-size", "16", "--bn-reestimate-batches", "1", "--devices", "2", "--no-progress"]


# ------------------------------------------------------------------------------------------- the recipe defaults


@pytest.fixture
def planned(monkeypatch, tmp_path):
    """``plan(argv) -> (args, [(stage, bits, TrainConfig)])``: svhn.main up to the point where it would train."""
    seen = []
    monkeypatch.setattr(classification, "run", lambda args, stages, session, out=print: seen.append((args, stages)))

    def plan(argv):
        seen.clear()
        assert svhn.main([*map(str, argv), "--workdir", tmp_path / f"run{len(list(tmp_path.iterdir()))}"]) == 0
        (result,) = seen
        return result

    return plan


def test_svhn_defaults_are_the_mobilenet_v2_recipe(planned):
    args, stages = planned([])
    assert args.dataset == "svhn_cropped" and args.method == "alignq" and args.admm is True
    assert [(name, bits) for name, bits, _ in stages] == [("fp32", 32), ("w4a4", 4)]
    for _, bits, config in stages:
        assert config.model == "mobilenet_v2"
        assert config.epochs == 100
        assert config.lr == 0.04  # the FP32 stage too
        assert config.milestones == (30, 60, 90)
        assert config.weight_decay == 2e-4
        assert config.batch_size == 96 and config.eval_batch_size == 100
        assert config.num_devices is None  # all 8 simulated devices: 96 splits over them (checked by build_stages)
        assert config.quant.w_bits == config.quant.a_bits == bits
    assert stages[1][2].admm and not stages[0][2].admm
    assert classification.default_workdir(args) == Path("runs/svhn_cropped-mobilenet_v2-alignq-w4-exact-admm")


def test_svhn_explicit_flags_win_over_the_recipe(planned):
    _, stages = planned(["--lr", "0.01", "--fp-lr", "0.1", "--epochs", "10", "--milestones", "0.5", "--batch-size",
                         "64", "--weight-decay", "1e-4", "--model", "resnet20", "--bits", "2"])
    (_, _, fp), (name, _, quant) = stages
    assert name == "w2a2" and quant.quant.w_bits == 2
    assert (fp.lr, quant.lr) == (0.1, 0.01)
    assert (fp.epochs, fp.milestones) == (100, (50,)) and (quant.epochs, quant.milestones) == (10, (5,))
    assert fp.batch_size == quant.batch_size == 64 and quant.weight_decay == 1e-4 and quant.model == "resnet20"
    assert quant.eval_batch_size == 100  # not given: still the recipe's


def test_svhn_help_shows_the_recipe(capsys):
    with pytest.raises(SystemExit) as info:
        svhn.main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for shown in ("--model {", "network (default: mobilenet_v2)", "stages (default: 0.04)",
                  "FP32 stage (default: 0.04)", "(default: [0.3, 0.6, 0.9])", "(PyTorch convention) (default: 0.0002)",
                  "global training batch size (default: 96)", "evaluation batch size (default: 100)",
                  "quantization-aware stage (default: 100)", "with --init-from) (default: 100)",
                  "(default: svhn_cropped)", "1, 2, 4 and 8 devices"):
        assert shown in text, shown
    assert "(default: resnet20)" not in text and "(default: 128)" not in text


def test_per_script_defaults_must_name_a_flag():
    with pytest.raises(ValueError, match=r"unknown flags \['learning_rate'\]"):
        classification.build_parser("svhn_cropped", "", {"learning_rate": 0.1})
    # The cifar10 script keeps the generic defaults.
    args = classification.build_parser("cifar10", "").parse_args([])
    assert (args.model, args.batch_size, args.weight_decay, args.milestones) == ("resnet20", 128, 1e-4, [0.4, 0.75])


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture
def images_8x8(monkeypatch):
    """The CLI's data, read by the real loader, subsampled from 32x32 to 8x8 (every 4th row and column)."""
    real = alignq_jax.data.load_dataset

    def load_8x8(*args, **kwargs):
        ds = real(*args, **kwargs)
        return dataclasses.replace(ds, train_images=ds.train_images[:, ::4, ::4],
                                   test_images=ds.test_images[:, ::4, ::4])

    monkeypatch.setattr(alignq_jax.data, "load_dataset", load_8x8)


def _same_tree(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return (jax.tree.structure(a) == jax.tree.structure(b) and len(la) > 0
            and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)))


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_svhn_mobilenet_v2_on_two_devices_interrupted_then_resumed(tmp_path, images_8x8, monkeypatch, capsys):
    """Ctrl-C as the quantized stage starts (the FP32 stage finished and saved), then ``--resume`` with no other
    flag: the FP32 stage is skipped (its files untouched) and the quantized stage starts from exactly the weights
    the FP32 stage handed it before the interruption, now read back from its checkpoint."""
    # The MobileNet-v2 layers (stem, t=1 block, expansion, stride-2 and residual blocks, head), with fewer blocks
    # than the 17 of the full table: compiling its steps dominates this test's time.
    short = ((1, 16, 1, 1), (6, 24, 2, 2))
    monkeypatch.setitem(models.MODELS, "mobilenet_v2", functools.partial(models.MobileNetV2, block_settings=short))
    real_fit = classification.fit
    data_dir = write_svhn_mat(tmp_path / "data", n_train=32, n_test=16)
    workdir = tmp_path / "run"
    starts = []

    def fit_then_ctrl_c(config, dataset, **kwargs):
        if config.quant.w_bits == 32:
            return real_fit(config, dataset, **kwargs)
        starts.append(kwargs["init_variables"])
        raise KeyboardInterrupt

    monkeypatch.setattr(classification, "fit", fit_then_ctrl_c)
    monkeypatch.setattr(sys, "argv", ["not-an-installed-command"])
    assert svhn.main(["--data-dir", data_dir, "--workdir", workdir, "--model", "mobilenet_v2", *TINY]) == 130
    err = capsys.readouterr().err
    # Neither `python <file>.py` nor an installed command: the printed command names this script.
    assert shlex.join(["python", "experiments/svhn.py", "--resume", "--workdir", str(workdir), "--no-progress"]) in err
    assert (workdir / "fp32" / "stage.json").is_file() and not (workdir / "results.json").exists()
    fp32_files = _files(workdir / "fp32")
    assert any(name.startswith("checkpoints/") for name in fp32_files)

    calls = []

    def recording_fit(config, dataset, **kwargs):
        calls.append((config, kwargs))
        return real_fit(config, dataset, **kwargs)

    monkeypatch.setattr(classification, "fit", recording_fit)
    assert svhn.main(["--resume", "--workdir", workdir, "--no-progress"]) == 0
    assert _files(workdir / "fp32") == fp32_files
    ((config, kwargs),) = calls  # only the quantized stage trained
    assert config.quant.w_bits == 4 and config.model == "mobilenet_v2" and config.num_devices == 2
    assert config.weight_decay == 2e-4 and config.admm  # the recipe, from the saved settings
    assert kwargs["resume"] is False
    (before,) = starts
    assert set(kwargs["init_variables"]) == set(before) == {"params", "batch_stats"}
    assert _same_tree(kwargs["init_variables"]["params"], before["params"])
    assert _same_tree(kwargs["init_variables"]["batch_stats"], before["batch_stats"])

    results = json.loads((workdir / "results.json").read_text())
    assert results["dataset"] == "svhn_cropped" and results["model"] == "mobilenet_v2"
    assert [s["stage"] for s in results["stages"]] == ["fp32", "w4a4"]
    assert results["settings"]["devices"] == 2 and results["settings"]["milestones"] == [0.3, 0.6, 0.9]
    steps = [json.loads(line) for line in (workdir / "w4a4" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(np.isfinite(s["loss"]) for s in steps)  # 32 images / global batch 16
    for stage in results["stages"]:
        # 16 test images: a multiple of 1/16 (no padded row counted, none dropped).
        for key in ("last_epoch_test_accuracy", "last_epoch_test_accuracy_running_stats"):
            assert abs(stage[key] * 16 - round(stage[key] * 16)) < 1e-6, (stage["stage"], key)




def test_densenet_with_learned_quantizer_state_checkpoints_and_restores_through_the_cli(tmp_path, images_8x8,
                                                                                         monkeypatch):
    """``--model densenet40`` with LSQ (learned steps in every conv's quantizer: state a checkpoint must carry) on
    2 devices: the quantized stage's checkpoint holds exactly the variables its training ended with, and a second
    run ``--init-from`` that run starts from its weights and BatchNorm statistics bit for bit."""
    # DenseNet's layers (stem, dense layers, transitions, final BN) with one layer per block instead of 12:
    # compiling DenseNet-40's steps takes minutes on 2 CPU cores.
    monkeypatch.setitem(models.MODELS, "densenet40", functools.partial(models.DenseNet, depth=7))
    real_fit = classification.fit
    starts, finished = [], []

    def recording_fit(config, dataset, **kwargs):
        starts.append(kwargs.get("init_variables"))
        finished.append((config, real_fit(config, dataset, **kwargs)))
        return finished[-1][1]

    monkeypatch.setattr(classification, "fit", recording_fit)
    data_dir = write_svhn_mat(tmp_path / "data", n_train=32, n_test=16)
    common = ["--data-dir", data_dir, "--model", "densenet40", "--method", "lsq", "--bits", "4",
              "--epochs", "1", "--limit-train", "32",
              "--limit-test", "16", "--batch-size", "16", "--eval-batch-size", "16", "--bn-reestimate-batches", "1",
              "--devices", "2", "--no-progress"]
    assert classification.main([*common, "--fp-epochs", "1", "--workdir", tmp_path / "first"],
                               dataset="svhn_cropped") == 0
    (_, _), (config, quantized) = finished
    assert config.model == "densenet40" and config.num_devices == 2 and config.quant.method_name == "lsq"
    trained = {"params": quantized.state.params, "batch_stats": quantized.state.batch_stats}
    steps = [k for k, _ in jax.tree_util.tree_flatten_with_path(trained["params"])[0] if "step" in jax.tree_util.keystr(k)]
    # Depth 7: the stem (weights only: its input is the image), 3 layer convs and 2 transition convs (weights and
    # inputs).
    assert len(steps) == 1 + 2 * 5
    saved = load_variables(tmp_path / "first" / "w4a4" / "checkpoints")
    assert _same_tree(saved["params"], trained["params"]) and _same_tree(saved["batch_stats"], trained["batch_stats"])

    starts.clear()
    assert classification.main([*common, "--init-from", tmp_path / "first", "--workdir", tmp_path / "second"],
                               dataset="svhn_cropped") == 0
    (start,) = starts  # no FP32 stage: the quantized stage starts from the first run's last stage, restored
    # Learned quantizer state belongs to its stage: the new stage re-initialises it from the restored model.
    expected = without_quantizer_state(trained)
    assert _same_tree(start["params"], expected["params"])
    assert _same_tree(start["batch_stats"], expected["batch_stats"])
    assert not any("step" in jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(start)[0])
