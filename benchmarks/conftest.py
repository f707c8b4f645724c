"""Shared benchmark helpers: machine description, per-session medians and ratios, peak memory.

Run: ``pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/<machine>.json``.
Each suite records its medians in :data:`MEDIANS`; ratios between two entries of the *same run*
are written to ``extra_info`` and to ``benchmarks/results/ratios-<suite>.json`` at session end,
and printed in the terminal summary. Suites that compare implementations (hypergradient, HVP vs
gradient) time them *interleaved* in one process, round by round, so machine load hits both alike;
each result carries the load average around it (:func:`load_info`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).parent / "results"
THREADS = int(os.environ.get("BISSL_BENCH_THREADS", "2"))


def machine() -> dict:
    """Device, CPU model, cores and library versions to store with every result (one definition:
    :func:`bissl.bench.machine_info`)."""
    from bissl.bench import machine_info

    return machine_info()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)
    yield


def load_info() -> dict:
    """1-minute load average and CPU count (:func:`bissl.bench.load_info`)."""
    from bissl.bench import load_info as info

    return info()


class Medians(dict):
    """``{(suite, key): median seconds}`` filled by benchmarks, read for ratios; ``ratios`` holds
    ``{(suite, key): ratio}`` of the same run."""

    def __init__(self) -> None:
        super().__init__()
        self.ratios: dict[tuple[str, str], float] = {}

    def record(self, suite: str, key: str, benchmark) -> float:
        median = float(benchmark.stats.stats.median)
        self[(suite, key)] = median
        benchmark.extra_info.update(machine())
        return median

    def record_value(self, suite: str, key: str, seconds: float) -> float:
        """Record a median measured outside pytest-benchmark's own timer (interleaved rounds)."""
        self[(suite, key)] = float(seconds)
        return float(seconds)

    def record_ratio(self, suite: str, key: str, ratio: float) -> float:
        self.ratios[(suite, key)] = float(ratio)
        return float(ratio)


MEDIANS = Medians()


@pytest.fixture(scope="session")
def medians():
    yield MEDIANS
    by_suite: dict[str, dict[str, dict[str, float]]] = {}
    for (suite, key), value in MEDIANS.items():
        by_suite.setdefault(suite, {"median_seconds": {}, "ratios": {}})["median_seconds"][key] = value
    for (suite, key), value in MEDIANS.ratios.items():
        by_suite.setdefault(suite, {"median_seconds": {}, "ratios": {}})["ratios"][key] = value
    RESULTS.mkdir(exist_ok=True)
    for suite, values in by_suite.items():
        path = RESULTS / f"ratios-{suite}.json"
        path.write_text(json.dumps({"machine": machine(), **load_info(), **values}, indent=2))


def pytest_terminal_summary(terminalreporter):
    """Print every recorded median and ratio, so a run's verdict is readable without the JSON."""
    if not MEDIANS:
        return
    terminalreporter.section("bissl medians and ratios (same run)")
    for (suite, key), value in sorted(MEDIANS.items()):
        terminalreporter.write_line(f"{suite:10s} {key:40s} {value * 1e3:12.2f} ms")
    for (suite, key), value in sorted(MEDIANS.ratios.items()):
        terminalreporter.write_line(f"{suite:10s} {key:40s} {value:12.3f}")


def peak_rss_delta_mb(module: str, func: str, *args: str) -> float:
    """Peak extra resident memory (MiB) of ``module.func(*args)`` in a fresh interpreter.

    The child builds its problem, records its high-water RSS (``VmHWM``), runs the measured call
    once, and reports the growth of ``VmHWM``: the peak memory the call added on top of the set-up.
    ``VmHWM`` rather than ``ru_maxrss``: on Linux ``ru_maxrss`` survives ``exec`` and starts at the
    (large) parent's value. CPU tensors bypass Python's allocator, so tracemalloc cannot see them.
    """
    hwm = "int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    code = (
        "import sys, importlib, torch; "
        f"torch.set_num_threads({THREADS}); "
        f"setup = getattr(importlib.import_module({module!r}), {func!r})(*sys.argv[1:]); "
        f"base = {hwm}; setup(); "
        f"print(({hwm} - base) / 1024)"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


# --- memory-bound vector ops (bench_cg_step.py): counted bytes and bandwidth ------------------


def vector_bytes(numel: int, dtype: torch.dtype, passes: int) -> int:
    """Bytes an ideal single pass moves: ``passes`` reads+writes of ``numel`` elements of ``dtype``."""
    return passes * numel * torch.empty((), dtype=dtype).element_size()


def record_bandwidth(benchmark, moved_bytes: int, copy_gbs: float | None = None) -> float:
    """Store achieved GB/s (counted bytes / median time) and its fraction of a measured copy."""
    gbs = moved_bytes / float(benchmark.stats.stats.median) / 1e9
    benchmark.extra_info.update({"bytes": moved_bytes, "gbs": gbs})
    if copy_gbs:
        benchmark.extra_info.update({"copy_gbs": copy_gbs, "fraction_of_copy": gbs / copy_gbs})
    return gbs


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` when a directory is given (``pytest benchmarks``; pytest's default
    pattern is ``test_*.py``). Files named on the command line are collected by pytest itself."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
