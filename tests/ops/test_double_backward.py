"""The closed-form double backwards of conv2d and train-mode BatchNorm vs numerical 2nd derivatives."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from bissl.ops.batchnorm_double_backward import batch_norm_train
from bissl.ops.conv_double_backward import ConvFastDoubleBackward

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
        g, = torch.autograd.grad((y.tanh() ** 2).sum(), w, create_graph=True)
        return torch.autograd.grad(g, w, v)[0]

    torch.testing.assert_close(hv(True), hv(False), rtol=1e-12, atol=1e-12)
