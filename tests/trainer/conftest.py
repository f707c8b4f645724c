"""Fixtures for the pipeline tests: the tiny config and one uninterrupted reference run."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from bissl.config import Config, load_config
from bissl.trainer import run_experiment

TINY = Path(__file__).with_name("tiny.yaml")


def _tiny(*overrides: str) -> Config:
    return load_config(TINY, list(overrides))


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., Config]:
    """``tiny_config("bissl.lam=0.1", ...)`` -> the tiny config with dotted overrides."""
    return _tiny


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> tuple[Path, dict]:
    """The tiny pipeline run once without interruption: ``(run_dir, results)``."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    return run_dir, run_experiment(_tiny(), run_dir)
