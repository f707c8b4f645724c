"""Data-parallel BiSSL: process groups, bucketed collectives, the rank-averaged hypergradient,
DeepSpeed ZeRO engines for both copies, and a torchrun launcher.

Importing this package does not import DeepSpeed; :func:`build_bilevel_engines` does, on first use.
See ``docs/distributed.md``.
"""
from __future__ import annotations

from bissl.distributed.collectives import (
    allreduce_mean_,
    allreduce_mean_tensors_,
    gather_objects,
    rank,
    tensor_digest,
    world_size,
)
from bissl.distributed.engines import (
    ELEMENTWISE_OPTIMIZERS,
    BilevelEngines,
    build_bilevel_engines,
    import_deepspeed,
    load_checkpoint,
    save_checkpoint,
)
from bissl.distributed.hypergrad import distributed_implicit_hypergrad
from bissl.distributed.launcher import TIMEOUT_EXIT_CODE, launch
from bissl.distributed.matvec import DistributedMatVec
from bissl.distributed.objectives import LowerObjective, UpperObjective, gathered
from bissl.distributed.process_group import (
    DistInfo,
    exit_rank,
    init_process_group_from_env,
    shutdown,
)
from bissl.distributed.sharding import check_shardable, shard_of
from bissl.distributed.step import HypergradSettings, average_buffers_, bissl_step
from bissl.distributed.zero_config import DeepSpeedSettings

__all__ = sorted([
    "BilevelEngines", "DeepSpeedSettings", "DistInfo", "DistributedMatVec", "ELEMENTWISE_OPTIMIZERS",
    "HypergradSettings", "LowerObjective", "TIMEOUT_EXIT_CODE", "UpperObjective", "allreduce_mean_",
    "allreduce_mean_tensors_", "average_buffers_", "bissl_step", "build_bilevel_engines", "check_shardable",
    "distributed_implicit_hypergrad", "exit_rank", "gather_objects", "gathered", "import_deepspeed",
    "init_process_group_from_env", "launch", "load_checkpoint", "rank", "save_checkpoint",
    "shard_of", "shutdown", "tensor_digest", "world_size",
])
