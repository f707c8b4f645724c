"""The ``deepspeed`` config section -> the DeepSpeed JSON config of an engine.

The section itself (keys, defaults, checks, refused JSON sections) is
:class:`bissl.config.DeepSpeedConfig`; this module only translates it. Keys that would fight the
pipeline are refused there rather than silently ignored: mixed precision (the HVP/CG path is
float32), a DeepSpeed ``optimizer``/``scheduler`` section (optimizers and schedules come from the
config), gradient accumulation other than 1 (one engine step per optimizer step), ZeRO offload
(it needs DeepSpeed's JIT-built CPU Adam).

Bucket sizes are element counts, and DeepSpeed allocates whole buckets up front (ZeRO-3: a
``reduce_bucket_size`` gradient buffer per engine, measured 190 MiB per engine at 5e7 float32
elements), so they are part of every rank's memory: our defaults (5e6, 19 MiB) suit ResNet-sized
models; DeepSpeed's own defaults (5e8) are sized for large language models.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any


def ds_config(section: Any, *, clip_norm: float | None) -> dict[str, Any]:
    """The DeepSpeed JSON config of one engine.

    Args:
        section: a validated :class:`bissl.config.DeepSpeedConfig`.
        clip_norm: total gradient-norm clipping of that engine (None or 0: no clipping).
    """
    if clip_norm is not None and clip_norm < 0:
        raise ValueError(f"clip_norm must be >= 0, got {clip_norm}")
    cfg: dict[str, Any] = {}
    if section.config is not None:
        cfg = copy.deepcopy(json.loads(Path(section.config).read_text()))
    zero = dict(cfg.get("zero_optimization", {}))
    zero.update(
        stage=section.zero_stage,
        reduce_bucket_size=section.reduce_bucket_size,
        allgather_bucket_size=section.allgather_bucket_size,
        overlap_comm=section.overlap_comm,
        contiguous_gradients=section.contiguous_gradients,
    )
    if section.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=section.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=section.stage3_param_persistence_threshold,
            stage3_max_live_parameters=section.stage3_max_live_parameters,
            stage3_max_reuse_distance=section.stage3_max_reuse_distance,
        )
    cfg.update(
        # We never use DeepSpeed's data loader; one engine step per optimizer step.
        train_micro_batch_size_per_gpu=1,
        gradient_accumulation_steps=1,
        gradient_clipping=float(clip_norm or 0.0),
        zero_optimization=zero,
        # A torch optimizer under ZeRO is "untested" for DeepSpeed; our tests cover it.
        zero_allow_untested_optimizer=True,
    )
    cfg.pop("train_batch_size", None)
    cfg.setdefault("steps_per_print", 2**31 - 1)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg
