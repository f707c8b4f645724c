"""One model under training on 1..N ranks, plain torch or a DeepSpeed engine, behind one interface.

Every phase of the pipeline (pretext pretraining, the two copies of the BiSSL stage, fine-tuning)
trains its models through a :class:`Trainable`, so the phase code never branches on the engine:

* :class:`PlainTrainable` — a torch optimizer; with several ranks (ZeRO stage 0) the gradients are
  averaged after ``backward`` with flat bucketed all-reduces (:func:`allreduce_mean_tensors_`), which
  makes every rank take the identical step (data parallelism without DeepSpeed);
* :class:`EngineTrainable` — a DeepSpeed engine with ZeRO stage 1, 2 or 3 (optimizer states,
  + gradients, + parameters sharded); averaging, partitioning and the optimizer step are DeepSpeed's.

Between ``backward`` and ``step`` a caller may read and change the (averaged) gradients with
:meth:`Trainable.grad_pass`: per parameter it hands ``fn`` views ``(w, g, *companions)`` that are
the full tensors (plain, ZeRO-1/2) or this rank's partition of each (ZeRO-3, where the partial sums
``fn`` returns are then all-reduced). The BiSSL lower step adds its proximal gradient ``λ(θ − φ)``
this way, and LARS runs this way under ZeRO: its per-tensor trust ratio needs ‖w‖ and ‖d‖ of whole
tensors, which a flat optimizer partition does not have, so the engine gets plain SGD with
momentum and the gradient is first transformed to ``trust·(c·g + wd·w)`` (``c`` the clipping
factor) from per-tensor sums — the same update as :class:`bissl.optim.LARS` after clipping.

Floating-point buffers (BatchNorm running statistics) are averaged across ranks after every step,
so every rank, and every checkpoint, holds one model.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from bissl.distributed.collectives import allreduce_mean_tensors_
from bissl.distributed.collectives import rank as current_rank
from bissl.distributed.collectives import world_size as current_world_size
from bissl.distributed.zero3 import gathered
from bissl.ops.reference import dot_ref
from bissl.optim import LARS, lars_trust

SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
#: ``fn(i, w, g, *companions) -> (k,) partial sums or None`` of :meth:`Trainable.grad_pass`.
GradFn = Callable[..., "Tensor | None"]
#: torch.nn.utils.clip_grad_norm_'s guard in ``max_norm / (total_norm + eps)``.
_CLIP_EPS = 1e-6


class NonFiniteGradientError(FloatingPointError):
    """The averaged gradient of a step was NaN or Inf (DeepSpeed skipped the step)."""


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer of the pipeline and its total-norm clipping.

    Attributes:
        kind: ``sgd`` (momentum), ``lars`` (:class:`bissl.optim.LARS`) or ``adamw``.
        lr, momentum, weight_decay: as the torch optimizers (``momentum`` unused by AdamW, whose
            decay applies to weight matrices and kernels only, ``dim >= 2``: biases and norm
            affine parameters are not decayed, as LARS excludes them).
        eta: LARS trust coefficient.
        clip_norm: total gradient-norm clipping before the step (None: none).
        betas: AdamW ``(β1, β2)``.
    """

    kind: Literal["sgd", "lars", "adamw"]
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    eta: float = 1e-3
    clip_norm: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)

    def build(self, params: Sequence[nn.Parameter], *, partitions: bool = False) -> torch.optim.Optimizer:
        """The torch optimizer. ``partitions``: it will see flat ZeRO partitions, so LARS becomes
        SGD with momentum and no weight decay (the trust-ratio transform supplies both)."""
        params = list(params)
        if self.kind == "lars":
            if partitions:
                return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=0.0)
            return LARS(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, eta=self.eta)
        if self.kind == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.kind == "adamw":
            # Parameter groups survive ZeRO's flattening (one flat partition per group).
            groups = [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ]
            return torch.optim.AdamW(
                [g for g in groups if g["params"]], lr=self.lr, betas=(self.betas[0], self.betas[1])
            )
        raise ValueError(f"unknown optimizer kind {self.kind!r}; choose 'sgd', 'lars' or 'adamw'")


