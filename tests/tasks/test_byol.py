"""Tests for the BYOL pretext: loss range and value, gradient flow, EMA and reset of the target."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad

from bissl.models import build_backbone
from bissl.tasks.pretext import BYOL, build_pretext, byol_loss


def _setup(dtype=torch.float32):
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", in_channels=1, width=4).to(dtype)
    byol = build_pretext(
        "byol",
        backbone=backbone,
        feat_dim=backbone.out_dim,
        proj_dims=(16, 16, 8),
        pred_hidden=12,
        momentum=0.9,
    ).to(dtype)
    return backbone, byol


def test_byol_loss_values():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(7, 5, generator=g, dtype=torch.float64)
    assert byol_loss(p, 2.0 * p).item() == pytest.approx(0.0, abs=1e-12)
    assert byol_loss(p, -p).item() == pytest.approx(4.0, abs=1e-12)
    t = torch.randn(7, 5, generator=g, dtype=torch.float64)
    cos = [float(a @ b / (a.norm() * b.norm())) for a, b in zip(p, t)]
    assert byol_loss(p, t).item() == pytest.approx(sum(2 - 2 * c for c in cos) / 7, rel=1e-12)
    with pytest.raises(ValueError, match="equal shape"):
        byol_loss(p, t[:3])


def test_byol_module_loss_range_value_and_gradient_flow():
    backbone, byol = _setup()
    assert isinstance(byol, BYOL)
    v1, v2 = torch.rand(6, 1, 8, 8), torch.rand(6, 1, 8, 8)
    byol.train()
    loss = byol.loss(backbone, v1, v2)
    assert 0.0 <= loss.item() <= 4.0
    # Manual: predictions of view 1 against targets of view 2 and vice versa (same batch stats).
    with torch.no_grad():
        q = byol.predictor(byol.projector(backbone(torch.cat((v1, v2)))))
        t = byol.target_projector(byol.target_backbone(torch.cat((v1, v2))))
        expect = byol_loss(q, torch.cat((t[6:], t[:6])))
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in backbone.parameters())
    assert all(p.grad is not None for p in byol.online_parameters())
    assert all(not p.requires_grad and p.grad is None for p in byol.target_parameters())


def test_byol_target_starts_as_copy_and_reset_copies_again():
    backbone, byol = _setup()
    for (_, p), (_, t) in zip(backbone.named_parameters(), byol.target_backbone.named_parameters()):
        assert torch.equal(p, t) and p.data_ptr() != t.data_ptr()
    with torch.no_grad():
        for p in list(backbone.parameters()) + list(byol.projector.parameters()):
            p.add_(1.0)
        backbone.features[0][1].running_mean.fill_(0.5)
    byol.reset_target(backbone)
    for a, b in zip(backbone.state_dict().values(), byol.target_backbone.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(byol.projector.parameters(), byol.target_projector.parameters()):
        assert torch.equal(a, b)
    assert all(not p.requires_grad for p in byol.target_parameters())
    # A parameter dict works too.
    theta = {k: p.detach() + 2.0 for k, p in backbone.named_parameters()}
    byol.reset_target(theta)
    for k, t in byol.target_backbone.named_parameters():
        assert torch.equal(t, theta[k])


@pytest.mark.parametrize("as_dict", [False, True])
def test_update_target_is_exact_ema(as_dict):
    backbone, byol = _setup(torch.float64)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in list(backbone.parameters()) + list(byol.projector.parameters()):
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    old_t = [t.clone() for t in byol.target_parameters()]
    online = list(backbone.parameters()) + list(byol.projector.parameters())
    source = {k: p.detach() for k, p in backbone.named_parameters()} if as_dict else backbone
    if as_dict:
        source.update(dict(backbone.named_buffers()))  # buffer names are accepted and ignored
    byol.update_target(source, momentum=0.75)
    for t_new, t_old, o in zip(byol.target_parameters(), old_t, online):
        assert torch.allclose(t_new, 0.75 * t_old + 0.25 * o, rtol=0, atol=1e-14)
    # Default momentum: the constructor's 0.9.
    old_t = [t.clone() for t in byol.target_parameters()]
    byol.update_target(backbone)
    for t_new, t_old, o in zip(byol.target_parameters(), old_t, online):
        assert torch.allclose(t_new, 0.9 * t_old + 0.1 * o, rtol=0, atol=1e-14)


def test_update_target_errors():
    backbone, byol = _setup()
    theta = {k: p.detach() for k, p in backbone.named_parameters()}
    first = next(iter(theta))
    missing = dict(list(theta.items())[1:])
    with pytest.raises(ValueError, match=rf"missing \['{first}'\], unknown \[\]"):
        byol.update_target(missing)
    with pytest.raises(ValueError, match=r"missing \[\], unknown \['head.weight'\]"):
        byol.update_target({**theta, "head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="momentum"):
        byol.update_target(theta, momentum=1.5)


def test_byol_loss_under_torch_func_grad():
    """torch.func grad through functional_call equals autograd's (target side is constant)."""
    from bissl.ops.batchnorm import batchnorm_stats_frozen

    backbone, byol = _setup(torch.float64)
    theta = {k: p.detach().clone() for k, p in backbone.named_parameters()}
    buffers = dict(backbone.named_buffers())
    v1 = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    v2 = torch.rand(5, 1, 8, 8, dtype=torch.float64)

    def lower_loss(params):
        return byol.loss(lambda x: functional_call(backbone, {**params, **buffers}, (x,)), v1, v2)

    with batchnorm_stats_frozen():
        g_func = grad(lower_loss)(theta)
    loss = byol.loss(backbone, v1, v2)
    g_ref = torch.autograd.grad(loss, list(backbone.parameters()))
    for (k, a), b in zip(g_func.items(), g_ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), k
