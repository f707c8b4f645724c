"""DeepSpeed engines for BiSSL's two copies, and their checkpoints.

:func:`build_bilevel_engines` wraps a :class:`~bissl.distributed.objectives.LowerObjective`
(θ + ψ_P) and an :class:`~bissl.distributed.objectives.UpperObjective` (φ + ψ_D) in one DeepSpeed
engine each, with the same ZeRO stage (0-3), the caller's **torch** optimizers (DeepSpeed's
"client optimizer") and optional torch LR schedulers. Gradient averaging across ranks, total-norm
clipping and the sharding of optimizer states (ZeRO-1), gradients (ZeRO-2) and parameters (ZeRO-3)
are DeepSpeed's; the hypergradient is computed outside the engines (:mod:`bissl.distributed.step`).

For that outside computation each copy also gets a **shadow**: the same module structure on the
``meta`` device (no storage, no ZeRO hooks), evaluated with ``torch.func.functional_call`` on full
parameter tensors. Under ZeRO-3 the live modules carry DeepSpeed's gather/release hooks, which
must not run inside an HVP; the shadow sidesteps them.

CPU: ``DS_ACCELERATOR=cpu`` is set before DeepSpeed is imported and DeepSpeed's JIT-compiled ops
are marked unavailable (its shared-memory all-reduce would otherwise be compiled on first use),
so nothing is compiled: communication is plain gloo and optimizers are plain torch.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bissl.distributed.objectives import LowerObjective, UpperObjective
from bissl.distributed.process_group import init_process_group_from_env
from bissl.distributed.zero_config import DeepSpeedSettings

#: Torch optimizers whose update is elementwise, hence unchanged when ZeRO-1/2/3 hands them flat
#: partitions instead of the parameter tensors. Layer-wise rules (LARS, LAMB) compute per-tensor
#: norms that are not defined on a partition, so they are refused for stages >= 1.
ELEMENTWISE_OPTIMIZERS: tuple[type, ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.RMSprop,
    torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adadelta,
)
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
INSTALL_HINT = ("pip install --no-deps --no-build-isolation deepspeed==0.19.8 && pip install einops "
                "hjson msgpack psutil 'pydantic>=2' py-cpuinfo  (never let pip pick a torch; see "
                "docs/distributed.md)")


def import_deepspeed():
    """Import DeepSpeed set up for this machine (CPU: no accelerator probing, no JIT ops).

    Raises:
        ImportError: DeepSpeed is not installed (the message says how to install it).
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError as err:
        raise ImportError(f"DeepSpeed is not importable ({err}); install it with: {INSTALL_HINT}") from err
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # deepspeed.ops computes this dict lazily by compiling probe programs; an empty dict means
        # "no op is available", so the shm all-reduce is never JIT-built and gloo is used.
        ops = vars(deepspeed.ops)
        if "__compatible_ops__" in ops:
            ops["__compatible_ops__"]["deepspeed_shm_comm"] = False
        else:
            ops["__compatible_ops__"] = {}
    return deepspeed


