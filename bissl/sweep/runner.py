"""Running a sweep: every cell of the grid through :func:`bissl.trainer.run_experiment`, in order.

Output directory layout::

    <out>/sweep.json            the manifest (bissl.sweep.plan): config, grid, seeds, cells, sharing
    <out>/cells/<cell>/         a run directory per cell (config.yaml, results.json, seed_<s>/)
    <out>/sweep.csv             one row per (cell, seed, arm)              (bissl.sweep.collect)
    <out>/summary.csv           one row per cell: mean ± std over seeds, BiSSL − baseline
    <out>/sensitivity.png       test accuracy against each swept key       (bissl.sweep.plots)

Resuming: a cell whose ``results.json`` exists is skipped; any other cell is (re)started and
``run_experiment`` resumes it from its own checkpoints. A cell that fails (non-finite loss, solver
error) is reported and the sweep goes on; it is retried, from its last checkpoint, next time.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bissl.config import ConfigError, load_config
from bissl.provenance import write_provenance
from bissl.solvers import SolverError
from bissl.sweep.collect import (
    SUMMARY_CSV,
    SWEEP_CSV,
    cell_diagnostics,
    collect_rows,
    format_summary_table,
    read_cell_results,
    summarize_cells,
    summary_columns,
    sweep_columns,
    write_csv,
)
from bissl.sweep.grid import Cell
from bissl.sweep.plan import SweepPlan, build_plan, cell_dir, read_manifest, write_or_check_manifest
from bissl.sweep.plots import plot_sensitivity
from bissl.trainer import NonFiniteLossError, run_experiment
from bissl.trainer.checkpoint import load_checkpoint

SENSITIVITY_PNG = "sensitivity.png"
_PRETEXT_DONE = "pretext.done.pt"


@dataclass
class CellOutcome:
    """What happened to one cell in this call.

    Attributes:
        cell: the cell.
        status: ``skipped`` (finished earlier), ``resumed`` (started earlier), ``ran`` (new) or
            ``failed`` (non-finite loss or solver error; ``error`` says which).
        wall_s: seconds spent on the cell in this call.
        pretext_from: cells whose pretext checkpoints this cell started from (sharing).
    """

    cell: Cell
    status: str
    wall_s: float = 0.0
    error: str | None = None
    pretext_from: list[str] = field(default_factory=list)


@dataclass
class SweepResult:
    """A finished (or partly failed) sweep.

    Attributes:
        out: the sweep directory.
        plan: the validated sweep.
        outcomes: one per cell, in order.
        rows: the rows of ``sweep.csv``; summary: the rows of ``summary.csv``.
        csv_path, summary_path, plot_path: the files written.
    """

    out: Path
    plan: SweepPlan
    outcomes: list[CellOutcome]
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    csv_path: Path
    summary_path: Path
    plot_path: Path

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def default_out(config_path: str | Path | None, overrides: Sequence[str] = ()) -> Path:
    """``<run.out_dir>/sweep_<config file stem>`` (``runs/sweep_<stem>`` by default)."""
    stem = Path(config_path).stem if config_path is not None else "defaults"
    return Path(load_config(config_path, list(overrides)).run.out_dir) / f"sweep_{stem}"


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no extra disk; checkpoints are never rewritten in place), else an atomic copy."""
    try:
        os.link(src, dst)
    except OSError:
        tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def seed_pretext_from(src_seed: Path, dst_seed: Path) -> bool:
    """Start the fresh seed directory ``dst_seed`` from the finished pretext phase in ``src_seed``.

    Links ``checkpoints/pretext.done.pt`` and copies the pretext rows of ``metrics.csv`` (its
    first ``metrics_offset`` bytes, recorded in the done file), so the cell's metrics and curves
    are those of an unshared run. The done file is placed first: an interruption in between
    leaves a cell that resumes past the pretext with fewer metric rows, never duplicated ones.

    Returns:
        False (and changes nothing) when the source's metrics file is shorter than recorded.
    """
    src = src_seed / "checkpoints" / _PRETEXT_DONE
    offset = int(load_checkpoint(src)["metrics_offset"])
    metrics = src_seed / "metrics.csv"
    if not metrics.exists() or metrics.stat().st_size < offset:
        return False
    (dst_seed / "checkpoints").mkdir(parents=True, exist_ok=True)
    _link_or_copy(src, dst_seed / "checkpoints" / _PRETEXT_DONE)
    with open(metrics, "rb") as f:
        head = f.read(offset)
    tmp = dst_seed / f".metrics.csv.tmp{os.getpid()}"
    tmp.write_bytes(head)
    os.replace(tmp, dst_seed / "metrics.csv")
    return True


