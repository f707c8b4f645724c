"""Collecting a sweep: ``sweep.csv`` (one row per cell, seed and arm), ``summary.csv`` (one row
per cell: mean ± std over seeds per arm, BiSSL − baseline, the BiSSL stage's diagnostics) and the
printed table.

Every number comes from the cells' ``results.json`` (:func:`bissl.trainer.report.summarize`).
A cell whose baseline the provider ran (:mod:`bissl.sweep.sharing`) gets the provider's baseline
rows, with ``source`` naming the provider; the BiSSL − baseline difference is paired per seed.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bissl.sweep.plan import SweepPlan, cell_dir
from bissl.trainer.report import DIAGNOSTICS, METRICS, mean_std

#: BiSSL, then the control arms (``bissl.trainer.report.ARMS``); a shared baseline brings all three.
ARM_ORDER = ("bissl", "baseline", "baseline_matched", "bissl_upper0")
SWEEP_CSV, SUMMARY_CSV = "sweep.csv", "summary.csv"


def read_results(run_dir: Path) -> dict[str, Any] | None:
    """A cell's ``results.json``, or None when the cell has not finished."""
    path = run_dir / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def read_cell_results(plan: SweepPlan, out: Path) -> dict[str, dict[str, Any] | None]:
    """Every cell's ``results.json`` by cell name (None: not finished), read once per collect."""
    return {c.name: read_results(cell_dir(out, c)) for c in plan.cells}


def collect_rows(plan: SweepPlan, results: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """One row per finished (cell, seed, arm) of ``results`` (:func:`read_cell_results`): ``cell``,
    the swept keys, ``seed``, ``arm``, :data:`METRICS`, ``source`` (the cell whose run produced the
    numbers)."""
    provider = plan.sharing.provider if plan.sharing.baseline else None
    shared = results.get(provider) if provider is not None else None
    rows = []
    for cell in plan.cells:
        res = results[cell.name]
        if res is None:
            continue
        for seed in plan.seeds:
            for arm in ARM_ORDER:
                source, metrics = cell.name, res["per_seed"].get(str(seed), {}).get(arm)
                if metrics is None and arm != "bissl" and shared is not None and provider is not None:
                    source, metrics = provider, shared["per_seed"].get(str(seed), {}).get(arm)
                if metrics is None:
                    continue
                rows.append(
                    {
                        "cell": cell.name,
                        **cell.values,
                        "seed": seed,
                        "arm": arm,
                        **{m: metrics[m] for m in METRICS},
                        "source": source,
                    }
                )
    return rows


def cell_diagnostics(results: dict[str, dict[str, Any] | None]) -> dict[str, dict[str, float]]:
    """Per cell of ``results`` (:func:`read_cell_results`), the mean over seeds of each BiSSL-stage
    diagnostic its results.json holds (``summary["diagnostics"]``,
    :func:`bissl.trainer.report.bissl_diagnostics`)."""
    found = {}
    for name, res in results.items():
        diag = (res or {}).get("summary", {}).get("diagnostics") or {}
        found[name] = {k: v["mean"] for k, v in diag.items() if k in DIAGNOSTICS}
    return found


def summarize_cells(
    plan: SweepPlan,
    rows: Sequence[dict[str, Any]],
    failed: dict[str, str] | None = None,
    diagnostics: dict[str, dict[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Per cell: ``status`` (done / failed / not run), ``seeds`` (finished), per arm and metric
    ``<arm>_<metric>_mean`` and ``_std`` (sample std, ddof=1, as results.json),
    ``diff_test_acc_mean/_std``: BiSSL − baseline test accuracy paired per seed, and
    ``diag_<name>``: the mean over seeds of each BiSSL-stage diagnostic (:func:`cell_diagnostics`)."""
    failed, diagnostics = failed or {}, diagnostics or {}
    out = []
    for cell in plan.cells:
        mine = [r for r in rows if r["cell"] == cell.name]
        by_arm = {arm: {r["seed"]: r for r in mine if r["arm"] == arm} for arm in ARM_ORDER}
        status = "done" if mine else ("failed" if cell.name in failed else "not run")
        row: dict[str, Any] = {"cell": cell.name, **cell.values, "status": status, "seeds": len(by_arm["bissl"])}
        for arm in ARM_ORDER:
            for m in METRICS:
                stats = mean_std([r[m] for r in by_arm[arm].values()]) if by_arm[arm] else None
                row[f"{arm}_{m}_mean"] = stats["mean"] if stats else None
                row[f"{arm}_{m}_std"] = stats["std"] if stats else None
        paired = [s for s in by_arm["bissl"] if s in by_arm["baseline"]]
        diff = (
            mean_std([by_arm["bissl"][s]["test_acc"] - by_arm["baseline"][s]["test_acc"] for s in paired])
            if paired
            else None
        )
        row["diff_test_acc_mean"] = diff["mean"] if diff else None
        row["diff_test_acc_std"] = diff["std"] if diff else None
        row["baseline_source"] = next((r["source"] for r in by_arm["baseline"].values()), None)
        row["error"] = failed.get(cell.name) if status == "failed" else None
        row.update({f"diag_{k}": diagnostics.get(cell.name, {}).get(k) for k in DIAGNOSTICS})
        out.append(row)
    return out


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict, bool)):
        return json.dumps(value)  # a list stays one cell and reads back as YAML/JSON
    return str(value)  # floats: repr, so the CSV holds the exact results.json numbers


def write_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: Path) -> None:
    """Write ``rows`` with ``columns`` atomically (temporary file + ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell_text(row.get(c)) for c in columns])
    os.replace(tmp, path)


def sweep_columns(plan: SweepPlan) -> list[str]:
    return ["cell", *plan.grid, "seed", "arm", *METRICS, "source"]


def summary_columns(plan: SweepPlan) -> list[str]:
    stats = [f"{arm}_{m}_{s}" for arm in ARM_ORDER for m in METRICS for s in ("mean", "std")]
    return [
        "cell",
        *plan.grid,
        "status",
        "seeds",
        *stats,
        "diff_test_acc_mean",
        "diff_test_acc_std",
        "baseline_source",
        "error",
        *(f"diag_{k}" for k in DIAGNOSTICS),
    ]


def format_summary_table(summary: Sequence[dict[str, Any]]) -> str:
    """Test accuracy (%) per cell: BiSSL and baseline mean ± std over seeds, and their paired
    difference."""

    def ms(mean: float | None, std: float | None, sign: str = "") -> str:
        return "—" if mean is None or std is None else f"{100 * mean:{sign}.2f} ± {100 * std:.2f}"

    width = max([len("cell")] + [len(r["cell"]) for r in summary])
    head = f"{'cell':<{width}}  {'BiSSL':>15}  {'baseline':>15}  {'BiSSL - baseline':>17}  seeds"
    lines = [head, "-" * len(head)]
    for r in summary:
        if r["status"] != "done":
            lines.append(f"{r['cell']:<{width}}  {r['status']}")
            continue
        bissl = ms(r["bissl_test_acc_mean"], r["bissl_test_acc_std"])
        base = ms(r["baseline_test_acc_mean"], r["baseline_test_acc_std"])
        diff = ms(r["diff_test_acc_mean"], r["diff_test_acc_std"], "+")
        lines.append(f"{r['cell']:<{width}}  {bissl:>15}  {base:>15}  {diff:>17}  {r['seeds']:>5}")
    return "\n".join(lines)
