"""The phase loop, for one process or N ranks: steps, logging, non-finite checks, checkpoints, resume.

A *phase* is one part of the pipeline (pretext pretraining, the BiSSL stage, one fine-tuning run)
expressed as a fixed number of optimizer steps. :func:`run_phase` drives any :class:`Phase`, on
every rank of a run alike:

* it resumes from ``<ckpt_dir>/<name>.pt`` when that exists (model, optimizer, scheduler, data
  order, generator and global RNG states, step counter, metrics-file offset), or skips the phase
  entirely when ``<name>.done.pt`` holds its result. Rank 0 looks and broadcasts what it saw, so
  every rank takes the same branch;
* it writes a checkpoint before the first step, every ``checkpoint_every`` steps, and the result
  at the end, each atomically (:mod:`bissl.trainer.checkpoint`). Every rank holds the same state,
  so rank 0 writes the file; what lives in DeepSpeed engines is saved by all ranks under
  ``<name>.zero/`` first, and the file names that checkpoint's tag — a run killed in between still
  has the previous, complete one;
* it raises :class:`NonFiniteLossError` naming the phase and step when a logged loss is NaN/Inf
  (logged values are rank-averaged, so all ranks raise together).
"""

from __future__ import annotations

import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bissl.distributed.trainable import DataParallel, NonFiniteGradientError
from bissl.trainer.checkpoint import load_checkpoint, save_atomic
from bissl.trainer.errors import NonFiniteLossError, RunInterrupted
from bissl.trainer.metrics import MetricsLog, NullMetrics, is_finite, progress_bar
from bissl.trainer.rng import capture_global_rng, derive_seed, restore_global_rng, seed_everything

CHECKPOINT_FORMAT = 1
#: Exit status of ``debug.stop_mode: exit`` (EX_TEMPFAIL: "try again", i.e. resume).
STOP_EXIT_CODE = 75
_LOSS_COLUMNS = ("loss", "loss_theta", "prox", "val_loss")


@dataclass
class StepBudget:
    """Counts optimizer steps done in this process, for ``debug.stop_after_steps``."""

    stop_after: int | None = None
    mode: str = "raise"
    done: int = 0

    def count(self) -> None:
        self.done += 1
        if self.stop_after is not None and self.done >= self.stop_after:
            if self.mode == "exit":
                os._exit(STOP_EXIT_CODE)  # like a kill: no cleanup, no flushing
            raise RunInterrupted(f"debug.stop_after_steps={self.stop_after} reached")


@dataclass
class RunContext:
    """What every phase of one seed shares: where to write, how often, the step budget."""

    seed: int
    device: torch.device
    ckpt_dir: Path
    metrics: MetricsLog | NullMetrics
    checkpoint_every: int = 200
    log_every: int = 1
    progress: bool = False
    budget: StepBudget = field(default_factory=StepBudget)
    bar_position: int = 0
    dp: DataParallel = field(default_factory=DataParallel)