def _share_pretext(plan: SweepPlan, out: Path, cell: Cell) -> list[str]:
    """Pre-seed ``cell``'s seeds that have not started from the first cell (the provider first)
    that finished that seed's pretext; under the sharing rule all of them hold the same one.
    Seeds already started resume their own phases. Returns the donor cells used."""
    donors = sorted((c for c in plan.cells if c.name != cell.name), key=lambda c: c.name != plan.sharing.provider)
    used: list[str] = []
    for seed in plan.seeds:
        dst = cell_dir(out, cell) / f"seed_{seed}"
        if (dst / "checkpoints").exists() or (dst / "metrics.csv").exists():
            continue
        for donor in donors:
            src = cell_dir(out, donor) / f"seed_{seed}"
            if (src / "checkpoints" / _PRETEXT_DONE).exists() and seed_pretext_from(src, dst):
                if donor.name not in used:
                    used.append(donor.name)
                break
    return used


def _run_cell(plan: SweepPlan, out: Path, cell: Cell) -> CellOutcome:
    run_dir = cell_dir(out, cell)
    if (run_dir / "results.json").exists():
        return CellOutcome(cell, "skipped")
    start = time.perf_counter()
    outcome = CellOutcome(cell, "resumed" if (run_dir / "config.yaml").exists() else "ran")
    cfg = plan.cell_config(cell)
    if plan.sharing.pretext and cell.name != plan.sharing.provider:
        outcome.pretext_from = _share_pretext(plan, out, cell)
    try:
        run_experiment(cfg, run_dir)
    except (NonFiniteLossError, SolverError) as err:
        outcome.status, outcome.error = "failed", str(err)
    outcome.wall_s = time.perf_counter() - start
    return outcome


def _describe(i: int, n: int, outcome: CellOutcome, plan: SweepPlan) -> str:
    line = f"cell {i}/{n} {outcome.cell.name}: {outcome.status}"
    if outcome.status != "skipped":
        line += f" in {outcome.wall_s:.1f} s"
    notes = []
    if outcome.pretext_from:
        notes.append(f"pretext from {', '.join(outcome.pretext_from)}")
    borrowed = plan.sharing.baseline and outcome.cell.name != plan.sharing.provider
    if borrowed and outcome.status != "skipped":
        notes.append(f"baseline from {plan.sharing.provider}")
    if notes:
        line += f" ({'; '.join(notes)})"
    if outcome.error:
        line += f": {outcome.error}"
    return line


