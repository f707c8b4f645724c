"""Data-parallel BiSSL: process groups, bucketed collectives, models under training on N ranks
(plain torch or DeepSpeed ZeRO 1-3), the rank-averaged (optionally sharded) hypergradient, and a
torchrun launcher.

Importing this package does not import DeepSpeed; building a ZeRO engine does, on first use.
See ``docs/distributed.md``.
"""

from __future__ import annotations

from bissl.distributed.autograd import all_gather_cat, all_reduce_sum
from bissl.distributed.collectives import (
    allreduce_mean_,
    allreduce_mean_tensors_,
    gather_objects,
    rank,
    tensor_digest,
    world_size,
)
from bissl.distributed.hypergrad import distributed_implicit_hypergrad
from bissl.distributed.launcher import TIMEOUT_EXIT_CODE, launch
from bissl.distributed.matvec import DistributedMatVec
from bissl.distributed.objectives import LowerObjective, UpperObjective
from bissl.distributed.process_group import (
    DistInfo,
    exit_rank,
    init_process_group_from_env,
    shutdown,
)
from bissl.distributed.sharding import check_shardable, shard_of
from bissl.distributed.syncbn import SyncBatchNorm, convert_sync_batchnorm
from bissl.distributed.trainable import (
    DataParallel,
    EngineTrainable,
    NonFiniteGradientError,
    OptimizerSpec,
    PlainTrainable,
    Trainable,
)
from bissl.distributed.zero3 import full_state_dict, gathered, modifiable

__all__ = [
    "TIMEOUT_EXIT_CODE",
    "DataParallel",
    "DistInfo",
    "DistributedMatVec",
    "EngineTrainable",
    "LowerObjective",
    "NonFiniteGradientError",
    "OptimizerSpec",
    "PlainTrainable",
    "SyncBatchNorm",
    "Trainable",
    "UpperObjective",
    "all_gather_cat",
    "all_reduce_sum",
    "allreduce_mean_",
    "allreduce_mean_tensors_",
    "check_shardable",
    "convert_sync_batchnorm",
    "distributed_implicit_hypergrad",
    "exit_rank",
    "full_state_dict",
    "gather_objects",
    "gathered",
    "init_process_group_from_env",
    "launch",
    "modifiable",
    "rank",
    "shard_of",
    "shutdown",
    "tensor_digest",
    "world_size",
]
