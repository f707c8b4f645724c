"""One tiny sweep shared by the tests that need finished cells (two bissl.lam values, two seeds)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from bissl.sweep import SweepResult, run_sweep

TINY = Path(__file__).resolve().parent.parent / "trainer" / "tiny.yaml"
GRID = {"bissl.lam": [1e-3, 1e-1]}
SEEDS = 2


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> SweepResult:
    """The tiny config swept over bissl.lam (pretext and baseline shared by the two cells).

    Tests must not change this directory; copy it with ``sweep_copy`` first.
    """
    out = tmp_path_factory.mktemp("sweep") / "lam"
    return run_sweep(TINY, GRID, seeds=SEEDS, out=out, verbose=False)


@pytest.fixture
def sweep_copy(tiny_sweep, tmp_path) -> Callable[[], Path]:
    """``sweep_copy()`` -> a private copy of the finished tiny sweep directory."""

    def copy() -> Path:
        dst = tmp_path / "copy"
        shutil.copytree(tiny_sweep.out, dst)
        return dst

    return copy
