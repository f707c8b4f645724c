"""The closed-form second derivatives of conv2d, train-mode BatchNorm, gelu and layer_norm vs
numerical second derivatives and stock autograd (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from bissl.ops.batchnorm_double_backward import batch_norm_train
from bissl.ops.conv_double_backward import ConvFastDoubleBackward
from bissl.ops.gelu_double_backward import gelu
from bissl.ops.layernorm_double_backward import layer_norm

F64 = torch.float64


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 3, 2)], ids=["bn1d", "bn2d"])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_train_first_and_second_derivatives(shape, affine):
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    w = (torch.rand(shape[1], dtype=F64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(shape[1], dtype=F64, requires_grad=True) if affine else None
    fn = lambda *a: batch_norm_train(a[0], *(a[1:] if affine else (None, None)), 1e-5)  # noqa: E731
    inputs = (x, w, b) if affine else (x,)
    torch.testing.assert_close(fn(*inputs), F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5))
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("stride,padding,groups,bias", [(1, 1, 1, True), (2, 0, 1, False), (1, 1, 2, True)])
def test_conv2d_fast_double_backward(stride, padding, groups, bias):
    x = torch.randn(2, 2, 4, 4, dtype=F64, requires_grad=True)
    w = torch.randn(4, 2 // groups, 3, 3, dtype=F64, requires_grad=True)
    b = torch.randn(4, dtype=F64, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)

    def fn(*a):
        with ConvFastDoubleBackward():
            return F.conv2d(a[0], a[1], a[2] if bias else None, stride, padding, 1, groups)

    torch.testing.assert_close(fn(*inputs), F.conv2d(x, w, b, stride, padding, 1, groups))
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


def test_first_layer_input_gradient_is_skipped_not_wrong():
    """An input that needs no grad (images) gets none; weights still get the exact 2nd derivative."""
    x = torch.randn(2, 3, 4, 4, dtype=F64)  # no grad, like a batch of images
    w = torch.randn(5, 3, 3, 3, dtype=F64, requires_grad=True)
    v = torch.randn_like(w)

    def hv(fast: bool):
        ctx = ConvFastDoubleBackward() if fast else torch.enable_grad()
        with ctx:
            y = F.conv2d(x, w, None, 1, 1)
        (g,) = torch.autograd.grad((y.tanh() ** 2).sum(), w, create_graph=True)
        return torch.autograd.grad(g, w, v)[0]

    torch.testing.assert_close(hv(True), hv(False), rtol=1e-12, atol=1e-12)


def _hvps(ours, stock, inputs):
    """HVPs of ``sum(c·tanh(op(*inputs)))`` at ``inputs`` along random tangents: ours by forward
    over reverse (``forward_ad``) and by reverse over reverse, and the stock op's by ``torch.func``."""
    import torch.autograd.forward_ad as fwAD

    c = torch.randn(stock(*inputs).shape, dtype=F64)
    tangents = tuple(torch.randn_like(t) for t in inputs)
    argnums = tuple(range(len(inputs)))
    expected = torch.func.jvp(torch.func.grad(lambda *a: (c * torch.tanh(stock(*a))).sum(), argnums), inputs, tangents)[
        1
    ]
    loss = lambda *a: (c * torch.tanh(ours(*a))).sum()  # noqa: E731
    with fwAD.dual_level():
        leaves = [t.detach().requires_grad_() for t in inputs]
        grads = torch.autograd.grad(loss(*[fwAD.make_dual(p, t) for p, t in zip(leaves, tangents)]), leaves)
        fwdrev = [fwAD.unpack_dual(g).tangent for g in grads]
    leaves = [t.detach().requires_grad_() for t in inputs]
    grads = torch.autograd.grad(loss(*leaves), leaves, create_graph=True)
    revrev = torch.autograd.grad(grads, leaves, tangents)
    return expected, fwdrev, revrev


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_second_derivatives(approximate):
    x = torch.randn(4, 6, dtype=F64, requires_grad=True)
    ours = lambda t: gelu(t, approximate)  # noqa: E731
    stock = lambda t: F.gelu(t, approximate=approximate)  # noqa: E731
    assert torch.equal(ours(x), stock(x))  # the same kernel: bit-identical values
    assert gradcheck(ours, (x,))
    assert gradgradcheck(ours, (x,))
    (expected,), fwdrev, revrev = _hvps(ours, stock, (x.detach(),))
    torch.testing.assert_close(fwdrev[0], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(revrev[0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "shape,normalized,affine",
    [((3, 4, 5), (5,), True), ((3, 2, 3), (2, 3), True), ((4, 5), (5,), False)],
    ids=["row", "two-dims", "plain"],
)
def test_layer_norm_second_derivatives(shape, normalized, affine):
    x = torch.randn(*shape, dtype=F64)
    w = torch.rand(normalized, dtype=F64) + 0.5
    b = torch.randn(normalized, dtype=F64)
    inputs = (x, w, b) if affine else (x,)
    ours = lambda *a: layer_norm(a[0], normalized, *(a[1:] if affine else (None, None)), eps=1e-5)  # noqa: E731
    stock = lambda *a: F.layer_norm(a[0], normalized, *(a[1:] if affine else (None, None)), eps=1e-5)  # noqa: E731
    assert torch.equal(ours(*inputs), stock(*inputs))
    grad_inputs = tuple(t.clone().requires_grad_() for t in inputs)
    assert gradcheck(ours, grad_inputs)
    assert gradgradcheck(ours, grad_inputs)
    expected, fwdrev, revrev = _hvps(ours, stock, inputs)
    for got in (fwdrev, revrev):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-12)


def test_gelu_and_layer_norm_refuse_a_third_derivative():
    """The double backward uses constants of the linearisation point: differentiating it again
    would be silently wrong, so it raises."""
    x = torch.randn(3, 5, dtype=F64, requires_grad=True)
    for op in (lambda t: gelu(t), lambda t: layer_norm(t, (5,))):
        (g,) = torch.autograd.grad(op(x).pow(2).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="third derivatives"):
            torch.autograd.grad((g * g).sum(), x, create_graph=True)


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_train_forward_over_reverse(affine):
    x = torch.randn(4, 3, 3, 2, dtype=F64)
    w = torch.rand(3, dtype=F64) + 0.5
    b = torch.randn(3, dtype=F64)
    inputs = (x, w, b) if affine else (x,)
    ours = lambda *a: batch_norm_train(a[0], *(a[1:] if affine else (None, None)), 1e-5)  # noqa: E731
    stock = lambda *a: F.batch_norm(a[0], None, None, *(a[1:] if affine else (None, None)), True, 0.0, 1e-5)  # noqa: E731
    assert torch.equal(ours(*inputs), stock(*inputs))
    expected, fwdrev, revrev = _hvps(ours, stock, inputs)
    for got in (fwdrev, revrev):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-12)
