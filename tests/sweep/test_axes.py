"""The axes design (``--axis``): one factor at a time around the config, a base cell, shared
pretext and baseline, resumable, and per-axis sensitivity panels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bissl.config import ConfigError, config_to_dict, load_config
from bissl.sweep import build_plan, run_sweep
from bissl.sweep.cli import cmd_sweep
from bissl.sweep.grid import BASE_CELL, config_value, validate_axes
from bissl.sweep.plots import sensitivity_figure

TINY = Path(__file__).resolve().parents[1] / "trainer" / "tiny.yaml"


def test_cells_are_the_base_and_one_per_other_value_of_each_axis():
    # tiny.yaml: gamma 1.0 (the default), stages 2.
    cells, grid = validate_axes(TINY, {"bissl.gamma": [0.01], "bissl.stages": [1, 2, 3]}, [])
    assert [c.name for c in cells] == [BASE_CELL, "gamma=0.01", "stages=1", "stages=3"]
    # Every cell names every axis; the others sit at their base values.
    assert cells[0].values == {"bissl.gamma": 1.0, "bissl.stages": 2}
    assert cells[1].values == {"bissl.gamma": 0.01, "bissl.stages": 2}
    assert cells[3].values == {"bissl.gamma": 1.0, "bissl.stages": 3}
    # A listed base value is the base cell's; an axis without one gets the config's value first.
    assert grid == {"bissl.gamma": [1.0, 0.01], "bissl.stages": [1, 2, 3]}
    # Each cell resolves to the config with exactly its own change.
    base = config_to_dict(load_config(TINY))
    for cell in cells:
        cfg = config_to_dict(load_config(TINY, cell.overrides()))
        for key, value in cell.values.items():
            assert config_value(cfg, key) == value
        changed = {k for k in cell.values if config_value(cfg, k) != config_value(base, k)}
        assert len(changed) == (0 if cell.name == BASE_CELL else 1)


def test_a_value_that_resolves_to_the_base_is_not_a_second_cell():
    cells, grid = validate_axes(TINY, {"bissl.lam": [1e-3, 0.1]}, [])
    assert [c.name for c in cells] == [BASE_CELL, "lam=0.1"]
    assert grid == {"bissl.lam": [1e-3, 0.1]}
    # 1 and 1.0 are two labels for gamma's base 1.0: the second would repeat the base cell.
    with pytest.raises(ConfigError, match="resolve to the same config"):
        validate_axes(TINY, {"bissl.gamma": [1, 1.0]}, [])


@pytest.mark.parametrize(
    "axes, message",
    [
        ({"bissl.nope": [1]}, "--axis bissl.nope=1"),
        ({"bissl.stages": [-1]}, "--axis bissl.stages=-1"),
        ({"run.seeds": [[1]]}, "use --seeds"),
        ({}, "--axis KEY"),
    ],
)
def test_bad_axes_fail_before_anything_runs(axes, message):
    with pytest.raises(ConfigError, match=message):
        validate_axes(TINY, axes, [])


def test_the_manifest_records_the_design_and_a_grid_sweep_is_not_continued_as_axes(tmp_path):
    plan = build_plan(TINY, {"bissl.lam": [0.1]}, seeds=1, design="axes")
    assert plan.to_json()["design"] == "axes" and plan.base_values == {"bissl.lam": 1e-3}
    assert build_plan(TINY, {"bissl.lam": [0.1]}, seeds=1).base_values is None
    with pytest.raises(ConfigError, match="sweep design"):
        build_plan(TINY, {"bissl.lam": [0.1]}, seeds=1, design="random")


def test_cli_refuses_grid_and_axis_together(tmp_path):
    import argparse

    args = argparse.Namespace(
        config=str(TINY),
        grid=["bissl.lam=0.1"],
        axis=["bissl.gamma=0.5"],
        set=[],
        seeds=1,
        out=str(tmp_path / "s"),
        resume=None,
        no_share=False,
        quiet=True,
    )
    with pytest.raises(ConfigError, match="not both"):
        cmd_sweep(args)


@pytest.fixture(scope="module")
def axes_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("axes") / "sweep"
    axes = {"bissl.gamma": [0.25], "bissl.upper_steps": [1, 3]}
    return run_sweep(TINY, axes, seeds=1, out=out, verbose=False, design="axes"), axes


def test_axes_sweep_runs_shares_and_resumes(axes_sweep, monkeypatch):
    result, axes = axes_sweep
    names = [s["cell"] for s in result.summary]
    assert names == [BASE_CELL, "gamma=0.25", "upper_steps=1", "upper_steps=3"]
    assert all(s["status"] == "done" for s in result.summary)
    # Only bissl.* keys vary: pretext and baseline come from the base cell, one baseline for all.
    manifest = json.loads((result.out / "sweep.json").read_text())
    assert manifest["design"] == "axes" and manifest["sharing"]["provider"] == BASE_CELL
    assert len({s["baseline_test_acc_mean"] for s in result.summary}) == 1
    # The BiSSL arm differs per cell (each is a real run of its own change).
    assert len({s["bissl_test_loss_mean"] for s in result.summary}) == len(names)
    # sweep.csv carries every axis's value on every row (the base filled in).
    header, *rows = (result.out / "sweep.csv").read_text().splitlines()
    assert header.split(",")[1:3] == ["bissl.gamma", "bissl.upper_steps"]
    assert {tuple(r.split(",")[:3]) for r in rows} == {
        (BASE_CELL, "1.0", "2"),
        ("gamma=0.25", "0.25", "2"),
        ("upper_steps=1", "1.0", "1"),
        ("upper_steps=3", "1.0", "3"),
    }
    # Rerun: nothing runs again; the same CLI axes continue the same sweep.
    import bissl.sweep.runner as runner

    def fail(*_a, **_k):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(runner, "run_experiment", fail)
    again = run_sweep(TINY, axes, seeds=1, out=result.out, verbose=False, design="axes")
    assert [s["bissl_test_acc_mean"] for s in again.summary] == [s["bissl_test_acc_mean"] for s in result.summary]
    with pytest.raises(ConfigError, match="design"):
        run_sweep(TINY, {"bissl.gamma": [1.0, 0.25]}, seeds=1, out=result.out, verbose=False)


def test_axes_panels_show_only_their_axis_and_the_base(axes_sweep):
    result, _ = axes_sweep
    fig = sensitivity_figure(result.plan.grid, result.summary, base=result.plan.base_values)
    gamma_ax, steps_ax = fig.axes
    # One BiSSL line per panel, through the base cell and that axis's cells only.
    gamma_lines = [line for line in gamma_ax.get_lines() if line.get_marker() == "o"]
    steps_lines = [line for line in steps_ax.get_lines() if line.get_marker() == "o"]
    assert len(gamma_lines) == 1 and len(steps_lines) == 1
    assert sorted(gamma_lines[0].get_xdata()) == [0.25, 1.0]
    assert sorted(steps_lines[0].get_xdata()) == [1.0, 2.0, 3.0]
