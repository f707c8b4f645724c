"""Rank program of the ZeRO tests (run by ``bissl.distributed.launch``; not collected by pytest).

Runs ``--steps`` BiSSL steps of the toy problem under the given ZeRO stage, saving a checkpoint
before step ``--resume-at``; then builds fresh engines from a *different* initialisation, loads
that checkpoint and replays the remaining steps. Rank 0 writes ``result.pt`` with the final
parameters of both runs, whether the CG state and buffers were bit-identical on all ranks, and
collective counts. The pytest side compares against the single-process oracle.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bissl.distributed import (
    HypergradSettings,
    bissl_step,
    build_bilevel_engines,
    exit_rank,
    gather_objects,
    init_process_group_from_env,
    load_checkpoint,
    save_checkpoint,
    tensor_digest,
)
from bissl.distributed.testing import (
    decaying_lr,
    parameters_of,
    sgd_factory,
    step_data,
    toy_objectives,
)

HYPER = HypergradSettings(damping=30.0, iters=4)
CLIP = {"lower_clip_norm": 1.0, "upper_clip_norm": 1.0}
LOWER_LR_DECAY, UPPER_LR_DECAY = 0.5, 0.25


def _engines(stage: int, seed: int, bucket: int | None):
    lower, upper = toy_objectives(seed=seed)
    sgd = sgd_factory()
    settings = {"zero_stage": stage, "reduce_bucket_size": 500, "allgather_bucket_size": 500,
                "stage3_prefetch_bucket_size": 500, "stage3_param_persistence_threshold": 10,
                "hypergrad_bucket_numel": bucket}
    return build_bilevel_engines(lower, upper, lower_optimizer=sgd(lower), upper_optimizer=sgd(upper),
                                 settings=settings, lower_scheduler=decaying_lr(LOWER_LR_DECAY),
                                 upper_scheduler=decaying_lr(UPPER_LR_DECAY), **CLIP)


def _run(engines, steps: range, seed: int, world: int, rank: int, trace: list) -> None:
    for step in steps:
        lower_b, hvp_b, upper_b = step_data(seed, step, world=world).for_rank(rank)
        matvecs: list[tuple[str, str]] = []
        out = bissl_step(engines, lower_b, hvp_b, upper_b, HYPER,
                         on_matvec=lambda p, hp, seen=matvecs: seen.append((tensor_digest(p), tensor_digest(hp))))
        solve = out["solve"]
        x = torch.cat([t.reshape(-1) for t in solve.x.values()])
        trace.append({"matvecs": matvecs, "x": tensor_digest(x), "alphas": tensor_digest(solve.alphas),
                      "betas": tensor_digest(solve.betas), "collectives": solve.num_collectives})


def _buffer_digests(engines) -> list[str]:
    return [tensor_digest(b) for m in (engines.lower_module, engines.upper_module) for b in m.buffers()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resume-at", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bucket", type=int, default=None)
    args = parser.parse_args()
    info = init_process_group_from_env(timeout_s=120)
    torch.set_num_threads(1)

    engines = _engines(args.stage, args.seed, args.bucket)
    trace: list = []
    _run(engines, range(args.resume_at), args.seed, info.world_size, info.rank, trace)
    save_checkpoint(engines, args.out / "ckpt", "resume", client_state={"step": args.resume_at})
    _run(engines, range(args.resume_at, args.steps), args.seed, info.world_size, info.rank, trace)
    final = {"lower": parameters_of(engines.lower_module), "upper": parameters_of(engines.upper_module)}
    buffers_same = len(set(map(tuple, gather_objects(_buffer_digests(engines))))) == 1
    traces = gather_objects(trace)
    cg_same = all(t == traces[0] for t in traces)

    fresh = _engines(args.stage, args.seed + 7, args.bucket)  # different init: the load must overwrite it
    client = load_checkpoint(fresh, args.out / "ckpt", "resume")
    resumed_trace: list = []
    _run(fresh, range(client["step"], args.steps), args.seed, info.world_size, info.rank, resumed_trace)
    resumed = {"lower": parameters_of(fresh.lower_module), "upper": parameters_of(fresh.upper_module)}

    if info.rank == 0:
        torch.save({"final": final, "resumed": resumed, "cg_identical": cg_same,
                    "buffers_identical": buffers_same, "traces": traces,
                    "resumed_trace_matches": resumed_trace == trace[args.resume_at:],
                    "world_size": info.world_size}, args.out / "result.pt")
    exit_rank(0)


if __name__ == "__main__":
    main()