@dataclass(frozen=True)
class DataParallel:
    """The data-parallel layout of a run: ``world`` ranks, this ``rank``, and the ZeRO settings.

    Attributes:
        world, rank: process-group size and this process's rank (1 and 0 without one).
        zero: the ``deepspeed`` config section (:class:`bissl.config.DeepSpeedConfig`), or None
            for plain data parallelism.
    """

    world: int = 1
    rank: int = 0
    zero: Any = None

    @classmethod
    def current(cls, zero: Any = None) -> DataParallel:
        """The layout of the initialised process group (or a single process)."""
        return cls(current_world_size(), current_rank(), zero)

    @property
    def zero_stage(self) -> int:
        return 0 if self.zero is None else int(self.zero.zero_stage)

    @property
    def bucket_numel(self) -> int | None:
        return None if self.zero is None else self.zero.hypergrad_bucket_numel

    def trainable(self, module: nn.Module, spec: OptimizerSpec, scheduler: SchedulerFactory | None = None) -> Trainable:
        """``module`` under training: a DeepSpeed engine at ZeRO >= 1, else plain torch."""
        if self.zero_stage >= 1:
            return EngineTrainable(module, spec, scheduler, self)
        return PlainTrainable(module, spec, scheduler, self)

    def average_buffers_(self, module: nn.Module) -> int:
        """Average ``module``'s floating-point buffers across ranks (one flat all-reduce).

        Running means average exactly to the mean over all shards; without SyncBN running
        variances average to the mean of the per-shard variances. With SyncBN every rank holds the
        same values already. Integer buffers (``num_batches_tracked``) are equal on all ranks.
        """
        floats = [b for b in module.buffers() if b.is_floating_point()]
        return allreduce_mean_tensors_(floats, bucket_numel=self.bucket_numel)


