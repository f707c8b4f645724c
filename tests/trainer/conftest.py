"""Fixtures for the pipeline tests: the tiny config and one uninterrupted reference run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bissl.config import Config, load_config
from bissl.trainer import run_experiment
from bissl.trainer.checkpoint import load_checkpoint
from bissl.trainer.metrics import read_metrics

TINY = Path(__file__).with_name("tiny.yaml")


def _tiny(*overrides: str) -> Config:
    return load_config(TINY, list(overrides))


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., Config]:
    """``tiny_config("bissl.lam=0.1", ...)`` -> the tiny config with dotted overrides."""
    return _tiny


PHASES = ("pretext", "bissl", "finetune_bissl", "finetune_baseline")


def snapshot(run_dir: Path) -> dict:
    """What a finished tiny run leaves: each phase's result and the metrics rows (minus wall time)."""
    ckpts = run_dir / "seed_0" / "checkpoints"
    out = {phase: load_checkpoint(ckpts / f"{phase}.done.pt")["result"] for phase in PHASES}
    out["rows"] = [
        {k: v for k, v in r.items() if k != "wall_s"} for r in read_metrics(run_dir / "seed_0" / "metrics.csv")
    ]
    return out


@pytest.fixture(scope="session")
def take_snapshot() -> Callable[[Path], dict]:
    """``take_snapshot(run_dir)`` -> each phase's result and the metrics rows of seed 0."""
    return snapshot


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> tuple[Path, dict, dict]:
    """The tiny pipeline run once without interruption: ``(run_dir, results, snapshot)``.

    The snapshot is kept in memory so comparisons do not depend on the directory surviving the
    session (concurrent pytest sessions may prune old temporary directories).
    """
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    results = run_experiment(_tiny(), run_dir)
    return run_dir, results, snapshot(run_dir)
