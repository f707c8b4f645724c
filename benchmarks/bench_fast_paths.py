"""Each fast path of the linearised HVP on and off: a linearisation plus five matvecs, interleaved.

The defaults of :func:`bissl.ops.linearize_hvp` come from this A/B: for every benchmark network of
``bench_hypergrad.py`` the work a 5-iteration hypergradient spends on its Hessian (one
linearisation, five matvecs over it) is timed with the defaults (``base``) and with one switch
flipped, in interleaved rounds. ``ratio_to_base`` < 1 means the flipped setting is faster.
Switches: ``channels_last`` (channels-last convolutions; off by default),
``fast_linear`` (rerouted 2-D ``linear`` with graph-only weight gradients; on),
``fast_activations`` (closed-form tanh/ReLU/SiLU/softmax double backwards; off),
``fast_gelu_layernorm`` (closed-form GELU and LayerNorm; on).
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch
from bench_hypergrad import PROBLEMS

from bissl.bench import interleaved_rounds, less_accurate, load_info, machine_info, rel_error
from bissl.ops import hvp, linearize_hvp

ROUNDS = int(os.environ.get("BISSL_BENCH_ROUNDS", "7"))
#: network -> the switches worth flipping on it (the ops it has).
FLIPS = {
    "reference_cnn": ("channels_last",),
    "resnet18": ("channels_last",),
    "plain_cnn": ("channels_last", "fast_activations"),
    "mlp": ("fast_linear", "fast_activations"),
    "vit_tiny": ("fast_activations", "fast_gelu_layernorm"),
}
DEFAULTS = {"channels_last": False, "fast_linear": True, "fast_activations": False, "fast_gelu_layernorm": True}
SELECTED = [p for p in os.environ.get("BISSL_BENCH_PROBLEMS", ",".join(FLIPS)).split(",") if p in FLIPS]


@pytest.mark.parametrize("name", SELECTED)
def test_fast_path_switches(benchmark, medians, name):
    benchmark.group = "fast_paths"
    build, batch, _ = PROBLEMS[name]
    prob = build(batch)
    g = torch.Generator().manual_seed(1)
    direction = tuple(torch.randn(t.shape, generator=g) for t in prob.params.values())
    variants = {"base": {}}
    for switch in FLIPS[name]:
        variants[f"{switch}={not DEFAULTS[switch]}"] = {switch: not DEFAULTS[switch]}

    def solve_work(kw: dict):
        op = linearize_hvp(prob.lower_loss, prob.params, need_grad=False, **kw)
        return [op.hv_pieces(direction) for _ in range(5)][-1]

    answers = {k: torch.cat([t.reshape(-1) for t in solve_work(kw)]) for k, kw in variants.items()}
    rel = {k: float((a - answers["base"]).abs().max() / answers["base"].abs().max()) for k, a in answers.items()}
    # The exact answer: the same problem in float64 through the plain double backward.
    prob64 = build(batch, dtype=torch.float64)
    v64 = {k: d.double() for k, d in zip(prob64.params, direction)}
    exact = torch.cat([t.reshape(-1) for t in hvp(prob64.lower_loss, prob64.params, v64, mode="autograd").values()])
    errors = {k: rel_error(a, exact) for k, a in answers.items()}
    calls = {k: (lambda kw=kw: solve_work(kw)) for k, kw in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in calls}
    done = [0]

    def one_round():
        for k, t in interleaved_rounds(calls, 1, first_round=done[0]).items():
            times[k].extend(t)
        done[0] += 1

    load_before = load_info()
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    med = {k: statistics.median(t) for k, t in times.items()}
    ratios = {k: med[k] / med["base"] for k in med}
    for k, r in ratios.items():
        if k != "base":
            medians.record_ratio("fast_paths", f"{name}/{k}", r)
    benchmark.extra_info.update(machine_info())
    benchmark.extra_info.update(
        {
            "problem": name,
            "defaults": DEFAULTS,
            "median_s": med,
            "ratio_to_base": ratios,
            "per_round_s": times,
            "max_rel_diff_vs_base": rel,
            "rel_error_vs_float64": errors,
            "load_before": load_before,
            "load_after": load_info(),
        }
    )
    # Every setting as accurate as the others (within 2×, or 1e-4) against float64.
    worse = less_accurate(errors, reference=min(errors, key=errors.__getitem__), factor=2.0, floor=1e-4)
    assert not worse, f"{name}: a fast-path setting is less accurate against float64: {errors}"