class Trainable(ABC):
    """A module, its optimizer, LR schedule and gradient clipping, on every rank of a run.

    Attributes:
        module: the live module (an engine's ``module`` under DeepSpeed).
        partitioned: whether :meth:`grad_pass` and :meth:`param_views` see partitions (ZeRO-3).
    """

    partitioned = False

    def __init__(self, module: nn.Module, spec: OptimizerSpec, dp: DataParallel) -> None:
        self.module = module
        self.spec = spec
        self.dp = dp

    @property
    def functional(self) -> nn.Module:
        """The module to ``functional_call`` with :meth:`full_state` (a meta shadow under ZeRO-3)."""
        return self.module

    @abstractmethod
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The module's forward (through the engine under DeepSpeed)."""

    @abstractmethod
    def backward(self, loss: Tensor) -> None:
        """Backward of ``loss``; afterwards the gradients are averaged across ranks."""

    @abstractmethod
    def step(self) -> Tensor:
        """Clip, optimizer step, LR-schedule step, average the buffers across ranks.

        Returns:
            The total gradient norm before clipping (identical on every rank).
        """

    @abstractmethod
    def skip_step(self) -> None:
        """Advance the LR schedule without changing the parameters (a skipped update)."""

    def zero_grad(self) -> None:  # noqa: B027  an optional hook: nothing to do by default
        """Drop the gradients a plain model keeps after its step (before another optimizer — e.g.
        a DeepSpeed engine, whose backward would add to them — takes over its parameters)."""

    @property
    @abstractmethod
    def lr(self) -> float:
        """The learning rate of the next step."""

    @abstractmethod
    def full_state(self) -> contextlib.AbstractContextManager[dict[str, Tensor]]:
        """Context yielding ``{name: tensor}`` of every parameter (detached, full) and buffer.

        Under ZeRO-3 the parameters are gathered for the duration of the context, read-only.
        """

    def param_views(self, params: Sequence[nn.Parameter]) -> list[Tensor]:
        """Detached views of ``params`` (this module's) in :meth:`grad_pass`'s layout."""
        return [p.detach() for p in params]

    @abstractmethod
    def grad_pass(
        self, fn: GradFn, params: Sequence[nn.Parameter], companions: Sequence[Sequence[Tensor]] = ()
    ) -> Tensor | None:
        """Read and change the averaged gradients of ``params`` between backward and step.

        Args:
            fn: ``fn(i, w, g, *c) -> (k,) tensor or None`` per parameter ``i``: ``w`` its value,
                ``g`` its gradient (change it in place to change the step), ``c`` the ``i``-th
                tensor of each companion list. All are full tensors, or this rank's partitions
                under ZeRO-3 (padding entries are zero).
            params: parameters of this module.
            companions: lists of tensors laid out like ``params`` (from another trainable's
                :meth:`param_views`, e.g. φ for θ).

        Returns:
            ``(len(params), k)`` per-parameter sums over the whole tensors (partial sums
            all-reduced under ZeRO-3), or None when ``fn`` returns nothing.
        """

    def state_dict(self) -> dict[str, Any]:
        """What a rank-0 checkpoint file holds for this model (empty under DeepSpeed: see save)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027  optional, like state_dict
        """Inverse of :meth:`state_dict`."""

    def save(self, directory: Path, tag: str) -> None:  # noqa: B027  optional hook
        """Checkpoint what lives in an engine (all ranks); nothing for a plain model."""

    def load(self, directory: Path, tag: str) -> None:  # noqa: B027  optional hook
        """Inverse of :meth:`save`."""

    @staticmethod
    def _stack(sums: list[Tensor | None]) -> Tensor | None:
        if not sums or sums[0] is None:
            return None
        # fn returns a tensor for every parameter or for none (grad_pass's contract).
        return torch.stack([s.to(torch.float64) for s in cast(list[Tensor], sums)])


class PlainTrainable(Trainable):
    """A torch optimizer on the full model; several ranks average gradients (ZeRO stage 0)."""

    def __init__(
        self, module: nn.Module, spec: OptimizerSpec, scheduler: SchedulerFactory | None, dp: DataParallel
    ) -> None:
        super().__init__(module, spec, dp)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = spec.build(self.params)
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: Tensor) -> None:
        # Gradients are cleared here, not after the step, so the applied gradient stays readable.
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.dp.world > 1:
            # Every rank ran the same graph, so the same parameters have gradients everywhere.
            grads = [p.grad for p in self.params if p.grad is not None]
            allreduce_mean_tensors_(grads, bucket_numel=self.dp.bucket_numel)

    def step(self) -> Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.spec.clip_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.spec.clip_norm)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.dp.world > 1:
            self.dp.average_buffers_(self.module)
        return norm

    def skip_step(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @contextlib.contextmanager
    def full_state(self) -> Iterator[dict[str, Tensor]]:
        yield {**{k: p.detach() for k, p in self.module.named_parameters()}, **dict(self.module.named_buffers())}

    def grad_pass(
        self, fn: GradFn, params: Sequence[nn.Parameter], companions: Sequence[Sequence[Tensor]] = ()
    ) -> Tensor | None:
        sums = []
        for i, p in enumerate(params):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            sums.append(fn(i, p.detach(), p.grad, *(c[i] for c in companions)))
        return self._stack(sums)

    def state_dict(self) -> dict[str, Any]:
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])


def _shape(p: nn.Parameter) -> torch.Size:
    """A parameter's full shape (ZeRO-3 replaces ``p.data`` by an empty tensor)."""
    return getattr(p, "ds_shape", p.shape)


