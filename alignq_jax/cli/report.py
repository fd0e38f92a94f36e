"""Results files shared by the experiment CLIs: results.json, a Markdown table and accuracy plots."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Sequence

import jax

BEST_EPOCH_NOTE = (
    "best epoch = the epoch with the highest test accuracy (the paper's protocol: model selection on the test "
    "set, optimistic); last epoch = the honest number."
)


def machine_description() -> str:
    devices = jax.devices()
    return f"{platform.machine()} {platform.system()}, {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"


def write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_histories(path: Path, histories: dict[str, list[dict]], title: str) -> None:
    """Test accuracy per epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, history in histories.items():
        ax.plot([r["epoch"] + 1 for r in history], [100 * r["test_accuracy"] for r in history], marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
