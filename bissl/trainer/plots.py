"""The run's curves as one PNG, drawn from the metrics CSVs (matplotlib's Agg canvas, no pyplot:
the library never changes the user's global matplotlib backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bissl.trainer.metrics import read_metrics

_ARM_COLORS = {"finetune_baseline": "tab:gray", "finetune_bissl": "tab:blue"}
_ARM_LABELS = {"finetune_baseline": "baseline", "finetune_bissl": "BiSSL"}


def _series(rows: Iterable[dict[str, Any]], phase: str, part: str, column: str) -> tuple[list, list]:
    xs, ys = [], []
    for row in rows:
        if row["phase"] == phase and row["part"] == part and row.get(column) is not None:
            xs.append(len(xs) + 1 if part in ("lower", "upper") else row["step"])
            ys.append(row[column])
    return xs, ys


def plot_run(metrics_by_seed: dict[int, list[dict[str, Any]]], path: str | Path) -> None:
    """Four panels: pretext loss; BiSSL lower loss; BiSSL upper losses; fine-tuning val accuracy.

    Args:
        metrics_by_seed: rows of each seed's ``metrics.csv`` (:func:`read_metrics`).
        path: the PNG to write.
    """
    fig = Figure(figsize=(12, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_pre, ax_low, ax_up, ax_ft = fig.subplots(2, 2).ravel()
    for i, (seed, rows) in enumerate(sorted(metrics_by_seed.items())):
        label = f"seed {seed}"
        first = i == 0
        x, y = _series(rows, "pretext", "pretext", "loss")
        ax_pre.plot(x, y, lw=0.8, label=label)
        x2, y2 = _series(rows, "pretext_matched", "pretext", "loss")
        if x2:
            ax_pre.plot([len(x) + s for s in x2], y2, lw=0.8, ls="--",
                        label=f"{label} (compute-matched continuation)")
        x, y = _series(rows, "bissl", "lower", "loss")
        ax_low.plot(x, y, lw=0.8, label=label)
        x, y = _series(rows, "bissl", "upper", "loss")
        line, = ax_up.plot(x, y, lw=0.9, label=f"{label}: L_D(φ)")
        x, y = _series(rows, "bissl", "upper", "loss_theta")
        ax_up.plot(x, y, lw=0.9, ls=":", color=line.get_color(), label=f"{label}: L_D(θ)")
        for arm, color in _ARM_COLORS.items():
            x, y = _series(rows, arm, "eval", "val_acc")
            epochs = [r["round"] for r in rows if r["phase"] == arm and r["part"] == "eval"]
            if y:
                ax_ft.plot(epochs, [100 * v for v in y], color=color, lw=1.0, alpha=0.8,
                           label=_ARM_LABELS[arm] if first else None)
    ax_pre.set(title="Pretext pretraining", xlabel="step", ylabel="pretext loss L_P")
    ax_low.set(title="BiSSL lower level", xlabel="lower step", ylabel="L_P(θ) (without proximal term)")
    ax_up.set(title="BiSSL upper level", xlabel="upper step", ylabel="downstream loss")
    ax_ft.set(title="Fine-tuning (validation split)", xlabel="epoch", ylabel="val top-1 accuracy (%)")
    for ax in (ax_pre, ax_low, ax_up, ax_ft):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.savefig(Path(path), dpi=110)


def plot_run_dir(run_dir: str | Path, seeds: Iterable[int]) -> Path:
    """Plot ``run_dir/seed_<s>/metrics.csv`` for ``seeds`` into ``run_dir/curves.png``."""
    run_dir = Path(run_dir)
    metrics = {s: read_metrics(run_dir / f"seed_{s}" / "metrics.csv") for s in seeds}
    out = run_dir / "curves.png"
    plot_run(metrics, out)
    return out