class EngineTrainable(Trainable):
    """A DeepSpeed engine with ZeRO stage 1, 2 or 3 (see the module docstring for LARS)."""

    def __init__(
        self, module: nn.Module, spec: OptimizerSpec, scheduler: SchedulerFactory | None, dp: DataParallel
    ) -> None:
        from bissl.distributed.engines import build_engine, meta_copy

        super().__init__(module, spec, dp)
        self.stage = dp.zero_stage
        if self.stage < 1:
            raise ValueError("EngineTrainable needs ZeRO stage >= 1 (stage 0: PlainTrainable)")
        self.partitioned = self.stage == 3
        # The shadow before the engine: ZeRO-3 replaces parameter storage at initialisation.
        self._shadow = meta_copy(module) if self.partitioned else None
        self.lars = spec.kind == "lars"
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = spec.build(params, partitions=True)
        # LARS clips inside its transform (the trust ratio needs the clipped gradient).
        self.engine = build_engine(
            module, optimizer, settings=dp.zero, clip_norm=None if self.lars else spec.clip_norm, scheduler=scheduler
        )
        self.module = self.engine.module
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    @property
    def functional(self) -> nn.Module:
        if self._shadow is None:
            return self.module
        # The shadow follows the live module's train/eval flags, which change during a run.
        for shadow, live in zip(self._shadow.modules(), self.module.modules()):
            shadow.training = live.training
        return self._shadow

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> Tensor:
        norm = self._lars_transform() if self.lars else None
        skipped = self.engine.skipped_steps
        self.engine.step()
        if self.engine.skipped_steps != skipped:
            raise NonFiniteGradientError("the averaged gradient is not finite (DeepSpeed skipped the step)")
        if norm is None:
            norm = torch.as_tensor(float(self.engine.get_global_grad_norm()))
        self.dp.average_buffers_(self.module)
        return norm

    def skip_step(self) -> None:
        self.engine.zero_grad()
        if self.engine.lr_scheduler is not None:
            self.engine.lr_scheduler.step()

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    @contextlib.contextmanager
    def full_state(self) -> Iterator[dict[str, Tensor]]:
        with gathered(self.module.parameters()):
            yield {**{k: p.detach() for k, p in self.module.named_parameters()}, **dict(self.module.named_buffers())}

    def param_views(self, params: Sequence[nn.Parameter]) -> list[Tensor]:
        if not self.partitioned:
            return [p.detach() for p in params]
        from deepspeed.utils import safe_get_local_fp32_param

        return [safe_get_local_fp32_param(p) for p in params]

    def grad_pass(
        self, fn: GradFn, params: Sequence[nn.Parameter], companions: Sequence[Sequence[Tensor]] = ()
    ) -> Tensor | None:
        from deepspeed.utils import (
            safe_get_full_grad,
            safe_get_local_grad,
            safe_set_full_grad,
            safe_set_local_grad,
        )

        weights = self.param_views(params)
        sums = []
        for i, (p, w) in enumerate(zip(params, weights)):
            get, put = (
                (safe_get_local_grad, safe_set_local_grad)
                if self.partitioned
                else (safe_get_full_grad, safe_set_full_grad)
            )
            g = get(p)
            g = torch.zeros_like(w) if g is None else g.detach().clone()
            sums.append(fn(i, w, g, *(c[i] for c in companions)))
            put(p, g)
        out = self._stack(sums)
        if out is not None and self.partitioned and self.dp.world > 1:
            import torch.distributed as dist

            dist.all_reduce(out)
        return out

    def _lars_transform(self) -> Tensor:
        """Clip by the total norm and apply LARS' direction ``trust·(c·g + wd·w)`` per tensor
        (biases and norm affine parameters: ``c·g``), from per-tensor sums; returns the norm."""
        spec = self.spec

        def stats(i: int, w: Tensor, g: Tensor) -> Tensor:
            return torch.stack([dot_ref(g, g), dot_ref(g, w), dot_ref(w, w)])

        s = self.grad_pass(stats, self.params)
        assert s is not None  # stats returns a tensor for every parameter
        total = s[:, 0].sum().sqrt()
        c = torch.clamp(spec.clip_norm / (total + _CLIP_EPS), max=1.0) if spec.clip_norm else total.new_ones(())
        excluded = torch.tensor([len(_shape(p)) <= 1 for p in self.params])
        wd = torch.where(excluded, 0.0, spec.weight_decay).to(s.dtype)
        d_norm = (c * c * s[:, 0] + 2 * c * wd * s[:, 1] + wd * wd * s[:, 2]).clamp_min(0).sqrt()
        trust = torch.where(excluded, torch.ones_like(d_norm), lars_trust(s[:, 2].sqrt(), d_norm, spec.eta))

        scale_g, scale_w = c * trust, wd * trust  # per tensor; 0-dim factors, no host sync

        def apply(i: int, w: Tensor, g: Tensor) -> None:
            g.mul_(scale_g[i].to(g.dtype)).add_(w * scale_w[i].to(w.dtype))

        self.grad_pass(apply, self.params)
        return total.to(torch.float32)

    def save(self, directory: Path, tag: str) -> None:
        from bissl.distributed.engines import save_engine

        save_engine(self.engine, directory, tag)

    def load(self, directory: Path, tag: str) -> None:
        from bissl.distributed.engines import load_engine

        load_engine(self.engine, directory, tag)
