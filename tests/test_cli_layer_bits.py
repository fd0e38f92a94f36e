"""The classification CLI's ``--layer-bits REGEX=BITS``: the stage configs become QuantRules (rules in the order
given, the stage's own config as default, the FP32 stage untouched), the bits each layer of a real model resolves
to, every bad value exits 2 before training, --resume compares the rules, the default workdir, results and
config.json record them. ``fit`` is the stand-in of test_cli_runs.py except for one tiny real run."""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from alignq_jax.cli import classification as cli
from alignq_jax.methods import get_method
from alignq_jax.quantize import QuantConfig, QuantRules, layer_report
from alignq_jax.training import TrainConfig
from alignq_jax.training.loop import config_to_dict
from alignq_jax.training.state import make_model

sys.path.insert(0, str(Path(__file__).parent))
from test_cli_runs import SMALL, FakeFit, data_dir, fake_fit, run_cli  # noqa: E402,F401 (fixtures)

N_BLOCKS = 17  # MobileNet-v2's inverted-residual blocks


def stages_of(*argv, dataset="cifar10"):
    parser = cli.build_parser(dataset, "")
    args = parser.parse_args(["--devices", "1", "--batch-size", "8", *argv])
    cli.resolve_defaults(args)
    return args, cli.build_stages(args)


def resolved_bits(config, image_shape=(32, 32, 3)) -> dict[str, tuple[int, int]]:
    """{layer path: (w_bits, a_bits)} of the stage's model, from layer_report (abstract)."""
    model = make_model(config, 10)
    x = jnp.zeros((2, *image_shape))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=True))
    return {p: (c.w_bits, c.a_bits) for p, c in layer_report(model, variables, x, train=True).layers.items()}


def test_stage_configs_are_rules_in_order_with_the_stage_config_as_default():
    flags = ["--model", "mobilenet_v2", "--levels", "paper", "--act-range", "3", "--correlation-features", "64"]
    args, stages = stages_of(*flags, "--bits", "3", "--progressive", "--layer-bits", "stem_conv|stem_bn=8",
                             "--layer-bits", "depthwise=32", "--layer-bits", "block1=2")
    _, plain = stages_of(*flags, "--bits", "3", "--progressive")
    assert [(n, b) for n, b, _ in stages] == [(n, b) for n, b, _ in plain] == [
        ("fp32", 32), ("w8a8", 8), ("w4a4", 4), ("w3a3", 3)]
    assert stages[0][2] == plain[0][2]  # the FP32 stage: one 32-bit config, no rules
    assert isinstance(stages[0][2].quant, QuantConfig) and stages[0][2].quant.w_bits == 32
    for (name, bits, config), (_, _, own) in zip(stages[1:], plain[1:]):
        quant = config.quant
        assert isinstance(quant, QuantRules), name
        assert quant.default == own.quant  # the stage's config, as without --layer-bits
        assert [p for p, _ in quant.rules] == ["stem_conv|stem_bn", "depthwise", "block1"]
        # The rule bits hold in every stage of the chain; everything else is the stage's config.
        assert [(c.w_bits, c.a_bits) for _, c in quant.rules] == [(8, 8), (32, 32), (2, 2)], name
        for _, c in quant.rules:
            for field in ("method", "levels", "act_range", "correlation_features", "correlation_target"):
                assert getattr(c, field) == getattr(own.quant, field), (name, field)
        assert dataclasses.replace(config, quant=own.quant) == own  # nothing else differs


def test_mobilenet_v2_depthwise_layers_resolve_to_their_bits():
    _, stages = stages_of("--model", "mobilenet_v2", "--bits", "4", "--layer-bits", "depthwise=8")
    fp, quant = stages[0][2], stages[1][2]
    bits = resolved_bits(quant)
    eight = {p for p, b in bits.items() if b == (8, 8)}
    assert eight == {f"block{i}/{n}" for i in range(N_BLOCKS) for n in ("depthwise", "depthwise_bn")}
    assert len(bits) == 2 * (1 + 3 * N_BLOCKS - 1 + 1)  # stem, 3 convs a block (block0 has no expansion), head
    assert {b for p, b in bits.items() if p not in eight} == {(4, 4)}
    assert set(resolved_bits(fp).values()) == {(32, 32)}


