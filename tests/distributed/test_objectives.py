"""The two BiSSL objectives in plain torch: the proximal term and the upper surrogate give exactly
the gradients the single-process trainer assembles by hand."""
from __future__ import annotations

import pytest
import torch

from bissl.distributed.objectives import injection_term, proximal_term
from bissl.distributed.testing import step_data, toy_objectives


def _double(seed=0):
    lower, upper = toy_objectives(seed=seed)
    return lower.double(), upper.double()


def _batch64(b):
    return tuple(t.double() if t.is_floating_point() else t for t in b)


def test_lower_forward_adds_the_proximal_gradient():
    lower, upper = _double()
    with torch.no_grad():
        for p in upper.backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    phi = {k: p.detach() for k, p in upper.backbone.named_parameters()}
    batch = _batch64(step_data(0, 0, world=1).lower[0][0])
    g_plain = torch.autograd.grad(lower(batch), list(lower.backbone.parameters()))
    g_prox = torch.autograd.grad(lower(batch, phi), list(lower.backbone.parameters()))
    for (k, p), a, b in zip(lower.backbone.named_parameters(), g_plain, g_prox):
        torch.testing.assert_close(b - a, lower.lam * (p.detach() - phi[k]), rtol=1e-12, atol=1e-12)
    assert float(lower.last_terms["prox"]) > 0


def test_proximal_term_value_and_name_check():
    lower, upper = _double()
    phi = {k: torch.zeros_like(p) for k, p in upper.backbone.named_parameters()}
    want = 0.5 * lower.lam * sum((p.detach() ** 2).sum() for p in lower.backbone.parameters())
    torch.testing.assert_close(proximal_term(lower.backbone, phi, lower.lam), want)
    phi.pop(next(iter(phi)))
    with pytest.raises(ValueError, match="missing"):
        proximal_term(lower.backbone, phi, lower.lam)


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
    with pytest.raises(ValueError, match="injected has"):
        upper(batch, injected[:-1])


def test_injection_term_checks_shapes():
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        injection_term([w], [torch.ones(4)])


def test_objectives_validate_hyperparameters():
    lower, upper = toy_objectives()
    with pytest.raises(ValueError, match="lam"):
        type(lower)(lower.backbone, lower.head, lower.loss_fn, lam=0.0)
    with pytest.raises(ValueError, match="gamma"):
        type(upper)(upper.backbone, upper.head, upper.loss_fn, gamma=-1.0)
    with pytest.raises(ValueError, match="scalar"):
        type(upper)(upper.backbone, upper.head, lambda b, h, x: h(b(x[0])))(step_data(0, 0, world=1).upper[0])
