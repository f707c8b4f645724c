"""Rank program of tests/distributed/test_step.py (run by ``bissl.distributed.launch``).

Runs the one BiSSL step (:class:`bissl.trainer.bissl_step.BisslStep`) on the toy problem for
``--steps`` stages (2 lower steps + 1 upper step each) with both copies under the given ZeRO stage
(0: plain data parallel), SyncBatchNorm and SimCLR negatives gathered across ranks, each rank on its
shard of the global batches. A checkpoint is taken after stage ``--resume-at``; fresh models from a
*different* initialisation then load it and replay the rest. Rank 0 writes ``result.pt``: the final
parameters of both runs, the metrics rows, and whether parameters, buffers and solver scalars were
bit-identical on all ranks.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from bissl.config import config_from_dict
from bissl.distributed import (
    DataParallel,
    OptimizerSpec,
    exit_rank,
    full_state_dict,
    gather_objects,
    init_process_group_from_env,
    tensor_digest,
)
from bissl.distributed.syncbn import convert_sync_batchnorm
from bissl.distributed.testing import decaying_lr, step_data, toy_objectives
from bissl.hypergrad import HypergradSettings
from bissl.hypergrad.lam_schedules import ConstantLam
from bissl.trainer.bissl_step import BisslSettings, BisslStep

LAM, CLIP = 0.5, 1.0
HYPER = HypergradSettings(iters=4, damping=30.0)


def build(stage: int, shard: bool, seed: int, dp: DataParallel) -> BisslStep:
    """The two copies under training and the step (identically on every rank and in the oracle)."""
    lower, upper = toy_objectives(seed=seed, gather_negatives=True)
    lower, upper = convert_sync_batchnorm(lower), convert_sync_batchnorm(upper)
    lo = dp.trainable(lower, OptimizerSpec("lars", 0.2, weight_decay=1e-3, clip_norm=CLIP), decaying_lr(0.5))
    up = dp.trainable(upper, OptimizerSpec("sgd", 0.05, weight_decay=1e-4, clip_norm=CLIP), decaying_lr(0.25))
    return BisslStep(lo, up, BisslSettings(hyper=HYPER, shard=shard), ConstantLam(LAM), lambda: "test step")


def run(step: BisslStep, stages: range, seed: int, world: int, rank: int) -> list[dict]:
    rows = []
    for k in stages:
        data = step_data(seed, k, world=world)
        for shards in data.lower:
            rows.append(step.lower_step(shards[rank]))
        rows.append(step.upper_step(data.hvp[rank], data.upper[rank]))
    return [{c: (float(v) if isinstance(v, torch.Tensor) else v) for c, v in r.items()} for r in rows]


def state(step: BisslStep) -> dict:
    return {"lower": full_state_dict(step.lower.module), "upper": full_state_dict(step.upper.module)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resume-at", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    info = init_process_group_from_env(timeout_s=120)
    torch.set_num_threads(1)
    torch.set_default_dtype(getattr(torch, args.dtype))
    zero = config_from_dict(
        {
            "deepspeed": {
                "zero_stage": args.stage,
                "reduce_bucket_size": 500,
                "allgather_bucket_size": 500,
                "stage3_prefetch_bucket_size": 500,
                "stage3_param_persistence_threshold": 10,
            }
        }
    ).deepspeed
    dp = DataParallel(info.world_size, info.rank, zero if args.stage >= 1 else None)

    step = build(args.stage, bool(args.shard), args.seed, dp)
    rows = run(step, range(args.resume_at), args.seed, info.world_size, info.rank)
    ckpt = args.out / "ckpt"
    # A deep copy, as a checkpoint file would hold: state dicts reference live tensors.
    plain = copy.deepcopy(
        {"lower": step.lower.state_dict(), "upper": step.upper.state_dict(), "step": step.state_dict()}
    )
    if args.stage >= 1:
        step.lower.save(ckpt / "lower", "resume")
        step.upper.save(ckpt / "upper", "resume")
    rows += run(step, range(args.resume_at, args.steps), args.seed, info.world_size, info.rank)
    final = state(step)
    digests = [tensor_digest(t) for part in final.values() for t in part.values()]
    identical = len(set(map(tuple, gather_objects(digests)))) == 1

    fresh = build(args.stage, bool(args.shard), args.seed + 7, dp)  # another init: the load overwrites it
    fresh.lower.load_state_dict(plain["lower"])
    fresh.upper.load_state_dict(plain["upper"])
    fresh.load_state_dict(plain["step"])
    if args.stage >= 1:
        fresh.lower.load(ckpt / "lower", "resume")
        fresh.upper.load(ckpt / "upper", "resume")
    resumed_rows = run(fresh, range(args.resume_at, args.steps), args.seed, info.world_size, info.rank)
    resumed = state(fresh)
    if info.rank == 0:
        torch.save(
            {
                "final": final,
                "resumed": resumed,
                "rows": rows,
                "resumed_rows": resumed_rows,
                "identical_on_ranks": identical,
                "world_size": info.world_size,
            },
            args.out / "result.pt",
        )
    exit_rank(0)


if __name__ == "__main__":
    main()
