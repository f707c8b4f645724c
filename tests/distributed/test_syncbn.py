"""SyncBatchNorm and the differentiable collectives in one process: without a process group and
in a one-rank gloo group they are BatchNorm / the identity, bit for bit; conversion keeps every
tensor. The two-rank checks are in test_sync_ops.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bissl.distributed.autograd import all_gather_cat, all_reduce_sum
from bissl.distributed.syncbn import SyncBatchNorm, convert_sync_batchnorm
from bissl.models import SmallCNN
from bissl.ops import hvp
from bissl.ops.batchnorm import batchnorm_stats_frozen, stats_frozen


@pytest.fixture(params=["no group", "one-rank group"])
def group_kind(request, tmp_path):
    if request.param == "no group":
        yield request.param
        return
    assert not dist.is_initialized()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield request.param
    finally:
        dist.destroy_process_group()


def test_collectives_return_their_input_on_one_rank(group_kind):
    x = torch.randn(3, 4, requires_grad=True)
    assert all_reduce_sum(x) is x
    assert all_gather_cat(x, dim=1) is x
    with pytest.raises(ValueError, match="out of range"):
        all_gather_cat(x, dim=2)
    with pytest.raises(ValueError, match="0-dim"):
        all_gather_cat(torch.ones(()))


def _run(bn: nn.Module, x: torch.Tensor, steps: int = 2) -> tuple[list[torch.Tensor], ...]:
    outs, grads = [], []
    for step in range(steps):
        xi = (x + step).requires_grad_(True)
        y = bn(xi)
        gx, gw = torch.autograd.grad((y * y.detach().cos()).sum(), (xi, bn.weight))
        outs.append(y.detach())
        grads += [gx, gw]
    return outs, grads, [b.clone() for b in bn.buffers()]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 7), (2, 3, 4, 5), (2, 3, 2, 2, 3)])
def test_syncbn_is_bit_identical_to_batchnorm_on_one_rank(group_kind, shape, momentum):
    torch.manual_seed(0)
    plain = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](
        3, momentum=momentum
    )
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-1, 1)
    sync = convert_sync_batchnorm(copy.deepcopy(plain))
    assert isinstance(sync, SyncBatchNorm)
    x = torch.randn(shape) * 2 + 1
    for train in (True, False):
        plain.train(train)
        sync.train(train)
        want, got = _run(plain, x), _run(sync, x)
        for w, g in zip(want, got):
            assert all(torch.equal(a, b) for a, b in zip(w, g))
    assert sync.state_dict().keys() == plain.state_dict().keys()


def test_syncbn_errors():
    sync = SyncBatchNorm(3)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        sync(torch.ones(3))


def test_convert_keeps_tensors_flags_and_structure():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.Sequential(nn.Flatten(), nn.BatchNorm1d(8, affine=False, momentum=None)),
        nn.BatchNorm3d(1, track_running_stats=False),
    ).double()
    net[1].weight.requires_grad_(False)
    net[1](torch.randn(4, 2, 3, 3, dtype=torch.float64))  # move the running statistics
    net[1].eval()
    tensors = dict(net.state_dict(keep_vars=True))
    keys = list(net.state_dict())
    out = convert_sync_batchnorm(net)
    assert out is net and [type(m).__name__ for m in net.modules()].count("SyncBatchNorm") == 3
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) for m in net.modules())
    after = net.state_dict(keep_vars=True)
    assert list(after) == keys
    assert all(after[k] is tensors[k] for k in keys)  # the same tensor objects, not copies
    assert not net[1].weight.requires_grad and net[1].bias.requires_grad
    assert not net[1].training and net[2][1].training
    assert net[2][1].momentum is None and net[2][1].weight is None
    assert net[3].running_mean is None and not net[3].track_running_stats
    assert all(p.device.type == "cpu" for p in net.parameters())
    assert int(net[1].num_batches_tracked) == 1


def test_stats_frozen_counts_nested_contexts():
    assert not stats_frozen()
    with batchnorm_stats_frozen():
        with batchnorm_stats_frozen(fast_double_backward=True):
            assert stats_frozen()
        assert stats_frozen()
    assert not stats_frozen()


def test_hvp_leaves_syncbn_buffers_alone_and_matches_batchnorm():
    """One process: the repo's HVP policy applies to SyncBatchNorm exactly as to BatchNorm."""
    torch.manual_seed(0)
    plain = SmallCNN(1, width=2).double().train()
    sync = convert_sync_batchnorm(copy.deepcopy(plain))
    x = torch.rand(4, 1, 5, 5, dtype=torch.float64)
    params = {k: p.detach() for k, p in plain.named_parameters()}
    v = {k: torch.randn_like(p) for k, p in params.items()}
    before = [b.clone() for b in sync.buffers()]
    out = {}
    for name, net in (("plain", plain), ("sync", sync)):

        def loss(p, net=net):
            return torch.func.functional_call(net, p, (x,), strict=False).square().sum()

        out[name] = hvp(loss, params, v, mode="revrev")
    assert all(torch.equal(a, b) for a, b in zip(before, sync.buffers()))
    assert all(torch.equal(out["plain"][k], out["sync"][k]) for k in params)
