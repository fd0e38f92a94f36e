"""experiments/colab_tpu.ipynb runs headless on CPU with tiny settings (its smoke mode: no install, generated
local CIFAR-10 files, one epoch per stage), so the notebook cannot rot."""

import base64
import json
import os
import pickle
import sys
from pathlib import Path

import jax
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "colab_tpu.ipynb"


def _write_cifar_batches(folder: Path, n_train_per_batch: int, n_test: int) -> Path:
    """A cifar-10-batches-py folder (the python pickle format) of random images."""
    rng = np.random.default_rng(0)
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train_per_batch
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        (d / name).write_bytes(pickle.dumps(batch))
    return folder


def _kernel_spec(folder: Path) -> str:
    """A kernelspec running this interpreter (the installed `python3` spec may name another python on PATH)."""
    spec = folder / "kernels" / "alignq-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "alignq test", "language": "python"}))
    return "alignq-test"


def _outputs(nb, output_type=None):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
            if output_type is None or o.output_type == output_type]


def test_notebook_defaults_are_the_colab_run(monkeypatch):
    """Without the smoke variables the notebook installs, downloads and trains the paper's schedule at 4 bits."""
    for name in [k for k in os.environ if k.startswith("ALIGNQ_")]:
        monkeypatch.delenv(name)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("accelerator") == "TPU"
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "saved with outputs"
    params = {}
    exec(nb.cells[1].source, params)
    assert params["SMOKE"] is False and params["BITS"] == 4 and params["FP_EPOCHS"] == params["EPOCHS"] == 200
    assert params["EXTRA_ARGS"] == [] and params["WORKDIR"].endswith("-w4")
    source = "\n".join(cell.source for cell in nb.cells)
    for needed in ('"--download"', '"--dry-run"', '"experiments", "cifar10.py"', "results.md", "accuracy.png"):
        assert needed in source, needed


@pytest.mark.slow
def test_notebook_runs_headless_on_cpu(tmp_path, monkeypatch):
    data_dir = _write_cifar_batches(tmp_path / "data", n_train_per_batch=8, n_test=16)
    workdir = tmp_path / "run"
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    kernel = _kernel_spec(tmp_path / "jupyter")
    settings = {
        "ALIGNQ_NOTEBOOK_SMOKE": "1",
        "ALIGNQ_REPO_DIR": str(ROOT),
        "ALIGNQ_DATA_DIR": str(data_dir),
        "ALIGNQ_WORKDIR": str(workdir),
        "ALIGNQ_FP_EPOCHS": "1",
        "ALIGNQ_EPOCHS": "1",
        "ALIGNQ_EXTRA_ARGS": "--model small_cnn --batch-size 16 --eval-batch-size 8 --limit-train 32 --limit-test 16",
        "JAX_PLATFORMS": "cpu",
        # The kernel and the training script see the 8 simulated devices of tests/conftest.py.
        "XLA_FLAGS": os.environ["XLA_FLAGS"],
    }
    for k, v in settings.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()

    # The training cell ran the CLI on every device, FP32 then 4 bits, into the fresh workdir.
    results = json.loads((workdir / "results.json").read_text())
    assert [s["stage"] for s in results["stages"]] == ["fp32", "w4a4"]
    assert results["stages"][1]["bits"] == 4 and results["stages"][1]["admm"] is True
    assert all(0.0 <= s["last_epoch_test_accuracy"] <= 1.0 for s in results["stages"])
    n = len(jax.devices())
    assert f"{n} x cpu" in results["machine"]
    text = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
    assert f"{n} x cpu (cpu)" in text and "--resume" not in text and "--download" not in text
    assert "epoch 1/1" in text  # the script's log reached the notebook

    # The table cell shows results.md, the plot cell shows accuracy.png.
    shown = [o.data for o in _outputs(nb, "display_data")]
    table = (workdir / "results.md").read_text()
    assert "| fp32 |" in table and "| w4a4 |" in table
    assert [d["text/markdown"] for d in shown if "text/markdown" in d] == [table]
    png = (workdir / "accuracy.png").read_bytes()
    assert [base64.b64decode(d["image/png"]) for d in shown if "image/png" in d] == [png]
