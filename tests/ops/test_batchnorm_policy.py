"""The HVP BatchNorm policy: no crash in train mode, buffers untouched, batch statistics used."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from bissl.ops import batchnorm_stats_frozen, flatten, hvp, linearize_hvp
from bissl.ops.hvp import HVP_MODES
from bissl.testing import cnn_problem


def _buffers(module):
    return {k: b.clone() for k, b in module.named_buffers()}


@pytest.mark.parametrize("mode", HVP_MODES)
@pytest.mark.parametrize("through_functional_call", [True, False])
def test_train_mode_batchnorm_buffers_untouched(mode, through_functional_call):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 1)).double()
    net.train()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    before = _buffers(net)
    params = {k: p.detach().clone() for k, p in net.named_parameters()}

    if through_functional_call:

        def loss(p):
            return functional_call(net, p, (x,)).pow(2).sum()
    else:

        def loss(p):  # a closure that ignores p except through a live module is legal too
            return (functional_call(net, p, (x,)) * net(x).detach()).sum()

    v = {k: torch.randn_like(p) for k, p in params.items()}
    hvp(loss, params, v, mode=mode)  # must not raise (torch.func forbids in-place stat updates)
    linearize_hvp(loss, params, mode=mode)(flatten(v))
    for k, b in _buffers(net).items():
        torch.testing.assert_close(b, before[k], rtol=0, atol=0, msg=f"buffer {k} changed")


def test_batch_statistics_are_what_is_differentiated():
    """Under the policy a train-mode BN normalises with batch stats — same value as training."""
    bn = nn.BatchNorm2d(2).double().train()
    bn.running_mean.fill_(5.0)  # far from the batch mean: would change the output if used
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    expected = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(var + bn.eps)
    with batchnorm_stats_frozen():
        got = bn(x)
    torch.testing.assert_close(got, expected)
    assert float(bn.running_mean[0]) == 5.0 and int(bn.num_batches_tracked) == 0


def test_eval_mode_batchnorm_uses_running_stats():
    bn = nn.BatchNorm2d(2).double().eval()
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    with batchnorm_stats_frozen():
        got = bn(x)
    torch.testing.assert_close(got, (x - 1.0) / torch.sqrt(torch.tensor(4.0 + bn.eps, dtype=torch.float64)))


def test_problem_backbone_buffers_untouched_by_hypergradient_solve():
    from bissl.hypergrad import implicit_hypergrad

    prob = cnn_problem()
    before = _buffers(prob.backbone)
    implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=1.0, damping=10.0, iters=3)
    for k, b in _buffers(prob.backbone).items():
        assert torch.equal(b, before[k]), k