class Phase(ABC):
    """One part of the pipeline as ``total_steps`` optimizer steps.

    Subclasses build their modules in ``__init__`` (deterministically: the caller seeds the global
    RNG first), implement :meth:`step`, and list every piece of mutable state in
    :meth:`state_dict` so that ``load_state_dict(state_dict())`` continues identically.
    """

    name: str = "phase"

    def __init__(self, total_steps: int) -> None:
        if total_steps < 0:
            raise ValueError(f"{type(self).__name__}: total_steps must be >= 0, got {total_steps}")
        self.total_steps = total_steps
        self.step_idx = 0

    @abstractmethod
    def step(self) -> list[dict[str, Any]]:
        """Run optimizer step ``step_idx + 1`` and advance ``step_idx``.

        Returns:
            Metrics rows (column -> float, 0-dim tensor or str); ``part`` is required. A row with
            ``always_log=True`` is written even between ``log_every`` steps (evaluations, CG).
        """

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """All mutable state except ``step_idx`` and the global RNG (saved by :func:`run_phase`)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""

    @abstractmethod
    def result(self) -> dict[str, Any]:
        """What later phases need (e.g. backbone weights) and final metrics; saved when done."""

    def describe_step(self, step: int) -> str:
        """Human description of step ``step`` (1-based) for error messages."""
        return f"step {step}"

    def save_engines(self, directory: Path, tag: str) -> bool:
        """Save what lives in DeepSpeed engines under ``directory`` as ``tag`` (all ranks).

        Returns:
            Whether anything was saved (False: the phase has no engine, the default).
        """
        return False

    def load_engines(self, directory: Path, tag: str) -> None:
        """Inverse of :meth:`save_engines` (called after :meth:`load_state_dict`)."""
        raise ValueError(f"phase {self.name!r} has no engines to load")


def _to_python(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def _barrier(ctx: RunContext) -> None:
    if ctx.dp.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _broadcast(value: Any, ctx: RunContext) -> Any:
    """Rank 0's ``value`` on every rank."""
    if ctx.dp.world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _save_checkpoint(phase: Phase, ctx: RunContext, path: Path) -> None:
    """Engines first (all ranks), then rank 0's file naming their tag; older tags are pruned."""
    engine_dir = path.with_suffix(".zero")
    tag = f"step{phase.step_idx}"
    saved = phase.save_engines(engine_dir, tag)
    _barrier(ctx)
    if ctx.dp.rank == 0:
        save_atomic(
            {
                "format": CHECKPOINT_FORMAT,
                "phase": phase.name,
                "step_idx": phase.step_idx,
                "state": phase.state_dict(),
                "engine_tag": tag if saved else None,
                "world_size": ctx.dp.world,
                "rng": capture_global_rng(),
                "metrics_offset": ctx.metrics.offset(),
            },
            path,
        )
        if saved:
            _prune_engine_tags(engine_dir, keep=tag)
    _barrier(ctx)


def _prune_engine_tags(engine_dir: Path, keep: str) -> None:
    """Delete engine checkpoints other than ``keep`` (older ones, or a save cut short by a kill)."""
    for part in engine_dir.iterdir() if engine_dir.is_dir() else ():
        for child in part.iterdir() if part.is_dir() else ():
            if child.is_dir() and child.name != keep:
                shutil.rmtree(child, ignore_errors=True)


def restore_phase(phase: Phase, path: Path, ctx: RunContext) -> None:
    """Put ``phase`` back where the checkpoint at ``path`` left it: its state (and its engines'),
    step counter, the global RNG and the metrics file (rows logged after the checkpoint are
    dropped: they are redone). Every rank reads the same file.

    Raises:
        ValueError: the file is not a checkpoint of this phase (format or phase differ), or was
            written by a different number of ranks.
    """
    state = load_checkpoint(path)
    if state.get("format") != CHECKPOINT_FORMAT or state.get("phase") != phase.name:
        raise ValueError(
            f"{path} is not a checkpoint of phase {phase.name!r} (format "
            f"{state.get('format')}, phase {state.get('phase')!r})"
        )
    if state.get("world_size", 1) != ctx.dp.world:
        raise ValueError(
            f"{path} was written by {state.get('world_size', 1)} ranks, this run has "
            f"{ctx.dp.world} ('run.nproc' must not change on resume)"
        )
    phase.load_state_dict(state["state"])
    if state.get("engine_tag") is not None:
        phase.load_engines(path.with_suffix(".zero"), state["engine_tag"])
    phase.step_idx = state["step_idx"]
    restore_global_rng(state["rng"])
    ctx.metrics.truncate(state["metrics_offset"])


def log_rows(
    phase: Phase, rows: list[dict[str, Any]], ctx: RunContext, last_saved: int, start: float, bar: Any
) -> None:
    """Log what one step returned (every ``log_every`` steps, or rows marked ``always_log``).

    Under several ranks every rank runs this: the logged values are rank-averaged, so all ranks
    raise together; ranks > 0 hold a metrics log that writes nothing.

    Raises:
        NonFiniteLossError: a logged loss is NaN or Inf (the message names the phase, the step
            and the last checkpoint).
    """
    step = phase.step_idx
    periodic = step % ctx.log_every == 0 or step == phase.total_steps
    for row in rows:
        if not (periodic or row.pop("always_log", False)):
            continue
        row.pop("always_log", None)
        row = {k: _to_python(v) for k, v in row.items()}
        for col in _LOSS_COLUMNS:
            if not is_finite(row.get(col)):
                raise NonFiniteLossError(
                    f"non-finite {col} ({row[col]}) in phase '{phase.name}' at "
                    f"{phase.describe_step(step)} (seed {ctx.seed}); its last checkpoint "
                    f"is at step {last_saved}. Lower the learning rate or raise the "
                    f"damping, and start a new run directory"
                )
        ctx.metrics.log(
            {
                "seed": ctx.seed,
                "phase": phase.name,
                "step": step,
                "wall_s": round(time.perf_counter() - start, 3),
                **row,
            }
        )
        if row.get("loss") is not None:
            bar.set_postfix_str(f"{row['part']} loss {row['loss']:.4g}", refresh=False)