def _meta_copy(module: nn.Module) -> nn.Module:
    """The module's structure with every parameter and buffer on ``meta`` (nothing allocated)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def _check_pair(lower: LowerObjective, upper: UpperObjective) -> list[str]:
    if not isinstance(lower, LowerObjective) or not isinstance(upper, UpperObjective):
        raise TypeError("build_bilevel_engines: expected a LowerObjective and an UpperObjective, got "
                        f"{type(lower).__name__} and {type(upper).__name__}")
    theta = {k: p.shape for k, p in lower.backbone.named_parameters()}
    phi = {k: p.shape for k, p in upper.backbone.named_parameters()}
    if theta != phi:
        diff = sorted(set(theta.items()) ^ set(phi.items()))[:3]
        raise ValueError(f"build_bilevel_engines: the lower and upper backbones differ (e.g. {diff}); "
                         "θ and φ are paired by parameter name and shape")
    return list(theta)


def _check_optimizer(opt: torch.optim.Optimizer, module: nn.Module, which: str, stage: int) -> None:
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"{which}_optimizer must be a torch.optim.Optimizer, got {type(opt).__name__}")
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    if in_opt != trainable:
        raise ValueError(f"{which}_optimizer must hold exactly the trainable parameters of the {which} "
                         f"objective ({len(in_opt & trainable)} of {len(trainable)} shared, "
                         f"{len(in_opt - trainable)} foreign)")
    if stage >= 1 and not isinstance(opt, ELEMENTWISE_OPTIMIZERS):
        raise ValueError(f"{which}_optimizer {type(opt).__name__} is not elementwise: ZeRO stage {stage} "
                         "gives the optimizer flat partitions of the parameters, on which per-tensor "
                         "rules such as LARS' trust ratio are not defined. Use zero_stage 0 for it, or "
                         f"one of {[c.__name__ for c in ELEMENTWISE_OPTIMIZERS]}")


@dataclass
class BilevelEngines:
    """The two DeepSpeed engines of a BiSSL run and what the hypergradient needs besides them.

    Attributes:
        lower, upper: ``DeepSpeedEngine`` of the lower (θ, ψ_P) and upper (φ, ψ_D) objectives.
        lower_shadow, upper_shadow: meta-device copies for ``functional_call`` (see module doc).
        backbone_names: θ/φ parameter names in backbone order.
        settings: the validated ``deepspeed:`` section.
    """

    lower: Any
    upper: Any
    lower_shadow: LowerObjective
    upper_shadow: UpperObjective
    backbone_names: list[str]
    settings: DeepSpeedSettings

    @property
    def lower_module(self) -> LowerObjective:
        return self.lower.module

    @property
    def upper_module(self) -> UpperObjective:
        return self.upper.module

    @property
    def zero_stage(self) -> int:
        return self.settings.zero_stage


def build_bilevel_engines(
    lower: LowerObjective,
    upper: UpperObjective,
    *,
    lower_optimizer: torch.optim.Optimizer,
    upper_optimizer: torch.optim.Optimizer,
    settings: DeepSpeedSettings | Mapping[str, Any] | None = None,
    lower_clip_norm: float | None = 10.0,
    upper_clip_norm: float | None = 10.0,
    lower_scheduler: SchedulerFactory | None = None,
    upper_scheduler: SchedulerFactory | None = None,
) -> BilevelEngines:
    """Wrap both BiSSL copies in DeepSpeed engines (same ZeRO stage for both).

    Call on every rank with identically initialised modules (e.g. same seed); the process group
    is initialised from the launcher environment if it is not yet.

    Args:
        lower, upper: the two objectives; their backbones must have equal parameter names/shapes.
        lower_optimizer, upper_optimizer: torch optimizers over exactly the trainable parameters of
            each objective (BiSSL: LARS below — stage 0 only, see :data:`ELEMENTWISE_OPTIMIZERS` —
            and SGD with momentum above).
        settings: :class:`DeepSpeedSettings` or the raw ``deepspeed:`` mapping (default: stage 0).
        lower_clip_norm, upper_clip_norm: total gradient-norm clipping per engine (BiSSL: 10).
        lower_scheduler, upper_scheduler: ``optimizer -> LR scheduler`` factories; the engine
            steps them once per engine step and saves them in checkpoints.

    Returns:
        :class:`BilevelEngines`.
    """
    if not isinstance(settings, DeepSpeedSettings):
        settings = DeepSpeedSettings.from_dict(settings)
    names = _check_pair(lower, upper)
    _check_optimizer(lower_optimizer, lower, "lower", settings.zero_stage)
    _check_optimizer(upper_optimizer, upper, "upper", settings.zero_stage)
    deepspeed = import_deepspeed()
    info = init_process_group_from_env()
    deepspeed.init_distributed(dist_backend=info.backend, auto_mpi_discovery=False)
    # Shadows before the engines: ZeRO-3 replaces parameter storage at initialisation.
    lower_shadow, upper_shadow = _meta_copy(lower), _meta_copy(upper)
    engines = []
    for module, opt, clip, sched in ((lower, lower_optimizer, lower_clip_norm, lower_scheduler),
                                     (upper, upper_optimizer, upper_clip_norm, upper_scheduler)):
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=opt, lr_scheduler=sched,
            config=settings.to_ds_config(clip_norm=clip), dist_init_required=False)
        engines.append(engine)
    return BilevelEngines(engines[0], engines[1], lower_shadow, upper_shadow, names, settings)


def save_checkpoint(engines: BilevelEngines, directory: str | Path, tag: str,
                    client_state: Mapping[str, Any] | None = None) -> None:
    """Save both engines (modules, ZeRO-partitioned optimizer states, schedulers) on every rank.

    Layout: ``directory/lower/<tag>/...`` and ``directory/upper/<tag>/...`` (DeepSpeed's own format,
    one optimizer-state file per rank under ZeRO). ``client_state`` (samplers, RNG, counters) is
    stored with the lower engine. Must be called by all ranks.
    """
    directory = Path(directory)
    engines.lower.save_checkpoint(str(directory / "lower"), tag=tag, client_state=dict(client_state or {}))
    engines.upper.save_checkpoint(str(directory / "upper"), tag=tag)


def load_checkpoint(engines: BilevelEngines, directory: str | Path, tag: str) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote (same world size and ZeRO stage); returns the
    ``client_state``. Must be called by all ranks.

    Raises:
        FileNotFoundError: no checkpoint ``tag`` under ``directory``.
    """
    directory = Path(directory)
    for part in ("lower", "upper"):
        if not (directory / part / tag).is_dir():
            raise FileNotFoundError(f"load_checkpoint: no {part} checkpoint {tag!r} under {str(directory)!r}")
    path, client = engines.lower.load_checkpoint(str(directory / "lower"), tag=tag)
    if path is None:
        raise FileNotFoundError(f"load_checkpoint: DeepSpeed could not load the lower engine from {str(directory)!r}")
    path, _ = engines.upper.load_checkpoint(str(directory / "upper"), tag=tag)
    if path is None:
        raise FileNotFoundError(f"load_checkpoint: DeepSpeed could not load the upper engine from {str(directory)!r}")
    return dict(client or {})
