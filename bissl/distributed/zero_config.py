"""The ``deepspeed:`` section of a run config -> the DeepSpeed JSON config of each engine.

Short keys (all optional)::

    deepspeed:
      zero_stage: 2                 # 0, 1, 2 or 3
      reduce_bucket_size: 5000000   # elements per gradient reduce bucket (ZeRO)
      allgather_bucket_size: 5000000
      overlap_comm: false
      contiguous_gradients: true
      stage3_prefetch_bucket_size: 5000000
      stage3_param_persistence_threshold: 100000
      stage3_max_live_parameters: 1000000000
      stage3_max_reuse_distance: 1000000000
      hypergrad_bucket_numel: null  # bucket of the CG all-reduces (null: one per vector)
      config: ds_config.json        # optional DeepSpeed JSON (or a dict) as the starting point

Bucket sizes are element counts, and DeepSpeed allocates whole buckets up front (ZeRO-3: a
``reduce_bucket_size`` gradient buffer per engine, measured 190 MiB per engine at 5e7 float32
elements), so they are part of every rank's memory: our defaults (5e6, 19 MiB) suit ResNet-sized
models; DeepSpeed's own defaults (5e8) are sized for large language models.

The JSON, when given, is the base; short keys override it. Keys that would fight the BiSSL step
are refused rather than silently ignored: mixed precision (the HVP/CG path is float32), a DeepSpeed
``optimizer``/``scheduler`` section (the optimizers are torch optimizers passed by the caller),
gradient accumulation other than 1 (one engine step per BiSSL lower/upper step), ZeRO offload
(it needs DeepSpeed's JIT-built CPU Adam). Clipping comes from the BiSSL ``clip_norm``.
"""
from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

_REFUSED_TOP = {
    "optimizer": "the optimizers are torch optimizers passed to build_bilevel_engines",
    "scheduler": "pass a torch LR scheduler factory to build_bilevel_engines instead",
    "fp16": "the HVP/CG path runs in float32",
    "bf16": "the HVP/CG path runs in float32",
    "amp": "the HVP/CG path runs in float32",
}
_REFUSED_ZERO = {
    "offload_optimizer": "ZeRO offload needs DeepSpeed's JIT-built CPU Adam op",
    "offload_param": "ZeRO offload needs DeepSpeed's JIT-built CPU Adam op",
}


@dataclass(frozen=True)
class DeepSpeedSettings:
    """Validated ``deepspeed:`` section (see module docstring for the meaning of each key)."""

    zero_stage: int = 0
    reduce_bucket_size: int = 5_000_000
    allgather_bucket_size: int = 5_000_000
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    stage3_prefetch_bucket_size: int = 5_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    hypergrad_bucket_numel: int | None = None
    base: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, section: Mapping[str, Any] | None) -> DeepSpeedSettings:
        """Validate a ``deepspeed:`` mapping; unknown keys and bad values raise ``ValueError``."""
        section = dict(section or {})
        base = section.pop("config", None)
        known = {f.name for f in fields(cls)} - {"base"}
        for key in section:
            if key not in known:
                hint = difflib.get_close_matches(key, sorted(known | {"config"}), n=1)
                raise ValueError(f"deepspeed: unknown key {key!r}"
                                 + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        if isinstance(base, (str, Path)):
            path = Path(base)
            if not path.is_file():
                raise ValueError(f"deepspeed.config: no such file {str(path)!r}")
            base = json.loads(path.read_text())
        if base is not None and not isinstance(base, Mapping):
            raise ValueError(f"deepspeed.config must be a JSON file path or a mapping, got {type(base).__name__}")
        if base is not None:
            _check_base(base)
            zero = base.get("zero_optimization", {})
            inherited = {k: zero[k] for k in known & set(zero)}
            if "stage" in zero and "zero_stage" not in section:
                inherited["zero_stage"] = zero["stage"]
            section = {**inherited, **section}
        settings = cls(**section, base=copy.deepcopy(dict(base)) if base is not None else None)
        settings._validate()
        return settings

    def _validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3) or isinstance(self.zero_stage, bool):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("overlap_comm", "contiguous_gradients"):
                if not isinstance(value, bool):
                    raise ValueError(f"deepspeed.{f.name} must be true or false, got {value!r}")
            elif f.name.endswith(("_size", "_threshold", "_parameters", "_distance", "_numel")):
                if value is None and f.name == "hypergrad_bucket_numel":
                    continue
                if isinstance(value, float) and value.is_integer():
                    object.__setattr__(self, f.name, int(value))  # YAML's 5e7 is a float
                    value = int(value)
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"deepspeed.{f.name} must be a positive integer, got {value!r}")

    def to_ds_config(self, *, clip_norm: float | None) -> dict[str, Any]:
        """The DeepSpeed JSON config of one engine (both engines share it up to ``clip_norm``).

        Args:
            clip_norm: total gradient-norm clipping of that engine (None or 0: no clipping).
        """
        if clip_norm is not None and clip_norm < 0:
            raise ValueError(f"clip_norm must be >= 0, got {clip_norm}")
        cfg: dict[str, Any] = copy.deepcopy(dict(self.base)) if self.base else {}
        zero = dict(cfg.get("zero_optimization", {}))
        zero.update(stage=self.zero_stage, reduce_bucket_size=self.reduce_bucket_size,
                    allgather_bucket_size=self.allgather_bucket_size, overlap_comm=self.overlap_comm,
                    contiguous_gradients=self.contiguous_gradients)
        if self.zero_stage == 3:
            zero.update(stage3_prefetch_bucket_size=self.stage3_prefetch_bucket_size,
                        stage3_param_persistence_threshold=self.stage3_param_persistence_threshold,
                        stage3_max_live_parameters=self.stage3_max_live_parameters,
                        stage3_max_reuse_distance=self.stage3_max_reuse_distance)
        cfg.update(
            # We never use DeepSpeed's data loader; one engine step per BiSSL step.
            train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
            gradient_clipping=float(clip_norm or 0.0), zero_optimization=zero,
            # A torch optimizer under ZeRO is "untested" for DeepSpeed; the BiSSL tests cover it.
            zero_allow_untested_optimizer=True,
        )
        cfg.pop("train_batch_size", None)
        cfg.setdefault("steps_per_print", 2**31 - 1)
        cfg.setdefault("wall_clock_breakdown", False)
        return cfg


def _check_base(base: Mapping[str, Any]) -> None:
    for key, why in _REFUSED_TOP.items():
        section = base.get(key)
        if section is not None and (not isinstance(section, Mapping) or section.get("enabled", True)):
            raise ValueError(f"deepspeed.config: {key!r} is not supported ({why})")
    if base.get("gradient_accumulation_steps", 1) != 1:
        raise ValueError("deepspeed.config: gradient_accumulation_steps must be 1 (one engine step per BiSSL step)")
    zero = base.get("zero_optimization", {})
    for key, why in _REFUSED_ZERO.items():
        section = zero.get(key)
        if section and (not isinstance(section, Mapping) or section.get("device", "none") != "none"):
            raise ValueError(f"deepspeed.config: zero_optimization.{key} is not supported ({why})")