def test_first_matching_rule_wins_on_resnet20():
    # "conv0" also matches stage0_block0/conv0, which the earlier rule takes; the stem at 32 bits.
    _, stages = stages_of("--bits", "2", "--layer-bits", "stage0_block0=8", "--layer-bits", "conv0=3",
                          "--layer-bits", "^stem=32")
    bits = resolved_bits(stages[-1][2])
    want = {}
    for path in bits:
        if path.startswith("stage0_block0/"):
            want[path] = (8, 8)
        elif "conv0" in path:
            want[path] = (3, 3)
        elif path.startswith("stem"):
            want[path] = (32, 32)
        else:
            want[path] = (2, 2)
    assert bits == want
    assert sum(b == (3, 3) for b in bits.values()) == 8  # the other 8 blocks' conv0


BAD = [
    (["--layer-bits", "conv08"], ["--layer-bits", "'conv08'", "no '='"]),
    (["--layer-bits", "=8"], ["--layer-bits", "'=8'", "REGEX before '=' is empty"]),
    (["--layer-bits", "conv(=8"], ["--layer-bits", "'conv('", "not a regular expression"]),
    (["--layer-bits", "conv0=9"], ["--layer-bits", "BITS must be one of 1, 2, 3, 4, 5, 6, 7, 8, 32", "'9'"]),
    (["--layer-bits", "conv0=x"], ["--layer-bits", "BITS must be one of", "'x'"]),
    (["--layer-bits", "conv0="], ["--layer-bits", "BITS must be one of", "got ''"]),
    (["--layer-bits", "conv0=0"], ["--layer-bits", "BITS must be one of", "'0'"]),
    # A typo and a layer that is not quantization-aware (the FP Dense classifier): the model's layers are listed.
    (["--layer-bits", "conv0=8", "--layer-bits", "cnov1=8"],
     ["--layer-bits cnov1=8", "matches no quantized layer of --model small_cnn", "closest names: conv1",
      "bn0, bn1, bn2, conv0, conv1, conv2"]),
    (["--layer-bits", "fc=8"], ["--layer-bits fc=8", "matches no quantized layer"]),
    # A rule whose layers all go to an earlier one.
    (["--layer-bits", "conv=8", "--layer-bits", "conv1=2"], ["--layer-bits conv1=2", "taken by an earlier"]),
    # Bits the method does not define (LSQ has no 1-bit weight grid).
    (["--method", "lsq", "--layer-bits", "conv1=1"], ["--layer-bits conv1=1", "lsq: bits must be"]),
]


@pytest.mark.parametrize("flags, said", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_layer_bits_exit_2_before_training(tmp_path, data_dir, fake_fit, capsys, flags, said):
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:  # parser.error
        run_cli([*flags, "--data-dir", data_dir, "--workdir", workdir, *SMALL])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert all(s in err for s in said), err
    assert not fake_fit.calls and not workdir.exists()


def test_a_typo_on_mobilenet_v2_lists_the_closest_layers(tmp_path, data_dir, fake_fit, capsys):
    argv = ["--data-dir", data_dir, "--workdir", tmp_path / "run", *SMALL]
    with pytest.raises(SystemExit) as exc:
        run_cli([*argv, "--model", "mobilenet_v2", "--layer-bits", "depwise=8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--layer-bits depwise=8" in err and "closest names: depthwise" in err and "(104 in all)" in err


def test_resume_compares_the_rules_and_reuses_the_saved_ones(tmp_path, data_dir, monkeypatch, capsys):
    workdir = tmp_path / "run"
    monkeypatch.setattr(cli, "fit", FakeFit(fail_at_call=2, exc=KeyboardInterrupt()))
    rules = ["--layer-bits", "conv0|bn0=8", "--layer-bits", "conv2=3"]
    assert run_cli(["--bits", "2", *rules, "--data-dir", data_dir, "--workdir", workdir, *SMALL]) == 130
    saved = json.loads((workdir / cli.SETTINGS_FILE).read_text())["settings"]
    assert saved["layer_bits"] == ["conv0|bn0=8", "conv2=3"]
    capsys.readouterr()
    monkeypatch.setattr(cli, "load_init", lambda path: {"params": {}, "batch_stats": {}, "admm_state": None,
                                                        "admm_mode": None})
    resumed = FakeFit()
    monkeypatch.setattr(cli, "fit", resumed)
    for given in (["--layer-bits", "conv0|bn0=4", "--layer-bits", "conv2=3"],  # other bits
                  ["--layer-bits", "conv2=3", "--layer-bits", "conv0|bn0=8"],  # other order: other first matches
                  ["--layer-bits", "conv0|bn0=8"]):
        assert run_cli(["--resume", "--workdir", workdir, *given]) == 2
        err = capsys.readouterr().err
        assert "--layer-bits: saved ['conv0|bn0=8', 'conv2=3'], given" in err, err
    assert not resumed.calls

    assert run_cli(["--resume", "--workdir", workdir]) == 0  # the saved rules
    (call,) = resumed.calls
    same = dict(correlation=True, correlation_features=1024)  # alignq with ADMM: the CLI's defaults
    assert call["config"].quant == QuantRules((("conv0|bn0", QuantConfig(8, 8, **same)),
                                               ("conv2", QuantConfig(3, 3, **same))), QuantConfig(2, 2, **same))


def test_resume_from_a_run_without_rules_refuses_new_ones(tmp_path, data_dir, fake_fit, capsys):
    workdir = tmp_path / "run"
    assert run_cli(["--data-dir", data_dir, "--workdir", workdir, *SMALL]) == 0
    capsys.readouterr()
    assert run_cli(["--resume", "--workdir", workdir, "--layer-bits", "conv0=8"]) == 2
    assert "--layer-bits: saved None, given ['conv0=8']" in capsys.readouterr().err


def test_default_workdir_differs_with_rules():
    parser = cli.build_parser("cifar10", "")

    def name(*flags):
        args = parser.parse_args(["--bits", "4", *flags])
        cli.resolve_defaults(args)
        return str(cli.default_workdir(args))

    plain = name()
    names = [plain, name("--layer-bits", "depthwise=8"), name("--layer-bits", "depthwise=6"),
             name("--layer-bits", "depthwise=8", "--layer-bits", "stem=8"),
             name("--layer-bits", "stem=8", "--layer-bits", "depthwise=8")]
    assert len(set(names)) == len(names), names
    assert all(n.startswith(plain + "-layerbits-") for n in names[1:])
    assert name("--layer-bits", "depthwise=8") == names[1]  # the same rules, the same folder


def test_results_record_the_rules(tmp_path, data_dir, fake_fit):
    workdir = tmp_path / "run"
    assert run_cli(["--bits", "2", "--layer-bits", "conv0=8", "--layer-bits", "conv2|bn2=32",
                    "--data-dir", data_dir, "--workdir", workdir, *SMALL]) == 0
    assert isinstance(fake_fit.calls[1]["config"].quant, QuantRules)
    results = json.loads((workdir / "results.json").read_text())
    assert results["settings"]["layer_bits"] == ["conv0=8", "conv2|bn2=32"]
    fp, quant = results["stages"]
    assert "layer_bits" not in fp
    assert quant["layer_bits"] == [["conv0", 8], ["conv2|bn2", 32]]
    assert quant["bits"] == 2 and quant["method"] == "alignq" and quant["weight_levels"] == 4  # the default's
    md = (workdir / "results.md").read_text()
    assert "`conv0` at 8 bits" in md and "`conv2|bn2` at 32 bits" in md


def test_config_json_records_rules_with_method_objects():
    rules = QuantRules((("conv0", QuantConfig(8, 8, method=get_method("lsq"))), ("conv1", QuantConfig(3, 3))),
                       default=QuantConfig(4, 4, method=get_method("pact")))
    record = json.loads(json.dumps(config_to_dict(TrainConfig(model="small_cnn", quant=rules))))
    (p0, c0), (p1, c1) = record["quant"]["rules"]
    assert (p0, c0["w_bits"], c0["method"]["name"]) == ("conv0", 8, "lsq")
    assert (p1, c1["w_bits"], c1["method"]) == ("conv1", 3, "alignq")
    assert record["quant"]["default"]["method"]["name"] == "pact" and record["quant"]["default"]["w_bits"] == 4


@pytest.mark.slow
def test_real_run_with_layer_bits(tmp_path, data_dir):
    """small_cnn, FP32 then 2 bits with conv0 and its BN at 8 bits, through the real training loop."""
    workdir = tmp_path / "run"
    argv = ["--bits", "2", "--layer-bits", "conv0|bn0=8", "--data-dir", data_dir, "--workdir", workdir, *SMALL,
            "--epochs", "1", "--bn-reestimate-batches", "1"]
    assert run_cli(argv) == 0
    cfg = json.loads((workdir / "w2a2" / "config.json").read_text())
    assert [(p, c["w_bits"], c["a_bits"]) for p, c in cfg["quant"]["rules"]] == [("conv0|bn0", 8, 8)]
    assert cfg["quant"]["default"]["w_bits"] == 2
    results = json.loads((workdir / "results.json").read_text())
    assert results["stages"][1]["layer_bits"] == [["conv0|bn0", 8]]
    assert 0.0 <= results["stages"][1]["last_epoch_test_accuracy"] <= 1.0
