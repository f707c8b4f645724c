"""``bissl sweep`` through the sweep module's own parser (bissl.cli registers the same command)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bissl.sweep.runner as runner
from bissl.cli import build_parser, main
from bissl.sweep.cli import cmd_sweep
from bissl.trainer import NonFiniteLossError, RunInterrupted

TINY = Path(__file__).resolve().parents[1] / "trainer" / "tiny.yaml"


def test_help_has_options_and_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["sweep", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for word in (
        "--grid",
        "--set",
        "--seeds",
        "--out",
        "--resume",
        "--no-share",
        "examples:",
        "bissl sweep demo_digits --grid bissl.lam=1e-3,1e-2,1e-1 --seeds 3",
    ):
        assert word in text
    args = build_parser().parse_args(["sweep", "c.yaml", "--grid", "a.b=1,2", "--grid", "c.d=x"])
    assert args.grid == ["a.b=1,2", "c.d=x"] and args.func is cmd_sweep


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--grid", "bissl.lamda=1e-3"],
            "config error: --grid bissl.lamda=0.001: unknown key 'bissl.lamda' (did you mean 'lam'?)",
        ),
        (["--grid", "bissl.solver=cg,gmres"], "config error: --grid bissl.solver=gmres: 'bissl.solver' must be one of"),
        ([], "config error: give a CONFIG file and at least one --grid"),
        (["--grid", "bissl.lam=1e-3", "--seeds", "0"], "config error: --seeds must be >= 1, got 0"),
    ],
)
def test_bad_usage_is_one_line_and_runs_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "sweep"
    assert main(["sweep", str(TINY), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(message)
    assert not out.exists()


def test_resume_errors(tmp_path, capsys):
    assert main(["sweep", "--resume", str(tmp_path)]) == 2
    assert "is not a sweep directory (no sweep.json)" in capsys.readouterr().err
    assert main(["sweep", "--resume", str(tmp_path), "--grid", "bissl.lam=1"]) == 2
    assert "drop --grid" in capsys.readouterr().err


def test_resume_of_a_finished_sweep_reruns_nothing_and_prints_the_table(sweep_copy, capsys, monkeypatch):
    out = sweep_copy()
    monkeypatch.setattr(runner, "run_experiment", lambda *a: pytest.fail("a finished cell was rerun"))
    assert main(["sweep", "--resume", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "cell 1/2 lam=0.001: skipped" in text and "cell 2/2 lam=0.1: skipped" in text
    assert "BiSSL - baseline" in text and f"sensitivity: {out / 'sensitivity.png'}" in text


def test_default_out_interrupt_and_failure_exit_codes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def interrupted(cfg, run_dir):
        raise RunInterrupted("debug.stop_after_steps=1 reached")

    monkeypatch.setattr(runner, "run_experiment", interrupted)
    argv = ["sweep", str(TINY), "--grid", "bissl.lam=1e-3,1e-1", "--seeds", "2"]
    assert main(argv) == 130
    out = Path("runs") / "sweep_tiny"
    assert f"continue with: bissl sweep --resume {out}" in capsys.readouterr().err
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["grid"] == {"bissl.lam": [0.001, 0.1]} and manifest["seeds"] == [0, 1]
    assert manifest["cells"]["lam=0.1"]["overrides"][-1] == "baseline.enabled=false"

    def diverges(cfg, run_dir):
        raise NonFiniteLossError("non-finite loss (nan)")

    monkeypatch.setattr(runner, "run_experiment", diverges)
    assert main(argv) == 1  # the same command continues the sweep
    assert "2 cell(s) failed: lam=0.001, lam=0.1" in capsys.readouterr().err
