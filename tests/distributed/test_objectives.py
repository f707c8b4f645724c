"""The model modules of the pipeline in plain torch: the upper surrogate gives exactly BiSSL's upper
gradient, and the lower module's EMA target update is BYOL's."""

from __future__ import annotations

import pytest
import torch

from bissl.distributed.objectives import LowerObjective, injection_term
from bissl.distributed.testing import step_data, toy_objectives
from bissl.tasks.pretext import BYOL


def _double(seed=0):
    lower, upper = toy_objectives(seed=seed)
    return lower.double(), upper.double()


def _batch64(b):
    return tuple(t.double() if t.is_floating_point() else t for t in b)


def test_lower_forward_is_the_pretext_loss():
    lower, _ = _double()
    batch = _batch64(step_data(0, 0, world=1).lower[0][0])
    loss = lower(batch)
    torch.testing.assert_close(loss, lower.head.loss(lower.backbone, *batch))
    assert torch.equal(lower.last_terms["loss"], loss.detach())


def test_upper_surrogate_gradient_is_injection_plus_gamma_direct():
    _, upper = _double()
    upper.gamma = 0.3
    batch = _batch64(step_data(0, 0, world=1).upper[0])
    params = list(upper.parameters())
    injected = [torch.randn_like(p) for p in params]
    direct = torch.autograd.grad(upper(batch), params)
    surrogate = torch.autograd.grad(upper(batch, injected), params)
    for s, d, g in zip(surrogate, direct, injected):
        torch.testing.assert_close(s, g + 0.3 * d, rtol=1e-12, atol=1e-12)
    injection_only = torch.autograd.grad(upper(None, injected), params)
    for s, g in zip(injection_only, injected):
        torch.testing.assert_close(s, g, rtol=0, atol=0)
    with pytest.raises(ValueError, match="injected has"):
        upper(batch, injected[:-1])
    with pytest.raises(ValueError, match="give a batch"):
        upper(None)


def test_injection_term_checks_shapes():
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        injection_term([w], [torch.ones(4)])


def test_update_target_is_byols_ema_and_a_no_op_for_simclr():
    lower, _ = _double()
    before = [p.clone() for p in lower.parameters()]
    lower.update_target()  # SimCLR: no target
    assert all(torch.equal(a, b) for a, b in zip(before, lower.parameters()))
    backbone = lower.backbone
    byol = BYOL(backbone, backbone.out_dim, proj_dims=(8, 4), pred_hidden=8, momentum=0.75).double()
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(1.0)
    target_before = [t.clone() for t in byol.target_backbone.parameters()]
    LowerObjective(backbone, byol, lambda b, h, x: h.loss(b, *x)).update_target()
    for t0, t, o in zip(target_before, byol.target_backbone.parameters(), backbone.parameters()):
        torch.testing.assert_close(t, 0.75 * t0 + 0.25 * o.detach(), rtol=1e-12, atol=1e-12)


def test_objectives_validate_hyperparameters():
    _, upper = toy_objectives()
    with pytest.raises(ValueError, match="gamma"):
        type(upper)(upper.backbone, upper.head, upper.loss_fn, gamma=-1.0)
    with pytest.raises(ValueError, match="scalar"):
        type(upper)(upper.backbone, upper.head, lambda b, h, x: h(b(x[0])))(step_data(0, 0, world=1).upper[0])
    with pytest.raises(TypeError, match="callable"):
        type(upper)(upper.backbone, upper.head, None)
