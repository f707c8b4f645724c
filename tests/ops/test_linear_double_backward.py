"""The rerouted ``linear`` and channels-last convolutions: same derivatives as autograd (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bissl.ops import linearize_hvp
from bissl.ops.conv_double_backward import WeightGradPolicy, reroute_conv2d
from bissl.ops.linear_double_backward import reroute_linear
from bissl.testing import cnn_problem, dense_hessian, mlp_problem

F64 = torch.float64


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4), (2, 2, 3, 4), "transposed"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_first_and_second_derivatives_equal_autograd(shape, bias):
    g = torch.Generator().manual_seed(0)
    if shape == "transposed":  # a non-contiguous (B, T, in) input
        shape = (2, 3, 4)
        x = torch.randn(3, 2, 4, generator=g, dtype=F64).transpose(0, 1).requires_grad_()
    else:
        x = torch.randn(*shape, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=F64, requires_grad=True) if bias else None
    gy = torch.randn(*shape[:-1], 3, generator=g, dtype=F64, requires_grad=True)
    leaves = [t for t in (x, w, b, gy) if t is not None]
    cot = [torch.randn(t.shape, generator=g, dtype=F64) for t in (x, w, b) if t is not None]

    def second(linear):
        y = linear(x, w, b)
        firsts = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], gy, create_graph=True)
        return firsts, torch.autograd.grad(firsts, leaves, cot, allow_unused=True)

    ours_first, ours = second(lambda *a: reroute_linear(a, {}, WeightGradPolicy()))
    stock_first, stock = second(F.linear)
    for a, s in zip(ours_first, stock_first):
        torch.testing.assert_close(a, s, rtol=1e-13, atol=1e-14)
    for a, s in zip(ours, stock):
        if s is None:
            assert a is None or not bool(a.any())
        else:
            torch.testing.assert_close(a, s, rtol=1e-12, atol=1e-13)


def test_inputs_of_rank_two_and_more_are_rerouted():
    w = torch.randn(5, 4, dtype=F64, requires_grad=True)
    assert reroute_linear((torch.randn(4, dtype=F64), w), {}, WeightGradPolicy()) is None
    for shape in [(3, 4), (2, 3, 4)]:
        y = reroute_linear((torch.randn(shape, dtype=F64), w), {}, WeightGradPolicy())
        assert y is not None and y.grad_fn is not None and "_Linear" in type(y.grad_fn).__name__


def test_graph_only_weight_gradient_is_zero_but_keeps_the_second_derivative():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=g, dtype=F64)
    w = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    policy = WeightGradPolicy()
    with policy.graph_only():
        (gw,) = torch.autograd.grad(reroute_linear((x, w), {}, policy).tanh().sum(), w, create_graph=True)
    assert not bool(gw.any())
    v = torch.randn(3, 4, generator=g, dtype=F64)
    (hv,) = torch.autograd.grad(gw, w, v)
    (stock_gw,) = torch.autograd.grad(F.linear(x, w).tanh().sum(), w, create_graph=True)
    torch.testing.assert_close(hv, torch.autograd.grad(stock_gw, w, v)[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [mlp_problem, cnn_problem], ids=["mlp", "cnn_bn"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_linearized_hvp_with_every_route_matches_the_dense_hessian(make, channels_last):
    prob = make()
    H = dense_hessian(prob.lower_loss, prob.params)
    op = linearize_hvp(prob.lower_loss, prob.params, need_grad=False, channels_last=channels_last)
    stock = linearize_hvp(
        prob.lower_loss, prob.params, fast_linear=False, fast_conv=False, fast_bn=False, fast_activations=False
    )
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        v = torch.randn(H.shape[0], generator=g, dtype=F64)
        torch.testing.assert_close(op(v), H @ v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op(v), stock(v), rtol=1e-11, atol=1e-13)


def test_channels_last_convolution_keeps_values_and_weight_layout():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=F64, requires_grad=True)
    policy = WeightGradPolicy(channels_last=True)
    y = reroute_conv2d((x, w, None, 1, 1), {}, policy)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 1), rtol=1e-13, atol=1e-13)
    _, gw = torch.autograd.grad(y.square().sum(), (x, w), create_graph=True)
    _, sw = torch.autograd.grad(F.conv2d(x, w, None, 1, 1).square().sum(), (x, w), create_graph=True)
    torch.testing.assert_close(gw, sw, rtol=1e-12, atol=1e-12)
    v = torch.randn(w.shape, generator=g, dtype=F64)
    (hv,) = torch.autograd.grad(gw, w, v)
    assert hv.is_contiguous()  # weight-shaped results come back in the weight's own layout
    torch.testing.assert_close(hv, torch.autograd.grad(sw, w, v)[0], rtol=1e-12, atol=1e-12)
    net = nn.Conv2d(3, 4, 3).double()
    assert net.weight.is_contiguous()


@pytest.mark.parametrize("make", [mlp_problem, cnn_problem], ids=["mlp", "cnn"])
def test_rerouted_hvp_runs_no_product_on_a_cotangent_that_never_arrives(make):
    """The loss closes over a projector whose parameters require grad but are not in θ: no
    cotangent reaches their first-order weight gradients, and the rerouted double backwards must
    skip those products (they once ran them on zeros) — never more FLOPs than autograd's own."""
    from bissl.bench import count_flops

    prob = make(dtype=F64)
    assert any(p.requires_grad for p in prob.modules["projector"].parameters())
    g = torch.Generator().manual_seed(2)
    v = {k: torch.randn(p.shape, generator=g, dtype=F64) for k, p in prob.params.items()}
    fast = linearize_hvp(prob.lower_loss, prob.params, need_grad=False)
    stock = linearize_hvp(prob.lower_loss, prob.params, need_grad=False, fast_linear=False, fast_conv=False)
    for a, s in zip(fast.hv_pieces(v), stock.hv_pieces(v)):
        torch.testing.assert_close(a, s, rtol=1e-11, atol=1e-12)
    assert count_flops(lambda: fast.hv_pieces(v)) <= count_flops(lambda: stock.hv_pieces(v))


def test_a_flat_theta_sliced_into_weights_is_still_rerouted():
    """θ as one flat leaf: the loss slices its weights out of it (views, not leaves), and those
    layers keep the rerouted double backward; a leaf weight outside θ does not."""
    from bissl.ops.conv_double_backward import WeightGradPolicy

    theta = torch.randn(12, dtype=F64, requires_grad=True)
    outside = torch.randn(3, 4, dtype=F64, requires_grad=True)
    policy = WeightGradPolicy()
    policy.reroute_only([theta])
    assert policy.reroutes(theta) and policy.reroutes(theta[:12].view(3, 4))
    assert not policy.reroutes(outside)
    x = torch.randn(5, 4, dtype=F64)
    assert reroute_linear((x, theta.view(3, 4)), {}, policy) is not None
    assert reroute_linear((x, outside), {}, policy) is None
