"""Tests for the SimCLR pretext: NT-Xent against an explicit loop; its HVP through torch.func."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp

from bissl.models import build_backbone
from bissl.tasks.pretext import PRETEXTS, SimCLR, build_pretext, nt_xent
from bissl.tasks.pretext.simclr import _nt_xent_of_rows, nt_xent_across_ranks


def _nt_xent_loop(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """Float64 NT-Xent written sample by sample: for each of the 2B anchors, -log of the softmax
    weight of its positive among the 2B - 1 other samples."""
    z = [v / v.norm() for v in torch.cat((z1, z2)).double()]
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        j = i + b if i < b else i - b
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / denom)
    return total / n


@pytest.mark.parametrize("b, d, tau", [(2, 3, 0.5), (5, 7, 0.5), (6, 4, 0.1), (3, 16, 1.0)])
def test_nt_xent_matches_explicit_loop(b, d, tau):
    g = torch.Generator().manual_seed(b * 100 + d)
    z1, z2 = (
        torch.randn(b, d, generator=g, dtype=torch.float64),
        torch.randn(b, d, generator=g, dtype=torch.float64),
    )
    assert nt_xent(z1, z2, tau).item() == pytest.approx(_nt_xent_loop(z1, z2, tau), rel=1e-12)
    # float32 input agrees to float32 rounding.
    assert nt_xent(z1.float(), z2.float(), tau).item() == pytest.approx(_nt_xent_loop(z1, z2, tau), rel=1e-5)


def test_nt_xent_is_symmetric_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    z1, z2 = (
        torch.randn(4, 5, generator=g, dtype=torch.float64),
        torch.randn(4, 5, generator=g, dtype=torch.float64),
    )
    assert torch.allclose(nt_xent(z1, z2), nt_xent(z2, z1))
    assert torch.allclose(nt_xent(z1, z2), nt_xent(3.0 * z1, 0.5 * z2))


@pytest.mark.parametrize("b, tau", [(2, 0.5), (4, 0.5), (8, 0.2)])
def test_nt_xent_identical_orthonormal_views(b, tau):
    # Positive similarity 1, all 2B - 2 negatives 0: loss = log(e^{1/tau} + 2B - 2) - 1/tau.
    z = torch.eye(b, 10, dtype=torch.float64) * 2.5
    expect = math.log(math.exp(1 / tau) + 2 * b - 2) - 1 / tau
    assert nt_xent(z, z.clone(), tau).item() == pytest.approx(expect, rel=1e-12)


def test_nt_xent_errors():
    with pytest.raises(ValueError, match="equal shape"):
        nt_xent(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(3, 4), torch.randn(3, 4), temperature=0.0)


def _nt_xent_whole_matrix(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """NT-Xent as written before the row-subset core existed (one (2B, 2B) similarity matrix)."""
    b = z1.shape[0]
    z = torch.nn.functional.normalize(torch.cat((z1, z2)), dim=1)
    sim = (z @ z.T) / tau
    logits = sim[~torch.eye(2 * b, dtype=torch.bool)].view(2 * b, 2 * b - 1)
    rows = torch.arange(2 * b)
    positive = (rows + b) % (2 * b)
    return torch.nn.functional.cross_entropy(logits, positive - (positive > rows).long())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nt_xent_and_its_one_process_gather_are_bit_identical_to_the_whole_matrix_form(dtype):
    g = torch.Generator().manual_seed(3)
    z1, z2 = (torch.randn(5, 4, generator=g, dtype=dtype, requires_grad=True) for _ in range(2))
    want = _nt_xent_whole_matrix(z1, z2, 0.3)
    want_grad = torch.autograd.grad(want, (z1, z2))
    for fn in (nt_xent, nt_xent_across_ranks):  # no process group: the gather is the identity
        got = fn(z1, z2, 0.3)
        assert torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(got, (z1, z2)), want_grad))


def test_row_blocks_of_the_core_average_to_nt_xent():
    """The sharded form in one process: rank r's queries are its rows of view 1 and of view 2,
    scored against all 2B rows; the mean over ranks is the global NT-Xent."""
    g = torch.Generator().manual_seed(4)
    world, b = 3, 2
    z1, z2 = (torch.randn(world * b, 5, generator=g, dtype=torch.float64) for _ in range(2))
    keys = torch.nn.functional.normalize(torch.cat((z1, z2)), dim=1)
    per_rank = []
    for r in range(world):
        own = torch.arange(r * b, (r + 1) * b)
        rows = torch.cat((own, own + world * b))
        per_rank.append(_nt_xent_of_rows(keys[rows], keys, rows, 0.5))
    assert torch.stack(per_rank).mean().item() == pytest.approx(nt_xent(z1, z2).item(), rel=1e-14)
    assert max(abs(p.item() - nt_xent(z1, z2).item()) for p in per_rank) > 1e-3


def test_simclr_gather_flag_changes_nothing_in_one_process():
    torch.manual_seed(0)
    heads = [SimCLR(6, proj_dims=(5, 4), gather_negatives=flag) for flag in (True, False)]
    heads[1].load_state_dict(heads[0].state_dict())
    v1, v2 = torch.rand(3, 6), torch.rand(3, 6)
    assert torch.equal(heads[0].loss(nn.Identity(), v1, v2), heads[1].loss(nn.Identity(), v1, v2))
    assert heads[0].gather_negatives and not heads[1].gather_negatives


def test_simclr_loss_is_nt_xent_of_projected_features():
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", in_channels=1, width=4)
    head = build_pretext(
        "simclr",
        backbone=backbone,
        feat_dim=backbone.out_dim,
        proj_dims=(16, 16, 8),
        temperature=0.3,
    )
    assert isinstance(head, SimCLR) and head.projector[-1].bias is None
    v1, v2 = torch.rand(5, 1, 8, 8), torch.rand(5, 1, 8, 8)
    loss = head.loss(backbone, v1, v2)
    z = head.projector(backbone(torch.cat((v1, v2))))
    assert torch.allclose(loss, nt_xent(z[:5], z[5:], 0.3))
    loss.backward()
    assert all(p.grad is not None for p in head.online_parameters())
    assert head.update_target(backbone) is None


def test_build_pretext_errors():
    backbone = build_backbone("small_cnn", in_channels=1, width=4)
    with pytest.raises(ValueError) as err:
        build_pretext("moco", backbone=backbone, feat_dim=8)
    assert all(name in str(err.value) for name in PRETEXTS)
    with pytest.raises(ValueError, match="momentum"):
        build_pretext("simclr", backbone=backbone, feat_dim=8, momentum=0.99)


@pytest.mark.slow  # ~5 s of it is torch.func's one-time warm-up in a fresh process
def test_simclr_hvp_with_torch_func_matches_double_backward():
    """The core's HVP: jvp(grad(L_P)) of a functional_call closure, train-mode BatchNorm.

    Plain torch.func refuses train-mode BatchNorm (its in-place running-stat update of a captured
    buffer); the core's BatchNorm policy (batch statistics, buffers untouched) makes it work. The
    oracle is autograd's double backward on the same float64 loss, and a central difference of the
    gradient.
    """
    from bissl.ops.batchnorm import batchnorm_stats_frozen

    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", in_channels=1, width=4).double().train()
    head = SimCLR(backbone.out_dim, proj_dims=(16, 16, 8)).double().train()
    theta = {k: p.detach().clone() for k, p in backbone.named_parameters()}
    buffers = dict(backbone.named_buffers())
    before = {k: b.clone() for k, b in buffers.items()}
    g = torch.Generator().manual_seed(1)
    v1 = torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64)
    v2 = torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64)
    v = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in theta.items()}

    def lower_loss(params):
        return head.loss(lambda x: functional_call(backbone, {**params, **buffers}, (x,)), v1, v2)

    with batchnorm_stats_frozen():
        grad_theta, hv = jvp(grad(lower_loss), (theta,), (v,))
        # Central difference of the gradient along v (float64, the loss is smooth).
        eps = 1e-6
        plus = grad(lower_loss)({k: theta[k] + eps * v[k] for k in theta})
        minus = grad(lower_loss)({k: theta[k] - eps * v[k] for k in theta})
    assert all(torch.equal(before[k], buffers[k]) for k in buffers)

    # Oracle: autograd double backward through the live module (BatchNorm in train mode
    # normalises with batch statistics either way).
    leaves = {k: t.clone().requires_grad_(True) for k, t in theta.items()}
    loss = head.loss(
        lambda x: functional_call(backbone, {**leaves, **{k: b.clone() for k, b in buffers.items()}}, (x,)),
        v1,
        v2,
    )
    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
    dot = sum((gr * v[k]).sum() for gr, k in zip(grads, leaves))
    hv_ref = torch.autograd.grad(dot, list(leaves.values()))

    def flat(tensors):
        return torch.cat([t.reshape(-1) for t in tensors])

    assert torch.allclose(flat(grad_theta.values()), flat(grads), rtol=1e-10, atol=1e-12)
    assert torch.allclose(flat(hv.values()), flat(hv_ref), rtol=1e-9, atol=1e-11)
    fd = (flat(plus.values()) - flat(minus.values())) / (2 * eps)
    assert torch.allclose(flat(hv.values()), fd, rtol=1e-5, atol=1e-7)
    assert flat(hv.values()).abs().max() > 1e-3  # a real curvature signal, not zeros
