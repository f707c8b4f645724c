"""Rank program of the collective/hypergradient tests (no DeepSpeed). Rank 0 writes ``result.pt``.

Measures, on rank-specific data:
* ``allreduce_mean_`` / ``allreduce_mean_tensors_`` values and collective counts (bucketed or not),
  counted independently by wrapping ``torch.distributed.all_reduce``;
* ``distributed_implicit_hypergrad`` against (a) the single-process ``implicit_hypergrad`` of the
  shard-averaged losses and (b) a dense solve with the shard-averaged dense Hessian, in float64;
* digests of every CG direction, averaged HVP, α, β and ``x`` on every rank (must be identical),
  and, as a control, the digests of the *un-reduced* per-rank solve (must differ);
* the sharded solve (each rank keeps its partition of the solver's vectors) against the unsharded
  one for every solver, in float64, with the partition sizes, the collectives it issued and —
  in fixed-iteration, report-only mode — no host synchronisation during the solve.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from bissl.distributed import (
    allreduce_mean_,
    allreduce_mean_tensors_,
    distributed_implicit_hypergrad,
    exit_rank,
    gather_objects,
    init_process_group_from_env,
    tensor_digest,
)
from bissl.distributed.shard import ShardLayout
from bissl.distributed.testing import bilevel_objectives, step_data
from bissl.hypergrad import HypergradSettings, implicit_hypergrad
from bissl.ops.flat import flatten
from bissl.testing import dense_hessian

_calls = {"all_reduce": 0}
_real_all_reduce = dist.all_reduce


def _counting_all_reduce(*args, **kwargs):
    _calls["all_reduce"] += 1
    return _real_all_reduce(*args, **kwargs)


def _count(fn):
    before = _calls["all_reduce"]
    out = fn()
    return out, _calls["all_reduce"] - before


def check_allreduce(rank: int, world: int) -> dict:
    out = {}
    expected_factor = sum(r + 1 for r in range(world)) / world
    for numel in (1, 127, 1000):
        for bucket in (None, 1, 7, numel - 1 or 1, numel, 10 * numel):
            flat = torch.arange(numel, dtype=torch.float64) * (rank + 1)
            issued, counted = _count(lambda f=flat, b=bucket: allreduce_mean_(f, bucket_numel=b))
            err = (flat - torch.arange(numel, dtype=torch.float64) * expected_factor).abs().max().item()
            want = 1 if bucket is None else math.ceil(numel / bucket)
            out[f"flat P={numel} bucket={bucket}"] = {
                "err": err,
                "issued": issued,
                "counted": counted,
                "expected": want,
            }
    tensors = [
        torch.full((3, 4), float(rank + 1)),
        torch.full((5,), 2.0 * (rank + 1)),
        torch.full((2, 2), 3.0 * (rank + 1), dtype=torch.float64),
    ]
    issued, counted = _count(lambda: allreduce_mean_tensors_(tensors))
    err = max(
        (t - t.new_full(t.shape, c * expected_factor)).abs().max().item() for t, c in zip(tensors, (1.0, 2.0, 3.0))
    )
    out["tensors (float32 + float64)"] = {"err": err, "issued": issued, "counted": counted, "expected": 2}
    return out


def _mlp_problem(world: int, seed: int):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
    lower, upper = bilevel_objectives(backbone, 6, classes=3, proj_dims=(4,), gamma=1.0, seed=seed)
    lower, upper = lower.double(), upper.double()
    data = step_data(seed, 0, world=world, batch=8 * world, image=(5,))

    def to64(b):
        return tuple(t.double() if t.is_floating_point() else t for t in b)

    hvp, down = [to64(b) for b in data.hvp], [to64(b) for b in data.upper]
    theta = {k: p.detach().clone() for k, p in lower.backbone.named_parameters()}

    def with_theta(module, th, batch):
        return functional_call(module, {f"backbone.{k}": v for k, v in th.items()}, (batch,))

    shard_losses = [
        (lambda th, b=b: with_theta(lower, th, b), lambda th, b=d: with_theta(upper, th, b)) for b, d in zip(hvp, down)
    ]
    return theta, shard_losses


def check_hypergrad(rank: int, world: int, seed: int, damping: float, iters: int, bucket: int | None) -> dict:
    theta, shards = _mlp_problem(world, seed)
    lam = 0.5
    lower_r, upper_r = shards[rank]
    trace: list[tuple[str, str]] = []
    settings = HypergradSettings(iters=iters, damping=damping)
    (x, info), counted = _count(
        lambda: distributed_implicit_hypergrad(
            lower_r,
            upper_r,
            theta,
            lam=lam,
            settings=settings,
            return_info=True,
            bucket_numel=bucket,
            on_matvec=lambda p, hp: trace.append((tensor_digest(p), tensor_digest(hp))),
        )
    )
    x_flat = flatten(x)

    # (a) single process, shard-averaged losses, same number of iterations
    def mean_lower(th):
        return torch.stack([lo(th) for lo, _ in shards]).mean()

    def mean_upper(th):
        return torch.stack([up(th) for _, up in shards]).mean()

    x_single = flatten(implicit_hypergrad(mean_lower, mean_upper, theta, lam=lam, iters=iters, damping=damping))
    # (b) dense: shard-averaged Hessian and right-hand side, exact solve
    H = dense_hessian(mean_lower, theta)
    leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    v = flatten(dict(zip(leaves, torch.autograd.grad(mean_upper(leaves), tuple(leaves.values())))))
    A = torch.eye(H.shape[0], dtype=H.dtype) + (H + H.T) / 2 / (lam + damping)
    x_dense = torch.linalg.solve(A, v)
    # control: the same solve without reductions differs between ranks
    x_local = flatten(implicit_hypergrad(lower_r, upper_r, theta, lam=lam, iters=iters, damping=damping, strict=False))
    state = {
        "matvecs": trace,
        "x": tensor_digest(x_flat),
        "alphas": tensor_digest(info.alphas),
        "betas": tensor_digest(info.betas),
        "iters": int(info.iters),
    }
    states = gather_objects(state)
    local_digests = gather_objects(tensor_digest(x_local))
    return {
        "numel": x_flat.numel(),
        "iters": iters,
        "bucket": bucket,
        "err_vs_single_process": ((x_flat - x_single).norm() / x_single.norm()).item(),
        "err_vs_dense": ((x_flat - x_dense).norm() / x_dense.norm()).item(),
        "min_eig_A": torch.linalg.eigvalsh(A)[0].item(),
        "cg_state_identical": all(s == states[0] for s in states),
        "num_matvecs": len(trace),
        "num_collectives_reported": info.num_collectives,
        "num_collectives_counted": counted,
        "unreduced_solutions_identical": len(set(local_digests)) == 1,
    }


class _HostSync(RuntimeError):
    pass


def _trap_host_syncs():
    """Make every tensor-to-host read raise (``bool``, ``item``, ``tolist``); returns an undo."""
    saved = {name: getattr(torch.Tensor, name) for name in ("__bool__", "item", "tolist")}

    def trap(self, *args, **kwargs):
        raise _HostSync("host synchronisation during the solve")

    for name in saved:
        setattr(torch.Tensor, name, trap)
    return lambda: [setattr(torch.Tensor, n, f) for n, f in saved.items()]


def check_sharded(rank: int, world: int) -> dict:
    """Sharded vs unsharded solves of the same data-parallel system, every solver."""
    theta, shards = _mlp_problem(world, seed=0)
    lower_r, upper_r = shards[rank]
    out: dict = {
        "numel": sum(t.numel() for t in theta.values()),
        "local_numel": ShardLayout([t.numel() for t in theta.values()], world, rank).local_numel,
    }
    for solver in ("cg", "cg_layerwise", "minres", "neumann", "identity"):
        s = HypergradSettings(iters=7, damping=20.0, solver=solver)
        whole = flatten(distributed_implicit_hypergrad(lower_r, upper_r, theta, lam=0.5, settings=s))
        (x, info), counted = _count(
            lambda s=s: distributed_implicit_hypergrad(
                lower_r, upper_r, theta, lam=0.5, settings=s, shard=True, return_info=True
            )
        )
        part = flatten(x)
        digests = gather_objects((tensor_digest(part), tensor_digest(info.alphas), tensor_digest(info.betas)))
        out[solver] = {
            "rel_err": ((part - whole).norm() / whole.norm()).item(),
            "identical_on_ranks": len(set(digests)) == 1,
            "collectives": counted,
        }
    # Fixed iterations, report-only (strict=False): no host sync between the start and the end.
    s = HypergradSettings(iters=5, damping=20.0, strict=False)
    undo = _trap_host_syncs()
    try:
        distributed_implicit_hypergrad(lower_r, upper_r, theta, lam=0.5, settings=s, shard=True)
        out["host_sync"] = None
    except _HostSync as err:
        out["host_sync"] = str(err)
    finally:
        undo()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    info = init_process_group_from_env(timeout_s=60)
    dist.all_reduce = _counting_all_reduce  # count every collective our code issues
    result = {
        "world_size": info.world_size,
        "allreduce": check_allreduce(info.rank, info.world_size),
        "hypergrad": [
            check_hypergrad(info.rank, info.world_size, seed=0, damping=8.0, iters=5, bucket=None),
            check_hypergrad(info.rank, info.world_size, seed=0, damping=8.0, iters=100, bucket=None),
            check_hypergrad(info.rank, info.world_size, seed=0, damping=8.0, iters=5, bucket=17),
        ],
        "sharded": check_sharded(info.rank, info.world_size),
    }
    dist.all_reduce = _real_all_reduce
    if info.rank == 0:
        torch.save(result, args.out / "result.pt")
    exit_rank(0)


if __name__ == "__main__":
    main()
