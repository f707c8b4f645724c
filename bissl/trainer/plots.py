"""The run's curves as one PNG, drawn from the metrics CSVs (matplotlib's Agg canvas, no pyplot:
the library never changes the user's global matplotlib backend)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bissl.trainer.metrics import read_metrics

_ARM_COLORS = {
    "finetune_baseline": "tab:gray",
    "finetune_baseline_matched": "tab:brown",
    "finetune_bissl_upper0": "tab:olive",
    "finetune_bissl": "tab:blue",
}
_ARM_LABELS = {
    "finetune_baseline": "baseline",
    "finetune_baseline_matched": "compute-matched baseline",
    "finetune_bissl_upper0": "BiSSL, no upper step",
    "finetune_bissl": "BiSSL",
}


def _series(rows: Iterable[dict[str, Any]], phase: str, part: str, column: str) -> tuple[list, list]:
    xs: list[Any] = []
    ys: list[Any] = []
    for row in rows:
        if row["phase"] == phase and row["part"] == part and row.get(column) is not None:
            xs.append(len(xs) + 1 if part in ("lower", "upper") else row["step"])
            ys.append(row[column])
    return xs, ys


def _plot_solver_health(ax_ritz, ax_res, rows: list[dict[str, Any]], label: str) -> None:
    """Ritz estimates of I + H/(λ+λ_damp) and the residual per upper step; indefinite steps and
    steps where the on_indefinite policy acted are marked."""
    upper = [r for r in rows if r["phase"] == "bissl" and r["part"] == "upper"]
    if not upper or all(r.get("cg_ritz_min") is None for r in upper):
        return
    xs = list(range(1, len(upper) + 1))
    lo = [r.get("cg_ritz_min") for r in upper]
    hi = [r.get("cg_ritz_max") for r in upper]
    (line,) = ax_ritz.plot(xs, lo, lw=0.9, label=f"{label}: Ritz min")
    ax_ritz.plot(xs, hi, lw=0.9, ls=":", color=line.get_color(), label=f"{label}: Ritz max")
    bad = [(x, v) for x, v, r in zip(xs, lo, upper) if r.get("cg_indefinite")]
    if bad:
        ax_ritz.scatter(*zip(*bad), marker="x", color=line.get_color(), s=18, label=f"{label}: flagged indefinite")
    ax_res.plot(xs, [r.get("cg_residual") for r in upper], lw=0.9, color=line.get_color(), label=label)
    acted = [(x, r.get("cg_residual")) for x, r in zip(xs, upper) if r.get("cg_action") not in (None, "none")]
    if acted:
        ax_res.scatter(
            *zip(*acted),
            marker="o",
            facecolors="none",
            edgecolors=line.get_color(),
            s=22,
            label=f"{label}: policy acted ({upper[xs.index(acted[0][0])]['cg_action']})",
        )


def plot_run(metrics_by_seed: dict[int, list[dict[str, Any]]], path: str | Path) -> None:
    """Six panels: pretext loss; BiSSL lower loss; BiSSL upper losses; fine-tuning val accuracy;
    solver health of the upper steps (Ritz estimates of the damped system, residual norm).

    Args:
        metrics_by_seed: rows of each seed's ``metrics.csv`` (:func:`read_metrics`).
        path: the PNG to write.
    """
    fig = Figure(figsize=(12, 12), layout="constrained")
    FigureCanvasAgg(fig)
    ax_pre, ax_low, ax_up, ax_ft, ax_ritz, ax_res = fig.subplots(3, 2).ravel()
    for i, (seed, rows) in enumerate(sorted(metrics_by_seed.items())):
        label = f"seed {seed}"
        first = i == 0
        x, y = _series(rows, "pretext", "pretext", "loss")
        ax_pre.plot(x, y, lw=0.8, label=label)
        x2, y2 = _series(rows, "pretext_matched", "pretext", "loss")
        if x2:
            ax_pre.plot([len(x) + s for s in x2], y2, lw=0.8, ls="--", label=f"{label} (compute-matched continuation)")
        x, y = _series(rows, "bissl", "lower", "loss")
        ax_low.plot(x, y, lw=0.8, label=label)
        x, y = _series(rows, "bissl", "upper", "loss")
        (line,) = ax_up.plot(x, y, lw=0.9, label=f"{label}: L_D(φ)")
        x, y = _series(rows, "bissl", "upper", "loss_theta")
        ax_up.plot(x, y, lw=0.9, ls=":", color=line.get_color(), label=f"{label}: L_D(θ)")
        _plot_solver_health(ax_ritz, ax_res, rows, label)
        for arm, color in _ARM_COLORS.items():
            x, y = _series(rows, arm, "eval", "val_acc")
            epochs = [r["round"] for r in rows if r["phase"] == arm and r["part"] == "eval"]
            if y:
                ax_ft.plot(
                    epochs,
                    [100 * v for v in y],
                    color=color,
                    lw=1.0,
                    alpha=0.8,
                    label=_ARM_LABELS[arm] if first else None,
                )
    ax_pre.set(title="Pretext pretraining", xlabel="step", ylabel="pretext loss L_P")
    ax_low.set(title="BiSSL lower level", xlabel="lower step", ylabel="L_P(θ) (without proximal term)")
    ax_up.set(title="BiSSL upper level", xlabel="upper step", ylabel="downstream loss")
    ax_ft.set(title="Fine-tuning (validation split)", xlabel="epoch", ylabel="val top-1 accuracy (%)")
    ax_ritz.set(
        title="Solver health: Ritz estimates of I + H/(λ+λ_damp)",
        xlabel="upper step",
        ylabel="eigenvalue estimate (≤ 0: indefinite)",
    )
    ax_ritz.axhline(0.0, color="black", lw=0.6)
    ax_ritz.set_yscale("symlog", linthresh=1.0)
    ax_res.set(title="Solver health: residual norm", xlabel="upper step", ylabel="‖v − A x‖")
    ax_res.set_yscale("log")
    for ax in (ax_pre, ax_low, ax_up, ax_ft, ax_ritz, ax_res):
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
