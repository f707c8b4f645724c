"""DeepSpeed engines (ZeRO stages 1-3) for the models of a multi-rank run, and their checkpoints.

:func:`build_engine` wraps one module in a DeepSpeed engine with the caller's **torch** optimizer
(DeepSpeed's "client optimizer") and optional torch LR scheduler. Gradient averaging across ranks
and the sharding of optimizer states (ZeRO-1), gradients (ZeRO-2) and parameters (ZeRO-3) are
DeepSpeed's; :class:`bissl.distributed.trainable.EngineTrainable` puts the engine behind the same
interface as a plain torch model.

For computations outside the engine's own forward (HVPs, the hypergradient) a ZeRO-3 model also
gets a **shadow**: the same module structure on the ``meta`` device (no storage, no ZeRO hooks),
evaluated with ``torch.func.functional_call`` on gathered parameters. The live module carries
DeepSpeed's gather/release hooks, which must not run inside an HVP; the shadow sidesteps them.

CPU: ``DS_ACCELERATOR=cpu`` is set before DeepSpeed is imported and DeepSpeed's JIT-compiled ops
are marked unavailable (its shared-memory all-reduce would otherwise be compiled on first use),
so nothing is compiled: communication is plain gloo and optimizers are plain torch.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bissl.distributed.zero_config import ds_config

#: Torch optimizers whose update is elementwise, hence unchanged when ZeRO-1/2/3 hands them flat
#: partitions instead of the parameter tensors. Layer-wise rules (LARS) compute per-tensor norms
#: that are not defined on a partition: :class:`bissl.distributed.trainable.EngineTrainable` runs
#: LARS as SGD plus a partition-aware trust-ratio transform of the gradients instead.
ELEMENTWISE_OPTIMIZERS: tuple[type, ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adadelta,
)
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
INSTALL_HINT = (
    "pip install -e '.[distributed]' (DeepSpeed; install torch first so pip never replaces it, see docs/distributed.md)"
)


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


def meta_copy(module: nn.Module) -> nn.Module:
    """The module's structure with every parameter and buffer on ``meta`` (nothing allocated)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def check_optimizer(opt: torch.optim.Optimizer, module: nn.Module, stage: int) -> None:
    """The optimizer must hold exactly the module's trainable parameters, and be elementwise when
    ZeRO hands it flat partitions."""
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"the optimizer must be a torch.optim.Optimizer, got {type(opt).__name__}")
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    if in_opt != trainable:
        raise ValueError(
            f"the optimizer must hold exactly the trainable parameters of "
            f"{type(module).__name__} ({len(in_opt & trainable)} of {len(trainable)} "
            f"shared, {len(in_opt - trainable)} foreign)"
        )
    if stage >= 1 and not isinstance(opt, ELEMENTWISE_OPTIMIZERS):
        raise ValueError(
            f"{type(opt).__name__} is not elementwise: ZeRO stage {stage} gives the "
            "optimizer flat partitions of the parameters, on which per-tensor rules "
            f"are not defined. Use one of {[c.__name__ for c in ELEMENTWISE_OPTIMIZERS]}"
        )


def build_engine(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    settings: Any,
    clip_norm: float | None,
    scheduler: SchedulerFactory | None = None,
) -> Any:
    """Wrap ``module`` in a DeepSpeed engine (call on every rank with identical modules).

    Args:
        module: the model; its forward returns the training loss or whatever the caller needs.
        optimizer: a torch optimizer over exactly the module's trainable parameters (elementwise).
        settings: the ``deepspeed`` config section (:class:`bissl.config.DeepSpeedConfig`),
            ``zero_stage`` >= 1.
        clip_norm: DeepSpeed's total gradient-norm clipping (None or 0: none).
        scheduler: ``optimizer -> LR scheduler``; the engine steps it once per engine step and
            saves it in checkpoints.

    Returns:
        The ``DeepSpeedEngine``; the process group must already be initialised.
    """
    check_optimizer(optimizer, module, settings.zero_stage)
    deepspeed = import_deepspeed()
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError(
            "build_engine: initialise the process group first (bissl.distributed.init_process_group_from_env)"
        )
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config(settings, clip_norm=clip_norm),
        dist_init_required=False,
    )
    return engine


def save_engine(engine: Any, directory: str | Path, tag: str) -> None:
    """Save an engine (module, ZeRO-partitioned optimizer state, scheduler) under
    ``directory/<tag>`` in DeepSpeed's format (one optimizer-state file per rank). All ranks."""
    engine.save_checkpoint(str(directory), tag=tag)


def load_engine(engine: Any, directory: str | Path, tag: str) -> None:
    """Restore what :func:`save_engine` wrote (same world size and ZeRO stage). All ranks.

    Raises:
        FileNotFoundError: no checkpoint ``tag`` under ``directory``.
    """
    if not (Path(directory) / tag).is_dir():
        raise FileNotFoundError(f"load_engine: no checkpoint {tag!r} under {str(directory)!r}")
    path, _ = engine.load_checkpoint(str(directory), tag=tag)
    if path is None:
        raise FileNotFoundError(f"load_engine: DeepSpeed could not load {tag!r} from {str(directory)!r}")