def run_plan(plan: SweepPlan, out: str | Path, *, verbose: bool = True) -> SweepResult:
    """Run (or continue) a validated sweep in ``out``; collect, plot, and print the table.

    Raises:
        ConfigError: ``out`` holds a different sweep, or a cell directory a different run.
        RunInterrupted, KeyboardInterrupt: passed on; rerun (or ``--resume``) to continue.
    """
    out = Path(out)
    resuming = write_or_check_manifest(plan, out)
    n = len(plan.cells)
    if verbose:
        print(
            f"sweep {out} ({'continuing' if resuming else 'new'}): {n} cells x "
            f"{len(plan.seeds)} seed(s); {plan.sharing.reason}",
            flush=True,
        )
    outcomes = []
    for i, cell in enumerate(plan.cells, 1):
        outcome = _run_cell(plan, out, cell)
        outcomes.append(outcome)
        if verbose:
            print(_describe(i, n, outcome, plan), flush=True)
    results = read_cell_results(plan, out)
    rows = collect_rows(plan, results)
    write_provenance(out)  # machine, commit and date of the collected numbers (generated tables show it)
    failed = {o.cell.name: o.error or "" for o in outcomes if o.status == "failed"}
    summary = summarize_cells(plan, rows, failed, cell_diagnostics(results))
    csv_path, summary_path = out / SWEEP_CSV, out / SUMMARY_CSV
    write_csv(rows, sweep_columns(plan), csv_path)
    write_csv(summary, summary_columns(plan), summary_path)
    plot_path = plot_sensitivity(plan.grid, summary, out / SENSITIVITY_PNG, base=plan.base_values)
    if verbose:
        print(f"\ntest top-1 accuracy (%), mean ± std over seeds {plan.seeds}:")
        print(format_summary_table(summary))
    return SweepResult(out, plan, outcomes, rows, summary, csv_path, summary_path, plot_path)


def run_sweep(
    config_path: str | Path | None,
    grid: dict[str, list[Any]],
    *,
    seeds: int | Sequence[int] | None = None,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    share: bool = True,
    verbose: bool = True,
    design: str = "grid",
) -> SweepResult:
    """Run a grid of configs (resumable), collect every run's final metrics, plot sensitivities.

    Args:
        config_path: the base config file (``None``: the built-in defaults).
        grid: dotted key -> values, e.g. ``{"bissl.lam": [1e-3, 1e-2], "bissl.solver": ["cg",
            "identity"]}``; the cells are the Cartesian product, the first key varying slowest.
        seeds: ``N`` (seeds ``0..N-1``), a list of seeds, or None (the config's ``run.seeds``).
        out: the sweep directory (default: ``<run.out_dir>/sweep_<config stem>``). An existing
            sweep of the same grid is continued; a different one is refused.
        overrides: fixed ``"section.key=value"`` overrides of every cell (``--set``).
        share: run the pretext phase and the baseline arm once per seed when the swept keys
            cannot change them (:mod:`bissl.sweep.sharing`).
        verbose: print one line per cell and the final table.
        design: ``"grid"``: the cells are the Cartesian product of the grid; ``"axes"``: one
            factor at a time, a ``base`` cell (the config unchanged) and one cell per other value
            of each key, the other keys at their base values.

    Returns:
        The outcomes, the collected rows and the paths of sweep.csv, summary.csv, sensitivity.png.

    Raises:
        ConfigError: a bad key, value, cell or override (before anything runs), or a different
            sweep in ``out``.

    Example:
        >>> result = run_sweep("bissl/configs/demo_digits.yaml", {"bissl.lam": [1e-3, 1e-2, 1e-1]},
        ...                    seeds=3)  # doctest: +SKIP
        >>> result.summary[0]["bissl_test_acc_mean"]  # doctest: +SKIP
    """
    plan = build_plan(config_path, grid, seeds=seeds, overrides=overrides, share=share, design=design)
    return run_plan(plan, out if out is not None else default_out(config_path, overrides), verbose=verbose)


def resume_sweep(out: str | Path, *, overrides: Sequence[str] = (), verbose: bool = True) -> SweepResult:
    """Continue the sweep in ``out`` from its ``sweep.json`` (config, grid, seeds, sharing).

    Args:
        overrides: extra overrides that do not change results (e.g. ``run.quiet=true``).
    """
    manifest = read_manifest(out)
    config = manifest["config"]
    if config is not None and not Path(config).exists():
        raise ConfigError(f"the config of the sweep in {out}, {config}, is missing")
    return run_sweep(
        config,
        manifest["grid"],
        seeds=manifest["seeds"],
        out=out,
        overrides=[*manifest["overrides"], *overrides],
        share=manifest["share"],
        verbose=verbose,
        design=manifest.get("design", "grid"),
    )
