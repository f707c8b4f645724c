"""The command line through ``python -m bissl`` in subprocesses (as a user runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = Path(__file__).resolve().parent / "trainer" / "tiny.yaml"


def bissl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "bissl", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_help_lists_commands():
    out = bissl("--help")
    assert out.returncode == 0
    for command in ("run", "demo", "config", "env", "sweep"):
        assert command in out.stdout
    run_help = bissl("run", "--help")
    assert run_help.returncode == 0 and "--resume" in run_help.stdout and "--set" in run_help.stdout
    assert bissl().returncode == 2  # a command is required


def test_config_errors_are_one_line(tmp_path):
    out = bissl("run", str(TINY), "--set", "bissl.lamda=0.1", "--out", str(tmp_path / "r"))
    assert out.returncode == 2
    assert out.stderr.strip() == "config error: unknown key 'bissl.lamda' (did you mean 'lam'?)"
    out = bissl("config", "--set", "bissl.cg_iters=-1")
    assert out.returncode == 2 and out.stderr.strip() == "config error: 'bissl.cg_iters' must be >= 0, got -1"
    out = bissl("run", "--resume", str(tmp_path / "nothing"))
    assert out.returncode == 2 and "not a run directory" in out.stderr
    assert not (tmp_path / "r").exists()


def test_config_prints_resolved_defaults():
    out = bissl("config", "--set", "bissl.lam=0.01")
    assert out.returncode == 0
    assert "lam: 0.01" in out.stdout and "damping: 10.0" in out.stdout


def test_packaged_config_by_name_from_any_directory(tmp_path):
    """The demo configs are package data: found by bare name wherever the command runs."""
    out = bissl("config", "reference_imagenet_resnet50", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "backbone: resnet50" in out.stdout
    assert "demo_digits" in bissl("run", "--help").stdout


def test_env_reports_versions():
    out = bissl("env")
    assert out.returncode == 0 and "torch" in out.stdout and "threads" in out.stdout
    assert "extras:" in out.stdout and "  distributed " in out.stdout


@pytest.mark.slow
def test_run_killed_then_resumed_matches_uninterrupted(tmp_path):
    """A process killed without cleanup (os._exit after 9 steps) resumes to the same results."""
    full = bissl("run", str(TINY), "--out", str(tmp_path / "full"), "--quiet")
    assert full.returncode == 0, full.stderr
    assert "mean ± std" in full.stdout and "BiSSL" in full.stdout
    killed = bissl(
        "run",
        str(TINY),
        "--out",
        str(tmp_path / "killed"),
        "--quiet",
        "--set",
        "debug.stop_after_steps=9",
        "--set",
        "debug.stop_mode=exit",
    )
    assert killed.returncode == 75 and not (tmp_path / "killed" / "results.json").exists()
    resumed = bissl("run", "--resume", str(tmp_path / "killed"), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a = json.loads((tmp_path / "full" / "results.json").read_text())
    b = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert a["per_seed"] == b["per_seed"]
    assert (tmp_path / "killed" / "curves.png").exists()
