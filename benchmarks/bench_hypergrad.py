"""The 5-iteration hypergradient: ours vs the reference BiSSL-style loop, timed interleaved.

Ours: :func:`bissl.hypergrad.implicit_hypergrad` — linearise once (reverse over reverse with the
closed-form conv/BatchNorm/GELU second derivatives, first-order weight-gradient values skipped),
five matvecs, fused flat CG. Reference: :func:`bissl.hypergrad.reference_hypergrad` — forward +
``create_graph`` gradient + double backward on every CG iteration, per-tensor vector ops.

Same problem, λ = 1e-3, 5 iterations. Damping 10 as the reference code, except on ResNet-18: at
its random initialisation the Hessian has eigenvalues below −40, so with damping 10 (or 40) the
system ``I + H/(λ + damping)`` is indefinite, CG breaks down (ours stops, the reference divides by
``pᵀAp ≤ 0`` and goes on) and the two answers are not comparable. Damping 100 keeps the 5-step
Krylov space positive definite; the arithmetic timed is the same.

Timing: each round runs both, alternating which goes first, in this process; the speed-up is
``median(reference) / median(ours)`` (``extra_info`` also has every round's ratio and the load
average). The answers must agree: max relative difference ≤ 1e-5 (float32), asserted. Peak memory:
growth of the high-water RSS while one hypergradient runs, in a fresh process, for each.
``BISSL_BENCH_ROUNDS`` sets the rounds (default 5).
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from bissl.hypergrad import implicit_hypergrad, reference_hypergrad
from bissl.ops import flatten
from bissl.testing import named_problem

from conftest import load_info, machine, peak_rss_delta_mb

PROBLEMS = {"reference_cnn": (32, 10.0), "resnet18": (16, 100.0), "transformer": (16, 10.0)}  # batch, damping
ROUNDS = int(os.environ.get("BISSL_BENCH_ROUNDS", "5"))
MAX_REL_DIFF = 1e-5


def _kwargs(name: str) -> dict:
    return dict(lam=1e-3, damping=PROBLEMS[name][1], iters=5)


def make_call(name: str, impl: str):
    """Build the problem and return the zero-argument hypergradient call (also used for memory)."""
    prob = named_problem(name, batch=PROBLEMS[name][0])
    kw = _kwargs(name)
    if impl == "ours":
        # strict=False (report only): nothing raises mid-benchmark; the flags are recorded.
        return lambda: implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, strict=False, **kw)
    return lambda: reference_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, **kw)


def _max_rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_hypergradient(benchmark, medians, name):
    benchmark.group = "hypergrad"
    calls = {"ours": make_call(name, "ours"), "reference": make_call(name, "reference")}
    # Warm-up and the equal-result check in one go.
    answers = {impl: flatten(call()) for impl, call in calls.items()}
    rel = _max_rel_diff(answers["ours"], answers["reference"])
    prob = named_problem(name, batch=PROBLEMS[name][0])
    _, info = implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, strict=False, return_info=True,
                                 **_kwargs(name))
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    rounds_done = [0]

    def one_round():
        order = ("reference", "ours") if rounds_done[0] % 2 == 0 else ("ours", "reference")
        for impl in order:
            start = time.perf_counter()
            calls[impl]()
            times[impl].append(time.perf_counter() - start)
        rounds_done[0] += 1

    load_before = load_info()
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    ours = medians.record_value("hypergrad", f"{name}/ours", statistics.median(times["ours"]))
    ref = medians.record_value("hypergrad", f"{name}/reference", statistics.median(times["reference"]))
    speedup = medians.record_ratio("hypergrad", f"{name}/speedup_vs_reference", ref / ours)
    per_round = [r / o for o, r in zip(times["ours"], times["reference"])]
    benchmark.extra_info.update(machine())
    benchmark.extra_info.update({
        "timing": "one round = ours + reference, interleaved; see *_median_s",
        "ours_median_s": ours, "reference_median_s": ref, "speedup_vs_reference": speedup,
        "speedup_per_round": per_round, "ours_s": times["ours"], "reference_s": times["reference"],
        "max_rel_diff_vs_reference": rel, "damping": PROBLEMS[name][1], "batch": PROBLEMS[name][0],
        "solver_flags": info.summary(), "load_before": load_before, "load_after": load_info(),
        "peak_rss_delta_mb_ours": peak_rss_delta_mb("bench_hypergrad", "make_call", name, "ours"),
        "peak_rss_delta_mb_reference": peak_rss_delta_mb("bench_hypergrad", "make_call", name, "reference"),
    })
    assert not bool(info.indefinite), f"{name}: the benchmark system must be positive definite ({info.summary()})"
    assert rel <= MAX_REL_DIFF, f"{name}: ours and the reference differ by {rel:.2e} (max relative)"
