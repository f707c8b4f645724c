"""The CUDA kernels (csrc/cuda) compile with nvcc; their torch binding type-checks.

A torch CUDA extension cannot link against the CPU torch wheel, so without a GPU we only compile
(csrc/cuda/compile_check.sh, also ``make cuda-check``); GPU machines load them with
``bissl.ops._backends.load_cuda_extension``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "csrc" / "cuda" / "compile_check.sh"


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("nvcc") is None,
    reason="nvcc not found: the CUDA compile check needs the CUDA toolkit",
)
def test_cuda_sources_compile():
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    compiled = [line for line in proc.stdout.splitlines() if line.startswith("cuda-check: ok")]
    n_cu = len(list(SCRIPT.parent.glob("*.cu")))
    assert len(compiled) == 2 * n_cu + 1, proc.stdout  # two architectures per .cu, plus the binding
