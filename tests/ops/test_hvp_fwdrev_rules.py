"""Forward-over-reverse rules (division by a number, cross_entropy) and the FastSecondOrder mode:
bit-identical values, HVPs equal to torch.func's on the stock ops (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bissl.ops.fast_second_order import FastSecondOrder
from bissl.ops.hvp import _dual_number_hvp

F64 = torch.float64


def _stock_hvp(loss_fn, params, v):
    return torch.func.jvp(torch.func.grad(loss_fn), (params,), (v,))[1]


def _check(loss_fn, params):
    v = {k: torch.randn_like(p) for k, p in params.items()}
    expected = _stock_hvp(loss_fn, params, v)
    got = _dual_number_hvp(loss_fn, params, v)
    for k in params:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"reduction": "sum"}, {"reduction": "none"}, {"ignore_index": 1}, {"weight": "w"}],
    ids=["mean", "sum", "none", "ignore_index", "weight"],
)
def test_cross_entropy_rule(kwargs):
    x = torch.randn(6, 5, dtype=F64)
    target = torch.tensor([0, 1, 4, 2, 1, 3])
    kw = dict(kwargs)
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(5, dtype=F64) + 0.5
    stock = F.cross_entropy(x, target, **kw)
    with FastSecondOrder("forward"), torch.enable_grad():
        assert torch.equal(F.cross_entropy(x.clone().requires_grad_(), target, **kw), stock)
    scale = torch.randn(6, dtype=F64) if kw.get("reduction") == "none" else None

    def loss_fn(p):
        out = F.cross_entropy(torch.tanh(p["a"]) * 3.0, target, **kw)
        return (out * scale).sum() if scale is not None else out

    _check(loss_fn, {"a": x})


def test_cross_entropy_rule_values_are_the_fused_ops():
    x = torch.randn(4, 7, dtype=torch.float32, requires_grad=True)
    t = torch.tensor([6, 0, 3, 3])
    with FastSecondOrder("forward"):
        ours = F.cross_entropy(x, t)
    assert torch.equal(ours, F.cross_entropy(x, t))
    with FastSecondOrder("forward"):
        smoothed = F.cross_entropy(x, t, label_smoothing=0.1)  # not rerouted: falls back to the stock op
    assert torch.equal(smoothed, F.cross_entropy(x, t, label_smoothing=0.1))


def test_division_by_a_number_rule():
    x = torch.randn(3, 4, dtype=F64)
    with FastSecondOrder("forward"), torch.enable_grad():
        y = x.clone().requires_grad_()
        assert torch.equal(y / 3.0, x / 3.0) and torch.equal(torch.div(y, 7), x / 7)
    _check(lambda p: (torch.sin(p["a"] / 3.0) / 7).pow(2).sum() + (p["a"] / p["a"].sum()).sum(), {"a": x})


def test_fast_second_order_rejects_an_unknown_direction():
    with pytest.raises(ValueError, match="direction"):
        FastSecondOrder("sideways")
