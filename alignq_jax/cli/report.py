"""Results files shared by the experiment CLIs: results.json, Markdown tables, level counts and accuracy plots."""

from __future__ import annotations

import json
import platform
import textwrap
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

BEST_EPOCH_NOTE = (
    "best epoch = the epoch with the highest test accuracy (the paper's protocol: model selection on the test "
    "set, optimistic); last epoch = the honest number."
)
ACCURACY_NOTE = (
    "Accuracies in %; epochs count from 1; levels = distinct values the quantizers output, measured (weights; "
    "activations after the ReLU that follows the quantizer)."
)
REESTIMATED = "reestimated"  # FitResult records: "bn_statistics" is "reestimated" or "running"


def bn_statistics_label(record: dict) -> str:
    """'re-estimated (N batches)' or 'running' for a stage record (``FitResult.summary()`` keys)."""
    if record.get("bn_statistics") == REESTIMATED:
        return f"re-estimated ({record.get('bn_reestimate_batches')} batches)"
    return "running"


def headline_statistics(records: Sequence[dict]) -> str:
    """Which BatchNorm statistics the stages' headline (last-epoch) accuracies use: "reestimated", "running" or
    "mixed" (a resumed run whose stages were made with different settings)."""
    kinds = {r.get("bn_statistics", "running") for r in records}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def bn_statistics_note(records: Sequence[dict]) -> str:
    """One sentence for results.md saying which accuracy is the headline and what the other one is."""
    headline = headline_statistics(records)
    if headline == "running":
        return ("BN statistics: the running averages accumulated during training (re-estimation off); the "
                "last-epoch accuracy is measured with them.")
    best = {r.get("best_epoch_bn_statistics", "running") for r in records}
    per_epoch = "re-estimated after every epoch too" if best == {REESTIMATED} else "running statistics"
    return (
        "BN statistics: the headline last-epoch accuracy is measured after re-estimating the BatchNorm statistics "
        "with the final weights over training batches (a cumulative average, see 'BN statistics'); the column "
        "'running BN statistics' is the same weights with the exponential running averages of training (noisier "
        f"in short quantized runs). Best epoch: from the per-epoch history ({per_epoch})."
        + (" Stages differ in this setting." if headline == "mixed" else "")
    )


# Enough samples that every level of an 8-bit grid is hit many times.
LEVEL_SAMPLES = 100_001


def machine_description() -> str:
    devices = jax.devices()
    return (f"{platform.machine()} {platform.system()}, {len(devices)} x {devices[0].device_kind} "
            f"({jax.default_backend()}), jax {jax.__version__}")


def write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))


def percent(fraction: float) -> str:
    """0.91234 -> '91.23' (accuracies are reported in %, 2 decimals, like the plots)."""
    return f"{100 * fraction:.2f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def level_counts(quant, *, samples: int = LEVEL_SAMPLES) -> dict[str, int | None]:
    """How many distinct values ``quant``'s quantizers output, measured (None for 32 bits).

    Weights: the method's weight quantizer on ``samples`` standard-normal values, with its learned parameters
    initialised from them (a per-tensor CDF/grid uses all its levels on such a tensor). Activations of methods
    placed after BatchNorm: ``quant.quantize_activation(x, relu=True)`` on a dense linspace over (-2A, 2A),
    A = ``act_range``; relu=True because the models put that quantizer right before a ReLU, so that is what a
    stored activation can be. Methods placed on conv inputs: their activation quantizer on a dense linspace over
    [0, 8) (a post-ReLU input), with parameters and statistics initialised from it. A grid without clipping (the
    uniform baseline's paper-mode weights, round(n*w)/n) has as many levels as the weights' range allows: on
    N(0, 1) that is far more than a trained layer's small weights use (122 at 4 bits).

    Returns: {"weight_levels": int | None, "activation_levels": int | None}.
    """
    import jax.numpy as jnp

    method = quant.quantizer
    counts: dict[str, int | None] = {"weight_levels": None, "activation_levels": None}
    if quant.w_bits != 32:
        w = jax.random.normal(jax.random.key(0), (samples,), jnp.float32)
        wq = method.quantize_weight(method.init_weight(w, quant.w_bits), w, quant.w_bits)
        counts["weight_levels"] = int(np.unique(np.asarray(wq)).size)
    if quant.quantizes_bn_output:
        x = jnp.linspace(-2 * quant.act_range, 2 * quant.act_range, samples, dtype=jnp.float32)
        counts["activation_levels"] = int(np.unique(np.asarray(quant.quantize_activation(x, relu=True))).size)
    elif quant.quantizes_conv_input:
        x = jnp.linspace(0.0, 8.0, samples, dtype=jnp.float32)[None, :]
        bits = quant.a_bits
        state = {**method.init_activation(x, bits), **method.activation_batch_stats(x, bits)}
        counts["activation_levels"] = int(np.unique(np.asarray(method.quantize_activation(state, x, bits))).size)
    return counts


def set_wrapped_title(ax, title: str, *, fontsize: float = 10, width: int = 80) -> None:
    """A title broken into lines of at most ``width`` characters, so long run descriptions are not cut off."""
    ax.set_title(textwrap.fill(title, width), fontsize=fontsize)


def history_figure(segments: Sequence[tuple[str, list[dict], int]], title: str,
                   boundaries: Sequence[tuple[float, str]] = (), *, xlabel: str = "epoch"):
    """Test accuracy (%) per epoch: one line per (label, history, epoch offset); a history's epoch e is drawn at
    x = offset + e (epochs count from 1). ``boundaries``: (x, text) vertical markers (e.g. where QAT starts).

    Returns the matplotlib Figure (the caller saves and closes it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, history, offset in segments:
        ax.plot([offset + r["epoch"] for r in history], [100 * r["test_accuracy"] for r in history], marker=".",
                label=label)
    for x, text in boundaries:
        ax.axvline(x, color="0.4", linestyle="--", linewidth=1)
        ax.annotate(text, (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -3), textcoords="offset points",
                    va="top", fontsize=8, color="0.3")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    set_wrapped_title(ax, title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stage_chain_segments(stages: Sequence[tuple[str, list[dict]]]):
    """Stages trained one after the other, drawn back to back: (segments, boundaries) for ``history_figure``.

    Stage k's epochs follow stage k-1's last epoch; a marker at each stage start names the stage.
    """
    segments, boundaries, offset = [], [], 0
    for i, (label, history) in enumerate(stages):
        segments.append((label, history, offset))
        if i:
            boundaries.append((offset + 0.5, f"{label} starts"))
        offset += len(history)
    return segments, boundaries


def plot_stage_chain(path: Path, stages: Sequence[tuple[str, list[dict]]], title: str, *,
                     first_is_init: bool = False) -> None:
    """accuracy.png of a run: its stages back to back on one epoch axis (see ``stage_chain_segments``)."""
    segments, boundaries = stage_chain_segments(stages)
    xlabel = "epoch (stages back to back" + (", the first starting from --init-from)" if first_is_init else ")")
    save_figure(history_figure(segments, title, boundaries, xlabel=xlabel), path)
