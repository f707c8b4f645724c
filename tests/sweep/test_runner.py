"""Running a sweep: resume (finished cells are not rerun, partial cells resume), a different grid
is refused, failures are reported, and the CSVs and the plot hold the cells' results."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import statistics
from pathlib import Path

import pytest

import bissl.sweep.runner as runner
from bissl.config import ConfigError, DebugConfig
from bissl.sweep import resume_sweep, run_sweep
from bissl.sweep.plots import axis_kind, sensitivity_figure
from bissl.trainer import NonFiniteLossError, RunInterrupted

TINY = Path(__file__).resolve().parents[1] / "trainer" / "tiny.yaml"


def _results(out: Path, cell: str) -> dict:
    return json.loads((out / "cells" / cell / "results.json").read_text())


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def count_runs(monkeypatch):
    """Count run_experiment calls (cell directory names), still running them."""
    calls: list[str] = []
    real = runner.run_experiment

    def counted(cfg, run_dir):
        calls.append(Path(run_dir).name)
        return real(cfg, run_dir)

    monkeypatch.setattr(runner, "run_experiment", counted)
    return calls


@pytest.mark.slow  # trains cells of the tiny config (seconds each)
def test_rerun_skips_finished_cells_and_resumes_a_deleted_result(tiny_sweep, sweep_copy, count_runs):
    out = sweep_copy()
    names = [c.name for c in tiny_sweep.plan.cells]
    before = (out / "sweep.csv").read_text()
    again = run_sweep(TINY, {"bissl.lam": [1e-3, 1e-1]}, seeds=2, out=out, verbose=False)
    assert count_runs == [] and [o.status for o in again.outcomes] == ["skipped", "skipped"]
    assert (out / "sweep.csv").read_text() == before
    (out / "cells" / names[1] / "results.json").unlink()
    resumed = resume_sweep(out, verbose=False)
    assert count_runs == [names[1]]
    assert [o.status for o in resumed.outcomes] == ["skipped", "resumed"]
    assert _results(out, names[1])["per_seed"] == _results(tiny_sweep.out, names[1])["per_seed"]


@pytest.mark.slow  # trains cells of the tiny config (seconds each)
def test_interrupted_shared_cell_resumes_to_the_same_results(tiny_sweep, sweep_copy, monkeypatch):
    """Cell 2 is started afresh (pretext pre-seeded), killed in its BiSSL stage, then resumed."""
    out = sweep_copy()
    name = tiny_sweep.plan.cells[1].name
    for path in sorted((out / "cells" / name).rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    real = runner.run_experiment

    def interrupted(cfg, run_dir):  # seed 0: pretext skipped, stop inside the BiSSL stage
        return real(dataclasses.replace(cfg, debug=DebugConfig(stop_after_steps=5)), run_dir)

    monkeypatch.setattr(runner, "run_experiment", interrupted)
    with pytest.raises(RunInterrupted):
        resume_sweep(out, verbose=False)
    ckpts = out / "cells" / name / "seed_0" / "checkpoints"
    assert (ckpts / "pretext.done.pt").exists() and (ckpts / "bissl.pt").exists()
    assert not (ckpts / "bissl.done.pt").exists()
    monkeypatch.setattr(runner, "run_experiment", real)
    result = resume_sweep(out, verbose=False)
    assert [o.status for o in result.outcomes] == ["skipped", "resumed"]
    assert _results(out, name)["per_seed"] == _results(tiny_sweep.out, name)["per_seed"]


def test_a_different_sweep_in_the_same_directory_is_refused(tiny_sweep, sweep_copy, count_runs):
    out = sweep_copy()
    for grid, seeds, overrides, what in [
        ({"bissl.lam": [1e-3, 1e-2]}, 2, [], "grid"),
        ({"bissl.lam": [1e-3, 1e-1], "bissl.gamma": [1.0]}, 2, [], "grid"),
        ({"bissl.lam": [1e-3, 1e-1]}, 3, [], "seeds"),
        ({"bissl.lam": [1e-3, 1e-1]}, 2, ["finetune.lr=0.01"], "config (finetune.lr)"),
    ]:
        with pytest.raises(ConfigError, match=r"holds a different sweep \(" + re.escape(what)):
            run_sweep(TINY, grid, seeds=seeds, out=out, overrides=overrides, verbose=False)
    assert count_runs == []
    cells = sorted(c.name for c in tiny_sweep.plan.cells)
    assert sorted(p.name for p in (out / "cells").iterdir()) == cells
    # A change that does not alter results is accepted.
    run_sweep(TINY, {"bissl.lam": [1e-3, 1e-1]}, seeds=2, out=out, overrides=["run.log_every=5"], verbose=False)


def test_a_failed_cell_is_reported_and_the_sweep_goes_on(tiny_sweep, sweep_copy, monkeypatch):
    out = sweep_copy()
    name = tiny_sweep.plan.cells[1].name
    (out / "cells" / name / "results.json").unlink()

    def diverges(cfg, run_dir):
        raise NonFiniteLossError("non-finite loss (nan) in phase 'bissl' at upper step 1")

    monkeypatch.setattr(runner, "run_experiment", diverges)
    result = resume_sweep(out, verbose=False)
    assert [o.status for o in result.outcomes] == ["skipped", "failed"]
    assert "non-finite" in result.failed[0].error
    rows = _read_csv(out / "summary.csv")
    assert [r["status"] for r in rows] == ["done", "failed"]
    assert "non-finite" in rows[1]["error"] and rows[1]["bissl_test_acc_mean"] == ""
    assert {r["cell"] for r in _read_csv(out / "sweep.csv")} == {tiny_sweep.plan.cells[0].name}


def test_sweep_csv_holds_every_cell_seed_and_arm_from_results_json(tiny_sweep):
    out, plan = tiny_sweep.out, tiny_sweep.plan
    rows = _read_csv(out / "sweep.csv")
    provider = plan.sharing.provider
    expected = []
    for cell in plan.cells:
        for seed in plan.seeds:
            for arm in ("bissl", "baseline"):
                source = cell.name if arm == "bissl" else provider  # the baseline is shared
                metrics = _results(out, source)["per_seed"][str(seed)][arm]
                expected.append((cell.name, str(cell.values["bissl.lam"]), str(seed), arm, source, metrics))
    assert len(rows) == len(expected) == 2 * len(plan.seeds) * len(plan.cells)
    for row, (cell, lam, seed, arm, source, metrics) in zip(rows, expected):
        assert (row["cell"], row["bissl.lam"], row["seed"], row["arm"], row["source"]) == (cell, lam, seed, arm, source)
        for key in ("test_acc", "val_acc", "test_loss", "val_loss"):
            assert float(row[key]) == metrics[key]  # exact: floats are written as repr


def test_summary_csv_is_mean_and_std_over_seeds(tiny_sweep):
    rows = _read_csv(tiny_sweep.out / "sweep.csv")
    summary = _read_csv(tiny_sweep.out / "summary.csv")
    assert [s["cell"] for s in summary] == [c.name for c in tiny_sweep.plan.cells]
    for s in summary:
        assert s["status"] == "done" and s["seeds"] == "2"
        for arm in ("bissl", "baseline"):
            for key in ("test_acc", "test_loss", "val_loss"):
                vals = [float(r[key]) for r in rows if r["cell"] == s["cell"] and r["arm"] == arm]
                assert float(s[f"{arm}_{key}_mean"]) == pytest.approx(statistics.mean(vals), rel=1e-12)
                assert float(s[f"{arm}_{key}_std"]) == pytest.approx(statistics.stdev(vals), abs=1e-12)
        acc = {(r["arm"], r["seed"]): float(r["test_acc"]) for r in rows if r["cell"] == s["cell"]}
        diffs = [acc["bissl", seed] - acc["baseline", seed] for arm, seed in acc if arm == "bissl"]
        assert float(s["diff_test_acc_mean"]) == pytest.approx(statistics.mean(diffs), abs=1e-12)
        assert float(s["diff_test_acc_std"]) == pytest.approx(statistics.stdev(diffs), abs=1e-12)
    # BiSSL depends on λ: the two cells' losses differ (the cells really are different runs).
    assert summary[0]["bissl_test_loss_mean"] != summary[1]["bissl_test_loss_mean"]


def test_sensitivity_plot_is_written(tiny_sweep):
    png = tiny_sweep.out / "sensitivity.png"
    assert png == tiny_sweep.plot_path
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize(
    "values, kind",
    [
        ([1e-3, 1e-2], "linear"),
        ([1e-3, 1e-1], "log"),
        ([1, 5, 20], "log"),
        ([0.0, 1.0], "linear"),
        ([-1.0, 100.0], "linear"),
        (["cg", "identity"], "categorical"),
        ([True, False], "categorical"),
        ([[16, 8], [32, 8]], "categorical"),
        ([1, "a"], "categorical"),
    ],
)
def test_axis_kind(values, kind):
    assert axis_kind(values) == kind


def test_sensitivity_figure_panels_lines_and_baseline(tiny_sweep):
    """Two keys: one panel each, one BiSSL line per value of the other key, one baseline line."""
    grid = {"bissl.lam": [1e-3, 1e-1], "bissl.solver": ["cg", "identity"]}
    summary = []
    combos = [(a, b) for a in grid["bissl.lam"] for b in grid["bissl.solver"]]
    for i, (lam, solver) in enumerate(combos):
        s = tiny_sweep.summary[i % 2]  # measured numbers, reused for the layout check
        summary.append({**s, "bissl.lam": lam, "bissl.solver": solver})
    fig = sensitivity_figure(grid, summary)
    lam_ax, solver_ax = fig.axes
    assert lam_ax.get_xscale() == "log" and solver_ax.get_xscale() == "linear"
    assert [t.get_text() for t in solver_ax.get_xticklabels()] == ["cg", "identity"]
    labels = lam_ax.get_legend_handles_labels()[1]
    assert labels.count("baseline (mean ± std)") == 1
    assert {"solver=cg", "solver=identity"} <= set(labels)
    # A baseline that differs between cells is drawn per line, not as one reference line.
    summary[1] = {**summary[1], "baseline_test_acc_mean": summary[1]["baseline_test_acc_mean"] + 0.01}
    labels = sensitivity_figure(grid, summary).axes[0].get_legend_handles_labels()[1]
    assert "baseline (mean ± std)" not in labels and "baseline: solver=cg (mean ± std)" in labels
