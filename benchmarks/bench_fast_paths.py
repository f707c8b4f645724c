"""Each fast path of the linearised HVP on and off: a linearisation plus five matvecs, interleaved.

The defaults of :func:`bissl.ops.linearize_hvp` come from this A/B: for every benchmark network of
``bench_hypergrad.py`` the work a 5-iteration hypergradient spends on its Hessian (one
linearisation, five matvecs over it) is timed with the defaults (``base``) and with one switch
flipped, in interleaved rounds. ``ratio_to_base`` < 1 means the flipped setting is faster.
Switches: ``channels_last`` (channels-last convolutions; off by default),
``fast_linear`` (rerouted ``linear`` with graph-only weight gradients; on),
``fast_activations`` (closed-form tanh/ReLU/SiLU/softmax double backwards; SiLU's only by
default; flipped to all of them, or on the SiLU MLP to none),
``fast_gelu_layernorm`` (closed-form GELU and LayerNorm; on), ``second_order_kernels`` (the C++
CPU kernels of those closed forms, ``bissl::layer_norm_double_backward`` and
``bissl::gelu_backward_and_curvature``; on where ``bissl._C`` is loaded, off = their torch
references).
"""

from __future__ import annotations

import contextlib
import os
import statistics

import pytest
import torch
from bench_hypergrad import PROBLEMS

import bissl.ops.gelu_double_backward as gelu_module
import bissl.ops.layernorm_double_backward as ln_module
from bissl.bench import interleaved_rounds, less_accurate, load_info, machine_info, rel_error
from bissl.ops import hvp, linearize_hvp
from bissl.ops.fast_second_order import DEFAULT_ACTIVATIONS

ROUNDS = int(os.environ.get("BISSL_BENCH_ROUNDS", "7"))
#: network -> the switches worth flipping on it (the ops it has), each with its flipped value.
FLIPS: dict[str, tuple[tuple[str, object], ...]] = {
    "reference_cnn": (("channels_last", True),),
    "resnet18": (("channels_last", True),),
    "plain_cnn": (("channels_last", True), ("fast_activations", True)),
    "mlp": (("fast_linear", False), ("fast_activations", False)),
    "vit_tiny": (("fast_activations", True), ("fast_gelu_layernorm", False), ("second_order_kernels", False)),
    "transformer": (("second_order_kernels", False),),
}
DEFAULTS: dict[str, object] = {
    "channels_last": False,
    "fast_linear": True,
    "fast_activations": list(DEFAULT_ACTIVATIONS),
    "fast_gelu_layernorm": True,
    "second_order_kernels": True,
}


@contextlib.contextmanager
def _second_order_kernels(enabled: bool):
    """With ``enabled=False``, the torch references of the LayerNorm and GELU second-order ops run
    in place of the ops (whose CPU kernel is the C++ one when ``bissl._C`` is loaded)."""
    if enabled:
        yield
        return
    saved = ln_module.layer_norm_double_backward, gelu_module._backward_and_curvature
    ln_module.layer_norm_double_backward = ln_module.layer_norm_double_backward_ref
    gelu_module._backward_and_curvature = lambda gy, x, d1, approximate: (
        gy * d1,
        gy * gelu_module.gelu_second_derivative(x, approximate),
    )
    try:
        yield
    finally:
        ln_module.layer_norm_double_backward, gelu_module._backward_and_curvature = saved


SELECTED = [p for p in os.environ.get("BISSL_BENCH_PROBLEMS", ",".join(FLIPS)).split(",") if p in FLIPS]


@pytest.mark.parametrize("name", SELECTED)
def test_fast_path_switches(benchmark, medians, name):
    benchmark.group = "fast_paths"
    build, batch, _ = PROBLEMS[name]
    prob = build(batch)
    g = torch.Generator().manual_seed(1)
    direction = tuple(torch.randn(t.shape, generator=g) for t in prob.params.values())
    variants = {"base": {}}
    for switch, flipped in FLIPS[name]:
        variants[f"{switch}={flipped}"] = {switch: flipped}

    def solve_work(kw: dict):
        kw = dict(kw)
        with _second_order_kernels(kw.pop("second_order_kernels", True)):
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
