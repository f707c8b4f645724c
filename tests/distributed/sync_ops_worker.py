"""Rank program of tests/distributed/test_sync_ops.py (gloo, float64). Rank 0 writes ``result.pt``.

Every check compares this job against a single process on the concatenated global batch, which
each rank computes itself with plain ``nn.BatchNorm`` and :func:`nt_xent` (no collectives):

* ``model``: a SmallCNN + SimCLR projector with :class:`SyncBatchNorm` and gathered negatives;
  the rank-averaged loss, gradient and HVPs (autograd double backward, ``torch.func``
  ``jvp(grad)``, every ``bissl.ops.hvp`` / ``linearize_hvp`` mode, ``hvp_batched``) against the
  global-batch ones; buffers untouched by everything run under ``batchnorm_stats_frozen()``;
  running statistics after one train step against BatchNorm's;
* ``unequal``: one SyncBatchNorm layer, shards of 3 and 5 rows: outputs, gradients, a double
  backward and running statistics (momentum=None, two steps);
* ``errors``: the messages of mismatched ``all_gather_cat`` calls (every rank must raise).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from bissl.distributed import allreduce_mean_tensors_, exit_rank, init_process_group_from_env
from bissl.distributed.autograd import all_gather_cat, all_reduce_sum
from bissl.distributed.syncbn import SyncBatchNorm, convert_sync_batchnorm
from bissl.models import SmallCNN
from bissl.ops import hvp, hvp_batched, linearize_hvp
from bissl.ops.batchnorm import batchnorm_stats_frozen
from bissl.ops.flat import flatten, unflatten
from bissl.tasks.pretext.simclr import SimCLR

B_LOCAL = 3  # rows per rank and view (a 6-sample global batch on 2 ranks)


class Pretext(nn.Module):
    """Backbone + SimCLR head; ``forward(v1, v2)`` is the pretext loss (one module for functional_call)."""

    def __init__(self, backbone: nn.Module, head: SimCLR) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, v1: Tensor, v2: Tensor) -> Tensor:
        return self.head.loss(self.backbone, v1, v2)


def _mean_over_ranks(d: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {k: v.detach().clone() for k, v in d.items()}
    allreduce_mean_tensors_(list(out.values()))
    return out


def _max_err(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in b)


def _buffers(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in m.named_buffers()}


def _double_backward(loss_fn, params: dict[str, Tensor], v: dict[str, Tensor]) -> dict[str, Tensor]:
    leaves = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    grads = torch.autograd.grad(loss_fn(leaves), tuple(leaves.values()), create_graph=True)
    dot = sum((g * v[k]).sum() for g, k in zip(grads, leaves))
    return dict(zip(leaves, torch.autograd.grad(dot, tuple(leaves.values()))))


def check_model(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    oracle = Pretext(SmallCNN(1, width=2), SimCLR(4, proj_dims=(5, 3), temperature=0.4))
    oracle = oracle.double().train()
    # Distributed copy: same parameters, every BatchNorm synchronised, negatives gathered.
    model = copy.deepcopy(oracle)
    model.head.gather_negatives = True
    convert_sync_batchnorm(model)
    n_sync = sum(isinstance(m, SyncBatchNorm) for m in model.modules())
    g = torch.Generator().manual_seed(1)
    v1, v2 = (torch.rand(world * B_LOCAL, 1, 6, 6, generator=g, dtype=torch.float64) for _ in range(2))
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    params = {k: p.detach().clone() for k, p in oracle.named_parameters()}
    vec = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in params.items()}

    def local_loss(p: dict[str, Tensor]) -> Tensor:
        return functional_call(model, p, (v1[rows], v2[rows]), strict=False)

    def global_loss(p: dict[str, Tensor]) -> Tensor:
        return functional_call(oracle, p, (v1, v2), strict=False)

    # (b) one train step (forward + backward, buffers updated) against BatchNorm on the global batch
    initial = _buffers(model)
    model.zero_grad()
    loss = model(v1[rows], v2[rows])
    loss.backward()
    oracle_loss = oracle(v1, v2)
    running_err = _max_err(_buffers(model), _buffers(oracle))
    moved = max((b - initial[k]).abs().max().item() for k, b in _buffers(model).items() if b.is_floating_point())

    # (a)+(c) everything below must leave the (now non-trivial) buffers exactly as they are
    before = _buffers(model)
    with batchnorm_stats_frozen():
        value = local_loss(params).detach()
        want_value = global_loss(params).detach()
        want_grad = torch.func.grad(global_loss)(params)
        want_hvp = _double_backward(global_loss, params, vec)
        grads = {"torch.func grad": torch.func.grad(local_loss)(params)}
        hvps = {
            "double backward": _double_backward(local_loss, params, vec),
            "torch.func jvp(grad)": torch.func.jvp(torch.func.grad(local_loss), (params,), (vec,))[1],
        }
    grads["module .grad after backward"] = {k: p.grad for k, p in model.named_parameters()}
    for mode in ("fwdrev", "revrev", "autograd"):
        hvps[f"hvp {mode}"] = hvp(local_loss, params, vec, mode=mode)
        op = linearize_hvp(local_loss, params, mode=mode)
        hvps[f"linearize_hvp {mode}"] = op.matvec_dict(vec)
        assert op.grad is not None
        grads[f"linearize_hvp {mode} .grad"] = unflatten(op.grad, op.spec)
    batched = {k: torch.stack((v, 2 * v)) for k, v in vec.items()}
    for mode in ("fwdrev", "revrev"):
        out = hvp_batched(local_loss, params, batched, mode=mode)
        hvps[f"hvp_batched {mode} [0]"] = {k: t[0] for k, t in out.items()}
        hvps[f"hvp_batched {mode} [1]/2"] = {k: t[1] / 2 for k, t in out.items()}
    after = _buffers(model)
    mean_value = all_reduce_sum(value) / world
    return {
        "n_sync_layers": n_sync,
        "loss_err": (mean_value - want_value).abs().item(),
        "train_step_loss_err": (all_reduce_sum(loss.detach()) / world - oracle_loss.detach()).abs().item(),
        "local_loss_differs": (value - want_value).abs().item(),
        "running_stats_err": running_err,
        "running_stats_moved": moved,
        "frozen_buffers_identical": all(torch.equal(before[k], after[k]) for k in before),
        "grad_errors": {name: _max_err(_mean_over_ranks(d), want_grad) for name, d in grads.items()},
        "hvp_errors": {name: _max_err(_mean_over_ranks(d), want_hvp) for name, d in hvps.items()},
        "local_hvp_differs": _max_err(hvps["double backward"], want_hvp),
        "hvp_norm": flatten(want_hvp).norm().item(),
        "grad_norm": flatten(want_grad).norm().item(),
    }


def check_unequal(rank: int, world: int) -> dict:
    """SyncBatchNorm with 3 rows on rank 0 and 5 on rank 1 against BatchNorm2d on all 8 rows."""
    sizes = [3 + 2 * r for r in range(world)]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(sum(sizes), 3, 2, 2, generator=g, dtype=torch.float64) * 3 + 5
    c = torch.randn(x.shape, generator=g, dtype=torch.float64)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    bn = nn.BatchNorm2d(3, momentum=None).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.uniform_(-0.5, 0.5, generator=g)
    sync = convert_sync_batchnorm(copy.deepcopy(bn))
    out: dict[str, float] = {}
    for step in range(2):  # momentum=None: the second step averages, exercising num_batches_tracked
        xs = (x * (1 + step)).requires_grad_(True)
        xl = (x[rows] * (1 + step)).detach().requires_grad_(True)
        y, yl = bn(xs), sync(xl)
        out[f"step {step} output"] = (yl - y[rows]).abs().max().item()
        # loss = Σ_r Σ (c ⊙ y)²: its gradient and a Hessian-vector product w.r.t. the input and weight
        want = torch.autograd.grad(((c * y) ** 2).sum(), (xs, bn.weight), create_graph=True)
        got = torch.autograd.grad(((c[rows] * yl) ** 2).sum(), (xl, sync.weight), create_graph=True)
        out[f"step {step} input grad"] = (got[0] - want[0][rows]).abs().max().item()
        w_grad = all_reduce_sum(got[1].detach())
        out[f"step {step} weight grad"] = (w_grad - want[1]).abs().max().item()
        want2 = torch.autograd.grad((want[0] * c).sum() + want[1].sum(), (xs, bn.weight))
        got2 = torch.autograd.grad((got[0] * c[rows]).sum() + got[1].sum(), (xl, sync.weight))
        out[f"step {step} input 2nd"] = (got2[0] - want2[0][rows]).abs().max().item()
        out[f"step {step} weight 2nd"] = (all_reduce_sum(got2[1]) - want2[1]).abs().max().item()
    out["running stats"] = _max_err(_buffers(sync), _buffers(bn))
    out["num_batches_tracked"] = int(sync.num_batches_tracked)
    # eval mode is BatchNorm's own forward (local rows): bit-identical given the same buffers
    bn.load_state_dict(sync.state_dict())
    bn.eval(), sync.eval()
    out["eval bit-identical"] = torch.equal(sync(x[rows]), bn(x[rows]))
    # one row per rank: a local batch of 1 is fine when the global batch has more
    bn.train(), sync.train()
    one = slice(rank, rank + 1)
    out["one row per rank output"] = (sync(x[one]) - bn(x[:world])[one]).abs().max().item()
    # half precision: statistics in float32, output in the input's dtype
    xb = x[rows].bfloat16()
    yb = sync.float()(xb)
    want_b = bn.float()(torch.cat([x[sum(sizes[:r]) : sum(sizes[: r + 1])] for r in range(world)]).bfloat16().float())
    out["bfloat16 dtype"] = str(yb.dtype)
    out["bfloat16 output"] = (yb.float() - want_b[rows]).abs().max().item()
    return out


def check_errors(rank: int, world: int) -> dict:
    messages = {}
    cases = {
        "rows": torch.zeros(2 + rank, 4),
        "ndim": torch.zeros(2, 4) if rank == 0 else torch.zeros(2, 4, 1),
        "dtype": torch.zeros(2, 4, dtype=torch.float64 if rank == 0 else torch.float32),
    }
    for name, x in cases.items():
        try:
            all_gather_cat(x, 0)
            messages[name] = None
        except ValueError as err:
            messages[name] = str(err)
    head = SimCLR(4, proj_dims=(3,), gather_negatives=True)
    try:
        head.loss(nn.Flatten(), torch.zeros(2 + rank, 4), torch.zeros(2 + rank, 4))
        messages["simclr shards"] = None
    except ValueError as err:
        messages["simclr shards"] = str(err)
    try:  # a global batch of one row (rank 0: one row, rank 1: none)
        SyncBatchNorm(2)(torch.zeros(1 - rank, 2))
        messages["global batch of 1"] = None
    except ValueError as err:
        messages["global batch of 1"] = str(err)
    # the group still works after the refused calls
    messages["after"] = all_gather_cat(torch.full((1, 2), float(rank)), 1).tolist()
    return messages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    info = init_process_group_from_env(timeout_s=60)
    result: dict = {"world_size": info.world_size, "seconds": {}}
    for name, check in (("model", check_model), ("unequal", check_unequal), ("errors", check_errors)):
        start = time.perf_counter()
        result[name] = check(info.rank, info.world_size)
        result["seconds"][name] = time.perf_counter() - start
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, result["errors"])
    result["errors_per_rank"] = gathered
    if info.rank == 0:
        torch.save(result, args.out / "result.pt")
    exit_rank(0)


if __name__ == "__main__":
    main()
