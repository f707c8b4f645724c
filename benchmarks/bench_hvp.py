"""Gradient vs HVP in each mode, on a ResNet-18-shaped CNN and a small transformer.

Reports the median time of one gradient, one HVP per mode (``fwdrev``, ``revrev``, ``autograd``,
each from scratch) and one matvec of the linearize-once operator, and each one's ratio to the
gradient measured in the same run (``benchmarks/results/ratios-hvp.json``).
"""
from __future__ import annotations

import pytest
import torch

from bissl.hypergrad import upper_gradient
from bissl.ops import flatten, hvp, linearize_hvp, unflatten
from bissl.testing import named_problem

PROBLEMS = {"resnet18": 16, "transformer": 16}  # name -> batch
OPS = ["grad", "hvp_fwdrev", "hvp_revrev", "hvp_autograd", "linearized_matvec"]
_cache: dict = {}


def _problem(name: str):
    if name not in _cache:
        prob = named_problem(name, batch=PROBLEMS[name])
        g = torch.Generator().manual_seed(1)
        v = {k: torch.randn(p.shape, generator=g) for k, p in prob.params.items()}
        _cache[name] = (prob, v)
    return _cache[name]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_hvp_vs_gradient(benchmark, medians, name, op):
    prob, v = _problem(name)
    benchmark.group = f"hvp-{name}"
    if op == "grad":
        fn = lambda: upper_gradient(prob.lower_loss, prob.params)  # noqa: E731
    elif op == "linearized_matvec":
        lin = linearize_hvp(prob.lower_loss, prob.params)
        vf = flatten(v)
        fn = lambda: lin(vf)  # noqa: E731
    else:
        mode = op.split("_", 1)[1]
        fn = lambda: hvp(prob.lower_loss, prob.params, v, mode=mode)  # noqa: E731
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
    median = medians.record("hvp", f"{name}/{op}", benchmark)
    grad = medians.get(("hvp", f"{name}/grad"))
    if grad:
        benchmark.extra_info["ratio_vs_grad"] = median / grad
    benchmark.extra_info["params"] = sum(p.numel() for p in prob.params.values())
    if op != "grad":  # check the answer while timing: every mode equals fwdrev
        ref = flatten(hvp(prob.lower_loss, prob.params, v, mode="fwdrev"))
        out = fn()
        got = out if isinstance(out, torch.Tensor) and out.dim() == 1 else flatten(out)
        benchmark.extra_info["max_rel_diff_vs_fwdrev"] = float((got - ref).abs().max() / ref.abs().max())
