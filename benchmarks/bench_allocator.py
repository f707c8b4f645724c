"""What a matvec's fresh output costs on CPU: page faults of large allocations, and how much of the
CG-forms comparison (``bench_cg_forms.py``) they take.

An HVP, or any matvec written ``lambda v: d * v``, returns a newly allocated tensor on every call.
PyTorch's CPU allocator takes it from glibc ``malloc``, which serves blocks above its mmap
threshold (at most 32 MiB on 64-bit Linux) with a fresh ``mmap``: every 4 KiB page of the result
faults and is zeroed by the kernel on first touch, and ``free`` unmaps it again, so the next call
pays the same. ResNet-18's 11.2 M float32 values (45 MB) as one flat tensor always take that path;
as 60 per-tensor blocks, the ones above the threshold do.

Each setting runs in a child process (glibc reads its tuning variables at start-up), timing the
same calls interleaved round by round (:func:`bissl.bench.interleaved_rounds`):

* ``matvec_flat`` / ``matvec_tuple``: ``d * v`` on the flat vector / per tensor, fresh output;
* ``matvec_flat_out``: the flat product into a preallocated buffer (``out=``): no allocation;
* ``cg_flat`` / ``cg_tuple`` / ``cg_dict``: :func:`bissl.solvers.cg_solve`, 10 iterations, with
  the matvec in that form; ``cg_flat_ws`` / ``cg_tuple_ws`` / ``cg_dict_ws``: the same with a
  :class:`~bissl.solvers.Workspace` kept across calls (no per-solve work buffers);
  ``authors_tuple``: the authors' tuple loop (:func:`bissl.hypergrad.authors_cg_solver`) with the
  tuple matvec.

Settings: ``default`` (glibc as installed) and ``malloc_no_mmap`` (``MALLOC_MMAP_MAX_=0`` and
``MALLOC_TRIM_THRESHOLD_`` = 4 GB: large blocks come from the heap and freed ones are reused,
never returned to the kernel). Minor page faults per call come from ``getrusage``. Results: JSON
via ``--benchmark-json`` (``extra_info``); ``benchmarks/make_tables.py`` writes them into the
README's performance section.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ITERS = 10
ROUNDS = int(os.environ.get("BISSL_BENCH_ROUNDS", "7"))
#: The child-process environments compared (added to the parent's environment).
SETTINGS = {
    "default": {},
    "malloc_no_mmap": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "4000000000"},
}


def _child(rounds: int, threads: int) -> dict:
    """Runs in the child process: the timings and page faults of every call, as a dict."""
    import resource

    import torch
    from bench_cg_forms import _problem  # the CG-forms suite's problem (this file's folder is on sys.path)

    from bissl.bench import interleaved_rounds
    from bissl.hypergrad import authors_cg_solver
    from bissl.solvers import Workspace, cg_solve

    torch.set_num_threads(threads)
    prob = _problem()
    b = prob["b"]
    b_tuple = tuple(b.values())
    b_flat = torch.cat([t.reshape(-1) for t in b_tuple])
    buf = torch.empty_like(b_flat)
    mv_flat, mv_tuple, mv_dict = (prob["matvec"][form] for form in ("flat", "tuple", "dict"))
    d_flat = torch.cat([t.reshape(-1) for t in prob["d"].values()])
    spaces = {form: Workspace() for form in ("flat", "tuple", "dict")}
    calls = {
        "matvec_flat": lambda: mv_flat(b_flat),
        "matvec_tuple": lambda: mv_tuple(b_tuple),
        "matvec_flat_out": lambda: torch.mul(d_flat, b_flat, out=buf),
        "cg_flat": lambda: cg_solve(mv_flat, b_flat, iters=ITERS),
        "cg_tuple": lambda: cg_solve(mv_tuple, b_tuple, iters=ITERS),
        "cg_dict": lambda: cg_solve(mv_dict, b, iters=ITERS),
        "cg_flat_ws": lambda: cg_solve(mv_flat, b_flat, iters=ITERS, workspace=spaces["flat"]),
        "cg_tuple_ws": lambda: cg_solve(mv_tuple, b_tuple, iters=ITERS, workspace=spaces["tuple"]),
        "cg_dict_ws": lambda: cg_solve(mv_dict, b, iters=ITERS, workspace=spaces["dict"]),
        "authors_tuple": lambda: authors_cg_solver(mv_tuple, b_tuple, iters=ITERS, layerwise=False, guard=None),
    }
    faults = {}
    for name, call in calls.items():  # warm-up, and the page faults of one call
        call()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        call()
        faults[name] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    times = interleaved_rounds(calls, rounds)
    return {
        "median_s": {k: statistics.median(t) for k, t in times.items()},
        "per_round_s": times,
        "minor_faults_per_call": faults,
        "params": int(b_flat.numel()),
        "loadavg_1m": os.getloadavg()[0],
    }


def measure(rounds: int = ROUNDS, threads: int = 2) -> dict[str, dict]:
    """Every setting of :data:`SETTINGS` in its own child process: ``{setting: child result}``."""
    out = {}
    for name, extra in SETTINGS.items():
        env = {**os.environ, **extra}
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(rounds), str(threads)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"setting {name}: child failed:\n{proc.stderr[-2000:]}")
        out[name] = {**json.loads(proc.stdout.splitlines()[-1]), "env": extra}
    return out


def test_fresh_output_page_faults_and_cg_forms(benchmark):
    from bissl.bench import machine_info

    benchmark.group = "allocator"
    result: dict[str, dict] = {}

    def run() -> None:
        result.update(measure())

    benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    for r in result.values():
        med = r["median_s"]
        forms = ("flat", "tuple", "dict", "flat_ws", "tuple_ws", "dict_ws")
        r["speedup_vs_authors"] = {f: med["authors_tuple"] / med[f"cg_{f}"] for f in forms}
        r["matvec_share_of_authors"] = ITERS * med["matvec_tuple"] / med["authors_tuple"]
    benchmark.extra_info.update(machine_info())
    benchmark.extra_info.update({"iters": ITERS, "rounds": ROUNDS, "settings": result})
    # The page faults are the mechanism: the flat fresh output faults on (nearly) every page by
    # default and not at all once freed blocks are reused.
    pages = result["default"]["params"] * 4 // 4096
    assert result["default"]["minor_faults_per_call"]["matvec_flat"] > 0.9 * pages
    assert result["malloc_no_mmap"]["minor_faults_per_call"]["matvec_flat"] < 0.01 * pages


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    print(json.dumps(_child(int(sys.argv[2]), int(sys.argv[3]))))