def step_until_done(phase: Phase, ctx: RunContext, save: Callable[[], None]) -> None:
    """Step ``phase`` to its last step with a progress bar: rows logged by :func:`log_rows`,
    ``save()`` every ``checkpoint_every`` steps (not after the last: the caller saves the result),
    the debug step budget counted after each step."""
    last_saved = phase.step_idx
    start = time.perf_counter()
    bar = progress_bar(
        phase.total_steps, f"seed {ctx.seed} {phase.name}", phase.step_idx, ctx.progress, ctx.bar_position
    )
    try:
        while phase.step_idx < phase.total_steps:
            rows = phase.step()
            log_rows(phase, rows, ctx, last_saved, start, bar)
            bar.update(1)
            step = phase.step_idx
            if step % ctx.checkpoint_every == 0 and step < phase.total_steps:
                save()
                last_saved = step
            ctx.budget.count()
    finally:
        bar.close()


def run_phase(name: str, build: Callable[[], Phase], ctx: RunContext) -> dict[str, Any]:
    """Run (or resume, or skip) a phase and return its :meth:`Phase.result` (every rank calls it).

    Args:
        name: the phase's name (its checkpoint files are ``<name>.pt``, ``<name>.done.pt`` and,
            with DeepSpeed engines, the folder ``<name>.zero``).
        build: constructs the phase; called after the global RNG is seeded with
            ``derive_seed(seed, name)``, so a phase's initialisation never depends on what ran
            before it in this process (and is the same on every rank). Not called when the phase
            is already done.
        ctx: the seed's run context.

    Raises:
        NonFiniteLossError: a logged loss, or an averaged gradient, is NaN or Inf.
        RunInterrupted: the debug step budget ran out.
    """
    ckpt_path = ctx.ckpt_dir / f"{name}.pt"
    done_path = ctx.ckpt_dir / f"{name}.done.pt"
    engine_dir = ckpt_path.with_suffix(".zero")
    decision = None
    if ctx.dp.rank == 0:
        decision = "done" if done_path.exists() else "resume" if ckpt_path.exists() else "fresh"
        if decision == "fresh":
            shutil.rmtree(engine_dir, ignore_errors=True)  # a run killed before its first checkpoint
    decision = _broadcast(decision, ctx)
    if decision == "done":
        return load_checkpoint(done_path)["result"]
    seed_everything(derive_seed(ctx.seed, name))
    phase = build()
    if phase.name != name:
        raise ValueError(f"run_phase: built phase is named {phase.name!r}, expected {name!r}")
    if decision == "resume":
        restore_phase(phase, ckpt_path, ctx)
    else:
        # A checkpoint before any row is logged: whatever this phase logs can always be rolled back.
        _save_checkpoint(phase, ctx, ckpt_path)
    try:
        step_until_done(phase, ctx, lambda: _save_checkpoint(phase, ctx, ckpt_path))
    except NonFiniteGradientError as err:
        raise NonFiniteLossError(
            f"{err} in phase '{phase.name}' at {phase.describe_step(phase.step_idx + 1)} (seed "
            f"{ctx.seed}). Lower the learning rate or raise the damping, and start a new run "
            "directory"
        ) from err
    result = phase.result()
    if ctx.dp.rank == 0:
        save_atomic(
            {
                "format": CHECKPOINT_FORMAT,
                "phase": phase.name,
                "result": result,
                "metrics_offset": ctx.metrics.offset(),
            },
            done_path,
        )
        ckpt_path.unlink(missing_ok=True)
        shutil.rmtree(engine_dir, ignore_errors=True)
    _barrier(ctx)
    return result
