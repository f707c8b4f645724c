"""``sensitivity.png``: test accuracy of BiSSL against each swept key, the baseline as reference.

One panel per swept key. The x axis is logarithmic when the key's values are positive numbers
spanning more than one decade, linear for other numbers, categorical (in grid order) otherwise.
With several swept keys a panel draws one line per combination of the other keys' values (not an
average over them: averaging would hide interactions, e.g. a λ that only works with one solver).
Each point is BiSSL's mean ± std over seeds. The baseline is a horizontal line with a ±std band
when it is the same in every cell of the panel (always so when the sweep shares it); otherwise
(a swept key changes the baseline arm, e.g. ``finetune.lr``) it is a dashed line per combination.
Drawn on matplotlib's Agg canvas without pyplot, like :mod:`bissl.trainer.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bissl.sweep.grid import short_keys, value_label

AxisKind = Literal["log", "linear", "categorical"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def axis_kind(values: Sequence[Any]) -> AxisKind:
    """How to draw a key's values on the x axis (see the module docstring)."""
    if not values or not all(_is_number(v) for v in values):
        return "categorical"
    if all(v > 0 for v in values) and max(values) / min(values) > 10.0:
        return "log"
    return "linear"


def _positions(values: Sequence[Any], kind: AxisKind) -> dict[str, float]:
    """x position of each value (keyed by its label): the value, or its index when categorical."""
    return {value_label(v): (float(i) if kind == "categorical" else float(v)) for i, v in enumerate(values)}


def sensitivity_figure(
    grid: Mapping[str, Sequence[Any]], summary: Sequence[dict[str, Any]], base: Mapping[str, Any] | None = None
) -> Figure:
    """The figure of :func:`plot_sensitivity` (returned for inspection and tests).

    Args:
        grid: swept key -> values, in grid order.
        summary: :func:`bissl.sweep.collect.summarize_cells` rows (cells without results are
            skipped).
        base: the axes design's base values: each key's panel then shows only the cells whose
            other keys are at their base values (that axis and the base cell).
    """
    keys = list(grid)
    short = short_keys(keys)
    fig = Figure(figsize=(5.0 * len(keys), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    done = [r for r in summary if r.get("bissl_test_acc_mean") is not None]
    for ax, key in zip(axes, keys):
        kind = axis_kind(grid[key])
        pos = _positions(grid[key], kind)
        others = [k for k in keys if k != key]
        if base is not None:
            # One factor at a time: this axis is the base cell and the cells that vary only it.
            rows_here = [r for r in done if all(value_label(r[k]) == value_label(base[k]) for k in others)]
            others = []
        else:
            rows_here = done
        lines: dict[str, list[dict[str, Any]]] = {}
        for r in rows_here:
            label = ", ".join(f"{short[k]}={value_label(r[k])}" for k in others) or "BiSSL"
            lines.setdefault(label, []).append(r)
        baselines = {
            (r["baseline_test_acc_mean"], r["baseline_test_acc_std"])
            for r in done
            if r.get("baseline_test_acc_mean") is not None
        }
        for label, rows in lines.items():
            rows = sorted(rows, key=lambda r: pos[value_label(r[key])])
            xs = [pos[value_label(r[key])] for r in rows]
            bar = ax.errorbar(
                xs,
                [100 * r["bissl_test_acc_mean"] for r in rows],
                yerr=[100 * r["bissl_test_acc_std"] for r in rows],
                marker="o",
                ms=4,
                capsize=3,
                lw=1.2,
                label=label if others else "BiSSL (mean ± std)",
            )
            with_base = [r for r in rows if r.get("baseline_test_acc_mean") is not None]
            if len(baselines) > 1 and with_base:
                color = bar.lines[0].get_color()
                ax.errorbar(
                    [pos[value_label(r[key])] for r in with_base],
                    [100 * r["baseline_test_acc_mean"] for r in with_base],
                    yerr=[100 * r["baseline_test_acc_std"] for r in with_base],
                    ls="--",
                    marker="s",
                    ms=3,
                    capsize=2,
                    lw=0.9,
                    color=color,
                    alpha=0.7,
                    label=f"baseline{': ' + label if others else ''} (mean ± std)",
                )
        if len(baselines) == 1:
            ((mean, std),) = baselines
            ax.axhline(100 * mean, color="tab:gray", lw=1.2, ls="--", label="baseline (mean ± std)")
            if std > 0:
                ax.axhspan(100 * (mean - std), 100 * (mean + std), color="tab:gray", alpha=0.2, lw=0)
        if kind == "log":
            ax.set_xscale("log")
        elif kind == "categorical":
            ax.set_xticks(list(pos.values()), list(pos))
            ax.set_xlim(-0.5, len(pos) - 0.5)
        ax.set(title=f"sensitivity to {key}", xlabel=key, ylabel="test top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        if not done:
            ax.text(0.5, 0.5, "no finished cells", transform=ax.transAxes, ha="center")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig


def plot_sensitivity(
    grid: Mapping[str, Sequence[Any]],
    summary: Sequence[dict[str, Any]],
    path: str | Path,
    base: Mapping[str, Any] | None = None,
) -> Path:
    """Write the sensitivity figure to ``path`` (PNG); ``base`` as :func:`sensitivity_figure`."""
    path = Path(path)
    sensitivity_figure(grid, summary, base).savefig(path, dpi=110)
    return path
