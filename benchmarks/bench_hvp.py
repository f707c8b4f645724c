"""Gradient vs HVP in each mode, on a ResNet-18-shaped CNN and a small transformer, interleaved.

Each round times, in this process and in turn: one gradient, one HVP per mode (``fwdrev``,
``revrev``, ``autograd``, each from scratch) and one matvec of the linearise-once operator. The
ratio of each to the gradient is ``median(op) / median(gradient)`` over the rounds (also per round
in ``extra_info``); the target is ≤ 3.5 for every mode. Every mode's answer is checked against the
float64 HVP of the same problem (cast): no mode may be more than twice as far from it as the
plain double backward (``autograd``), or 1e-4. The difference to ``fwdrev`` is recorded too.
``BISSL_BENCH_ROUNDS`` sets the rounds (default 7).
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from conftest import load_info, machine

from bissl.bench import less_accurate, rel_error
from bissl.hypergrad import upper_gradient
from bissl.ops import flatten, hvp, linearize_hvp
from bissl.testing import named_problem

PROBLEMS = {"resnet18": 16, "transformer": 16}  # name -> batch
MODES = ("fwdrev", "revrev", "autograd")
ROUNDS = int(os.environ.get("BISSL_BENCH_ROUNDS", "7"))
ACCURACY_FACTOR, ACCURACY_FLOOR = 2.0, 1e-4  # see the module docstring


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_hvp_vs_gradient(benchmark, medians, name):
    benchmark.group = "hvp"
    prob = named_problem(name, batch=PROBLEMS[name])
    g = torch.Generator().manual_seed(1)
    v = {k: torch.randn(p.shape, generator=g) for k, p in prob.params.items()}
    lin = linearize_hvp(prob.lower_loss, prob.params)
    vf = flatten(v)
    ops = {"grad": lambda: upper_gradient(prob.lower_loss, prob.params)}
    for mode in MODES:
        ops[f"hvp_{mode}"] = lambda mode=mode: hvp(prob.lower_loss, prob.params, v, mode=mode)
    ops["linearized_matvec"] = lambda: lin(vf)
    # Warm-up and the equal-result check.
    ref = flatten(ops["hvp_fwdrev"]())
    prob64 = named_problem(name, batch=PROBLEMS[name], dtype=torch.float64)
    exact = flatten(hvp(prob64.lower_loss, prob64.params, {k: t.double() for k, t in v.items()}, mode="fwdrev"))
    rel, errors = {}, {}
    for key, op in ops.items():
        out = op()
        if key != "grad":
            got = out if isinstance(out, torch.Tensor) else flatten(out)
            rel[key] = float((got - ref).abs().max() / ref.abs().max())
            errors[key] = rel_error(got, exact)
    times: dict[str, list[float]] = {k: [] for k in ops}

    def one_round():
        for key, op in ops.items():
            start = time.perf_counter()
            op()
            times[key].append(time.perf_counter() - start)

    load_before = load_info()
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    med = {k: medians.record_value("hvp", f"{name}/{k}", statistics.median(t)) for k, t in times.items()}
    ratios = {k: medians.record_ratio("hvp", f"{name}/{k}_over_grad", med[k] / med["grad"]) for k in ops if k != "grad"}
    benchmark.extra_info.update(machine())
    benchmark.extra_info.update(
        {
            "timing": "one round = gradient + every HVP + one matvec, interleaved; see median_s",
            "median_s": med,
            "ratio_vs_grad": ratios,
            "ratio_vs_grad_per_round": {k: [t / g for t, g in zip(times[k], times["grad"])] for k in ratios},
            "max_rel_diff_vs_fwdrev": rel,
            "rel_error_vs_float64": errors,
            "params": sum(p.numel() for p in prob.params.values()),
            "load_before": load_before,
            "load_after": load_info(),
        }
    )
    bad = less_accurate(errors, reference="hvp_autograd", factor=ACCURACY_FACTOR, floor=ACCURACY_FLOOR)
    assert not bad, f"{name}: HVP routes less accurate than the plain double backward against float64: {errors}"
