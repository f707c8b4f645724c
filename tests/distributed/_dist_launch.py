"""Run a rank program from this folder on two local ranks (shared by the distributed tests)."""

from __future__ import annotations

import io
from pathlib import Path

from bissl.distributed import launch

HERE = Path(__file__).parent
#: Wall-clock bound per launched job: a hung rank fails the test instead of stalling CI.
JOB_TIMEOUT_S = 150


def run_ranks(script: str, *args: str, nproc: int = 2, timeout_s: float = JOB_TIMEOUT_S) -> tuple[int, str]:
    """``(exit code, captured stderr of torchrun and the ranks)`` of ``script`` on ``nproc`` ranks."""
    log = io.StringIO()
    code = launch(nproc, [str(HERE / script), *args], timeout_s=timeout_s, stream=log)
    return code, log.getvalue()
