"""Tests for bissl.optim.LARS against hand-computed steps."""

from __future__ import annotations

import math

import pytest
import torch

from bissl.optim import LARS


def test_two_hand_computed_steps():
    # w = [[3, 4]] (||w|| = 5), wd = 0.1, eta = 0.01, lr = 0.5, momentum = 0.9.
    w = torch.tensor([[3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = LARS([w, b], lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.01)

    w.grad = torch.tensor([[0.7, -0.4]], dtype=torch.float64)
    b.grad = torch.tensor([0.5, 0.25], dtype=torch.float64)
    opt.step()
    d = [0.7 + 0.1 * 3, -0.4 + 0.1 * 4]  # [1.0, 0.0], ||d|| = 1
    trust = 0.01 * 5 / 1.0
    buf_w = [trust * d[0], trust * d[1]]  # [0.05, 0]
    w1 = [3 - 0.5 * buf_w[0], 4 - 0.5 * buf_w[1]]  # [2.975, 4]
    # The bias is excluded: no decay, no trust ratio, plain momentum SGD.
    buf_b = [0.5, 0.25]
    b1 = [1 - 0.5 * 0.5, -2 - 0.5 * 0.25]
    assert w.tolist()[0] == pytest.approx(w1, abs=1e-15)
    assert b.tolist() == pytest.approx(b1, abs=1e-15)

    w.grad = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    b.grad = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    opt.step()
    d = [0.0 + 0.1 * w1[0], 1.0 + 0.1 * w1[1]]
    trust = 0.01 * math.hypot(*w1) / math.hypot(*d)
    buf_w = [0.9 * buf_w[0] + trust * d[0], 0.9 * buf_w[1] + trust * d[1]]
    w2 = [w1[0] - 0.5 * buf_w[0], w1[1] - 0.5 * buf_w[1]]
    buf_b = [0.9 * buf_b[0] - 1.0, 0.9 * buf_b[1] + 0.0]
    b2 = [b1[0] - 0.5 * buf_b[0], b1[1] - 0.5 * buf_b[1]]
    assert w.tolist()[0] == pytest.approx(w2, abs=1e-15)
    assert b.tolist() == pytest.approx(b2, abs=1e-15)


def test_exclusion_flag_adapts_vectors_too():
    b = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    opt = LARS([b], lr=1.0, momentum=0.0, weight_decay=0.0, eta=0.1, exclude_bias_and_norm=False)
    b.grad = torch.tensor([0.0, 2.0], dtype=torch.float64)
    opt.step()
    # trust = 0.1 * 5 / 2 = 0.25 -> step 0.25 * [0, 2]
    assert b.tolist() == pytest.approx([3.0, 3.5], abs=1e-15)


def test_zero_weight_uses_unit_trust():
    w = torch.zeros(2, 2, requires_grad=True)
    opt = LARS([w], lr=0.1, momentum=0.0, weight_decay=0.0)
    w.grad = torch.ones(2, 2)
    opt.step()
    assert torch.allclose(w, torch.full((2, 2), -0.1))


def test_state_dict_resume_is_identical():
    torch.manual_seed(0)
    grads = [torch.randn(3, 4) for _ in range(6)]

    def run(resume_at=None):
        w = torch.nn.Parameter(torch.ones(3, 4))
        opt = LARS([w], lr=0.3)
        for i, g in enumerate(grads):
            if i == resume_at:
                state = opt.state_dict()
                w = torch.nn.Parameter(w.detach().clone())
                opt = LARS([w], lr=0.3)
                opt.load_state_dict(state)
            w.grad = g.clone()
            opt.step()
        return w.detach()

    assert torch.equal(run(), run(resume_at=3))


def test_bad_arguments():
    w = [torch.zeros(2, requires_grad=True)]
    for kwargs, msg in (
        (dict(lr=-1.0), "lr"),
        (dict(lr=1.0, momentum=1.0), "momentum"),
        (dict(lr=1.0, weight_decay=-1.0), "weight_decay"),
        (dict(lr=1.0, eta=0.0), "eta"),
    ):
        with pytest.raises(ValueError, match=msg):
            LARS(w, **kwargs)
