"""Closed-form tanh/relu/silu/softmax double backwards vs stock autograd and dense Hessians (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bissl.ops import linearize_hvp
from bissl.ops.activation_double_backward import activation, softmax
from bissl.ops.fast_second_order import FastSecondOrder
from bissl.testing import dense_hessian

F64 = torch.float64
STOCK = {"tanh": torch.tanh, "relu": torch.relu, "silu": F.silu, "softmax": lambda x: torch.softmax(x, -1)}
OURS = {
    "tanh": lambda x: activation(x, "tanh"),
    "relu": lambda x: activation(x, "relu"),
    "silu": lambda x: activation(x, "silu"),
    "softmax": lambda x: softmax(x, -1),
}


def _double_backward(f, x, gy, u):
    """``(∂/∂x, ∂/∂gy)`` of ``⟨u, gx⟩`` where ``gx = ∂⟨gy, f(x)⟩/∂x`` (built with create_graph)."""
    x = x.clone().requires_grad_(True)
    gy = gy.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(f(x), x, gy, create_graph=True)
    return torch.autograd.grad(gx, (x, gy), u, allow_unused=True)


@pytest.mark.parametrize("name", sorted(STOCK))
def test_first_and_second_derivatives_equal_autograd(name):
    g = torch.Generator().manual_seed(0)
    x, gy, u = (torch.randn(5, 7, generator=g, dtype=F64) for _ in range(3))
    torch.testing.assert_close(OURS[name](x), STOCK[name](x), rtol=0, atol=0)  # same kernel
    xs = x.clone().requires_grad_(True)
    xo = x.clone().requires_grad_(True)
    torch.testing.assert_close(
        torch.autograd.grad(OURS[name](xo), xo, gy)[0],
        torch.autograd.grad(STOCK[name](xs), xs, gy)[0],
        rtol=1e-14,
        atol=0,
    )
    ours = _double_backward(OURS[name], x, gy, u)
    stock = _double_backward(STOCK[name], x, gy, u)
    for a, b, what in zip(ours, stock, ("d/dx", "d/dgy")):
        if a is None or b is None:  # relu: f'' = 0, neither side forms a nonzero d/dx
            assert name == "relu" and what == "d/dx"
            assert a is None and (b is None or not bool(b.any()))
            continue
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"{name} {what}")


def test_third_derivatives_are_refused():
    x = torch.randn(4, dtype=F64, requires_grad=True)
    (gx,) = torch.autograd.grad(activation(x, "tanh").sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="third derivatives"):
        torch.autograd.grad(gx.sum(), x, create_graph=True)


class _Net(nn.Module):
    """Linear → tanh → Linear → relu → Linear → silu → attention-like softmax mixing."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = F.silu(self.l3(torch.relu(self.l2(torch.tanh(self.l1(x))))))
        att = (h @ h.T).softmax(-1)
        return att @ h


def _problem():
    torch.manual_seed(0)
    net = _Net().double()
    x = torch.randn(5, 4, dtype=F64)
    params = {k: p.detach().clone() for k, p in net.named_parameters()}

    def loss(p):
        return (torch.func.functional_call(net, p, (x,)) ** 2).sum().sin()

    return loss, params


def test_linearized_hvp_with_every_activation_matches_the_dense_hessian():
    loss, params = _problem()
    H = dense_hessian(loss, params)
    op = linearize_hvp(loss, params, fast_activations=True)
    stock = linearize_hvp(loss, params, fast_activations=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(H.shape[0], generator=g, dtype=F64)
        expected = H @ v
        assert float((op(v) - expected).norm() / expected.norm()) <= 1e-11
        assert float((op(v) - stock(v)).norm() / expected.norm()) <= 1e-12


def test_routes_only_under_reverse_and_grad():
    x = torch.randn(3, dtype=F64, requires_grad=True)
    with FastSecondOrder("reverse"):  # by default only SiLU's closed form
        assert type(torch.tanh(x).grad_fn).__name__ == "TanhBackward0"
        assert type(x.softmax(0).grad_fn).__name__ == "SoftmaxBackward0"
        assert type(F.silu(x).grad_fn).__name__ == "_ActivationBackward"
    with FastSecondOrder("reverse", activations=("tanh",)):
        assert type(torch.tanh(x).grad_fn).__name__ == "_ActivationBackward"
        assert type(F.silu(x).grad_fn).__name__ == "SiluBackward0"
    with FastSecondOrder("reverse", activations=False):
        assert type(F.silu(x).grad_fn).__name__ == "SiluBackward0"
    with FastSecondOrder("reverse", activations=True):
        assert type(torch.tanh(x).grad_fn).__name__ == "_ActivationBackward"
        assert type(F.relu(x, inplace=False).grad_fn).__name__ == "_ActivationBackward"
        assert type(F.silu(x).grad_fn).__name__ == "_ActivationBackward"
        assert type(x.softmax(0).grad_fn).__name__ == "_SoftmaxBackward"
        assert type(F.softmax(x, 0, dtype=F64).grad_fn).__name__ == "SoftmaxBackward0"  # dtype: stock
        with torch.no_grad():
            assert torch.relu(x).grad_fn is None  # no graph: the stock op
    with FastSecondOrder("forward", activations=True):
        assert type(torch.tanh(x).grad_fn).__name__ == "TanhBackward0"


def test_activation_names_are_checked():
    with pytest.raises(ValueError, match=r"unknown activation\(s\) \['gelu'\]"):
        FastSecondOrder("reverse", activations=("silu", "gelu"))
    with pytest.raises(TypeError, match="a bool or a collection of names"):
        FastSecondOrder("reverse", activations="silu")
