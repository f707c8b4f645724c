"""Multi-rank runs of the pipeline: ``bissl run CONFIG --nproc N`` (``run.nproc: N``).

:func:`run_experiment` (``run.nproc > 1``) calls :func:`run_distributed`, which starts N rank
processes on this machine (:func:`bissl.distributed.launch`: torchrun on 127.0.0.1, a free port,
gloo on CPU and NCCL on GPUs) running :func:`main`, and returns rank 0's ``results.json``. Started
by an outside launcher instead (``torchrun ... -m bissl.trainer.distributed_run --config C
--run-dir D``), the process is a rank itself.

What runs where (see ``docs/distributed.md``):

* **rank 0** runs the whole pipeline (:func:`~bissl.trainer.experiment.run_experiment`): pretext,
  fine-tuning and the baseline arm in-process, exactly as a single-process run, and writes every
  output (``config.yaml``, ``metrics.csv``, checkpoints, ``results.json``, ``curves.png``);
* **the BiSSL stage** of each seed runs on all ranks (:class:`~bissl.trainer.zero_bissl_phase.ZeroBisslPhase`
  under :func:`run_zero_phase`);
* **ranks > 0** wait for rank 0's pretext result of each seed by polling its ``.done.pt`` file,
  join the BiSSL stage, and at the end wait for rank 0's ``finished`` marker. They never wait in a
  collective while rank 0 works alone, so no process-group timeout bounds the rank-0 phases.

Failures: a rank that raises writes ``<run_dir>/.ranks/<job>/rank<r>.error.json`` and exits 1;
torchrun then stops the others and :func:`run_distributed` re-raises the error in the calling
process (``ConfigError``, ``NonFiniteLossError``, ``SolverError`` and ``RunInterrupted`` keep their
type; anything else, or a rank that died without a word, becomes :class:`DistributedRunError`
naming the rank). Re-running the same command resumes from the last checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import time
import traceback
import uuid
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import yaml

from bissl.config import Config, ConfigError, config_to_dict, load_config
from bissl.distributed.collectives import rank as current_rank
from bissl.distributed.launcher import launch
from bissl.distributed.process_group import exit_rank, init_process_group_from_env
from bissl.distributed.sharding import check_shardable
from bissl.solvers import SolverError
from bissl.trainer.builders import PipelineData
from bissl.trainer.checkpoint import load_checkpoint, save_atomic
# run_phase's own restore and stepping loop, so both loops log, check and checkpoint alike.
from bissl.trainer.loop import (
    CHECKPOINT_FORMAT, NonFiniteLossError, RunContext, RunInterrupted, restore_phase, step_until_done,
)
from bissl.trainer.metrics import progress_enabled
from bissl.trainer.rng import capture_global_rng, derive_seed, seed_everything
from bissl.trainer.zero_bissl_phase import ZeroBisslPhase

#: Per-job bookkeeping under the run directory: the rank config, error reports, the end marker.
JOBS_DIR = ".ranks"
#: Environment variable telling rank 0 whether to draw progress bars (its stderr is a pipe).
PROGRESS_ENV = "BISSL_PROGRESS"
#: Seconds between two looks at a file another rank is about to write.
POLL_S = 0.2
#: Seconds a rank with an unexpected error waits before reporting it (see ``_report_failure``).
SECONDARY_GRACE_S = 2.0
_REraised = (RunInterrupted, NonFiniteLossError, SolverError)
_DS_INSTALL = ("pip install --no-deps --no-build-isolation deepspeed==0.19.8, then its pure-Python "
               "requirements (docs/distributed.md)")

# The bissl keys the data-parallel stage implements; any other key must keep its default.
_SUPPORTED = {
    "bissl": {"stages", "lower_steps", "upper_steps", "head_warmup_epochs", "lam", "damping", "gamma",
              "cg_iters", "solver", "on_indefinite", "fallback_solver", "hvp_mode", "hvp_batch_size",
              "clip_norm", "strict", "backend", "lower", "upper",
              "lam_options"},  # options of a lam_schedule, unused while it is 'constant'
    "bissl.lower": {"lr", "momentum", "weight_decay", "eta", "warmup_steps", "final_lr_factor",
                    "batch_size", "optimizer"},
    "bissl.upper": {"lr", "weight_decay", "momentum", "final_lr_factor", "batch_size"},
}


class DistributedRunError(RuntimeError):
    """A rank of a multi-rank run failed (the message names it); rerunning resumes the run."""


# --------------------------------------------------------------------------- config checks
def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _check_defaults(section: Any, key: str, supported: set[str]) -> None:
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.name not in supported and value != _default(f):
            raise ConfigError(f"'{key}.{f.name}' is {value!r} (default {_default(f)!r}), which "
                              "the data-parallel BiSSL stage does not implement; use run.nproc 1 "
                              "for it")


def check_distributed_config(cfg: Config) -> None:
    """Refuse, with a one-line :class:`ConfigError` naming the key, what ``run.nproc > 1`` cannot run.

    The BiSSL stage under DeepSpeed implements the paper's update (constant λ, direct term at φ,
    no proximal pull); every other ``bissl`` key must keep its default. Also checked: one seed at a
    time, one device per rank, image tasks, BYOL only below ZeRO-3, global batch sizes that split
    into equal shards, DeepSpeed installed.
    """
    n = cfg.run.nproc
    if n < 2:
        return
    _check_defaults(cfg.bissl, "bissl", _SUPPORTED["bissl"])
    _check_defaults(cfg.bissl.lower, "bissl.lower", _SUPPORTED["bissl.lower"])
    _check_defaults(cfg.bissl.upper, "bissl.upper", _SUPPORTED["bissl.upper"])
    if cfg.bissl.hvp_mode not in (None, "revrev", "fwdrev", "autograd"):
        raise ConfigError(f"'bissl.hvp_mode' is {cfg.bissl.hvp_mode!r}; with run.nproc > 1 name the "
                          "mode ('revrev', 'fwdrev' or 'autograd': a timed choice could differ "
                          "between ranks)")
    if cfg.run.workers > 1:
        raise ConfigError(f"'run.workers' is {cfg.run.workers}; with run.nproc {n} the seeds run one "
                          "after another (set run.workers 1)")
    if cfg.run.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"'run.device' is {cfg.run.device!r}; with run.nproc > 1 use 'auto', 'cpu' "
                          "or 'cuda' (rank r computes on cuda:r)")
    if cfg.task != "vision":
        raise ConfigError(f"'task' is {cfg.task!r}; run.nproc > 1 supports image tasks only")
    from bissl.distributed.zero_config import DeepSpeedSettings

    stage = DeepSpeedSettings.from_dict(cfg.deepspeed).zero_stage
    if cfg.pretext.method == "byol" and stage == 3:
        raise ConfigError("'pretext.method' is 'byol' with deepspeed.zero_stage 3: BYOL's EMA target "
                          "is updated outside the engines, which ZeRO-3's partitioned parameters do "
                          "not allow; use zero_stage 0-2")
    b = cfg.bissl
    try:
        check_shardable(b.lower.batch_size, n, "'bissl.lower.batch_size'", min_shard=2)
        check_shardable(b.upper.batch_size, n, "'bissl.upper.batch_size'")
        if b.hvp_batch_size is not None:
            check_shardable(b.hvp_batch_size, n, "'bissl.hvp_batch_size'", min_shard=2)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"'run.nproc' is {n} but DeepSpeed is not installed ({_DS_INSTALL})")


# --------------------------------------------------------------------------- the calling process
class _TailStream:
    """Passes text through to ``out`` and keeps the last lines (the launcher's failure summary)."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.lines: deque[str] = deque(maxlen=200)
        self._pending = ""

    def write(self, text: str) -> None:
        self.out.write(text)
        *done, self._pending = (self._pending + text).split("\n")
        self.lines.extend(done)

    def flush(self) -> None:
        self.out.flush()


def _job_failure(job_dir: Path, code: int, lines: list[str], nproc: int) -> Exception:
    """The exception to raise for a failed job: the reporting rank's own, or one naming the rank."""
    reports = []
    for path in job_dir.glob("rank*.error.json"):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    summary = next((ln for ln in reversed(lines) if ln.startswith("bissl launch:")), None)
    first = re.search(r"rank (\d+) \(local rank", summary or "")
    if first is not None:
        # Only the rank that failed first counts: the others' errors (a peer closed the
        # connection) follow from it; if it said nothing (killed), the launcher's line is all.
        reports = [r for r in reports if r["rank"] == int(first.group(1))]
    if reports:
        report = min(reports, key=lambda r: r["rank"])
        kind, message = report["type"], report["message"]
        if kind == "ConfigError":
            return ConfigError(message.removeprefix("config error: "))
        for cls in _REraised:
            if kind == cls.__name__:
                return cls(message)
        return DistributedRunError(f"rank {report['rank']} of {nproc} failed with {kind}: {message} "
                                   "(its traceback is above); rerun the same command to resume "
                                   "from the last checkpoint")
    what = summary.removeprefix("bissl launch: ") if summary else (
        f"the {nproc}-process job failed with exit code {code}")
    return DistributedRunError(f"{what}; rerun the same command to resume from the last checkpoint")


def _launch_ranks(cfg: Config, run_dir: Path) -> dict[str, Any]:
    from bissl.trainer.experiment import prepare_run_dir

    prepare_run_dir(cfg, run_dir)  # a config that differs from the run being resumed fails here
    job_dir = run_dir / JOBS_DIR / uuid.uuid4().hex[:12]
    job_dir.mkdir(parents=True)
    config_path = job_dir / "config.yaml"  # the full config, debug section included
    config_path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    env = dict(os.environ, **{PROGRESS_ENV: "1" if progress_enabled(cfg.run.quiet) else "0"})
    stream = _TailStream(sys.stderr)
    try:
        code = launch(cfg.run.nproc, ["-m", "bissl.trainer.distributed_run", "--config", str(config_path),
                                      "--run-dir", str(run_dir), "--job-dir", str(job_dir)],
                      env=env, stream=stream)
        if code != 0:
            raise _job_failure(job_dir, code, list(stream.lines), cfg.run.nproc)
        return json.loads((run_dir / "results.json").read_text())
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
        try:
            job_dir.parent.rmdir()
        except OSError:
            pass  # another job's folder is still there


def run_distributed(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """Run (or resume) the experiment on ``cfg.run.nproc`` ranks; returns ``results.json``'s content.

    In a process started by a launcher (``RANK``/``WORLD_SIZE`` set), run as that rank instead.

    Raises:
        ConfigError: a key the data-parallel run does not support, or a bad config on a rank.
        RunInterrupted, NonFiniteLossError, SolverError: raised by a rank.
        DistributedRunError: a rank failed otherwise, or died (the message names it).
    """
    check_distributed_config(cfg)
    run_dir = Path(run_dir)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return run_rank(cfg, run_dir)
    return _launch_ranks(cfg, run_dir)


# --------------------------------------------------------------------------- a rank
class _NoMetrics:
    """The metrics log of ranks > 0: rank 0 writes the rows."""

    def log(self, row: dict[str, Any]) -> None:
        return None

    def offset(self) -> int:
        return 0

    def truncate(self, offset: int) -> None:
        return None

    def close(self) -> None:
        return None


def _wait_for(path: Path) -> Path:
    """Block until ``path`` exists (written atomically by rank 0); no collective, no timeout: if
    rank 0 dies, the launcher stops this rank."""
    while not path.exists():
        time.sleep(POLL_S)
    return path


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _prune_engine_tags(engine_dir: Path, keep: str | None) -> None:
    """Delete engine checkpoints other than ``keep`` (older ones, or a save cut short by a kill)."""
    for part in ("lower", "upper"):
        folder = engine_dir / part
        if folder.is_dir():
            for child in folder.iterdir():
                if child.is_dir() and child.name != keep:
                    shutil.rmtree(child, ignore_errors=True)


def _save(phase: ZeroBisslPhase, ctx: RunContext, ckpt_path: Path) -> None:
    """All ranks save their engine partitions; then rank 0 atomically writes the file naming them.

    Killed anywhere in between, the previous ``<name>.pt`` still names a complete checkpoint."""
    phase.save_engines(f"step{phase.step_idx}")
    _barrier()
    if current_rank() == 0:
        save_atomic({"format": CHECKPOINT_FORMAT, "phase": phase.name, "engine": "deepspeed",
                     "step_idx": phase.step_idx, "state": phase.state_dict(), "rng": capture_global_rng(),
                     "metrics_offset": ctx.metrics.offset()}, ckpt_path)
        _prune_engine_tags(phase.engine_dir, phase.engine_tag)


def run_zero_phase(name: str, build: Callable[[Path], ZeroBisslPhase], ctx: RunContext) -> dict[str, Any]:
    """:func:`~bissl.trainer.loop.run_phase` for a phase under DeepSpeed engines (all ranks call it).

    Same contract and files: ``<name>.done.pt`` skips the phase, ``<name>.pt`` resumes it (it names
    the engines' checkpoint under ``<name>.zero/``), a checkpoint before the first step and every
    ``checkpoint_every`` steps. Rank 0 decides what exists and writes every file; all ranks save
    and load their engine partitions.

    Args:
        name: the phase's name.
        build: ``engine_dir -> phase``, called after the global RNG is seeded with
            ``derive_seed(seed, name)`` (same initialisation on every rank).
        ctx: the seed's run context (ranks > 0: a metrics log that writes nothing).
    """
    ckpt_path = ctx.ckpt_dir / f"{name}.pt"
    done_path = ctx.ckpt_dir / f"{name}.done.pt"
    engine_dir = ctx.ckpt_dir / f"{name}.zero"
    is_zero = current_rank() == 0
    decision = None
    if is_zero:
        decision = "done" if done_path.exists() else "resume" if ckpt_path.exists() else "fresh"
        if decision == "fresh":
            shutil.rmtree(engine_dir, ignore_errors=True)  # a run killed before its first checkpoint
    decision = _broadcast(decision)  # every rank takes the branch rank 0 saw
    if decision == "done":
        return load_checkpoint(done_path)["result"]
    seed_everything(derive_seed(ctx.seed, name))
    phase = build(engine_dir)
    if phase.name != name:
        raise ValueError(f"run_zero_phase: built phase is named {phase.name!r}, expected {name!r}")
    if decision == "resume":
        restore_phase(phase, ckpt_path, ctx, engine="deepspeed")
    else:
        _save(phase, ctx, ckpt_path)
    step_until_done(phase, ctx, lambda: _save(phase, ctx, ckpt_path))
    result = phase.result()
    if is_zero:
        save_atomic({"format": CHECKPOINT_FORMAT, "phase": phase.name, "result": result,
                     "metrics_offset": ctx.metrics.offset()}, done_path)
        ckpt_path.unlink(missing_ok=True)
        shutil.rmtree(engine_dir, ignore_errors=True)
    return result


def run_zero_bissl(cfg: Config, data: PipelineData, ctx: RunContext,
                   pretext_result: dict[str, Any]) -> dict[str, Any]:
    """The BiSSL stage of one seed on all ranks; its result is BisslPhase's."""
    return run_zero_phase(ZeroBisslPhase.name, lambda engine_dir: ZeroBisslPhase(
        cfg, data, ctx, pretext_result, engine_dir=engine_dir), ctx)


def _rank_device(cfg: Config) -> tuple[str, torch.device]:
    """``(backend, device)`` of this rank: NCCL on ``cuda:LOCAL_RANK``, or gloo on the CPU."""
    from bissl.trainer.experiment import resolve_device

    if resolve_device(cfg.run.device).type == "cpu":
        return "gloo", torch.device("cpu")
    return "nccl", torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _quiet(rank: int) -> None:
    """Rank-0-only logging: ranks > 0 print no warnings; DeepSpeed logs warnings on rank 0 only."""
    from bissl.distributed.engines import import_deepspeed

    import_deepspeed()  # its logger is configured at import; adjust it afterwards
    logger = logging.getLogger("DeepSpeed")
    logger.setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    # The engines get torch optimizers on purpose (docs/distributed.md); DeepSpeed warns each time.
    logger.addFilter(lambda record: "untested optimizer" not in record.getMessage())
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    if rank != 0:
        warnings.simplefilter("ignore")


def _follow_seed(cfg: Config, data: PipelineData, seed: int, seed_dir: Path, device: torch.device) -> None:
    """A rank > 0's part of one seed: wait for rank 0's pretext result, then the BiSSL stage."""
    ctx = RunContext(seed=seed, device=device, ckpt_dir=seed_dir / "checkpoints", metrics=_NoMetrics(),
                     checkpoint_every=cfg.run.checkpoint_every, log_every=cfg.run.log_every)
    pretext = load_checkpoint(_wait_for(ctx.ckpt_dir / "pretext.done.pt"))["result"]
    run_zero_bissl(cfg, data, ctx, pretext)


def run_rank(cfg: Config, run_dir: Path, job_dir: Path | None = None) -> dict[str, Any]:
    """This process's part of a multi-rank run (see the module docstring); returns ``results.json``.

    Args:
        cfg: the experiment config (``run.nproc`` = the launcher's world size).
        run_dir: the run directory (shared by all ranks).
        job_dir: this job's bookkeeping folder (default: rank 0 makes one under ``run_dir``).
    """
    from bissl.trainer.experiment import configure_torch, load_pipeline_data, run_experiment

    backend, device = _rank_device(cfg)
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed must not pick a GPU for a CPU run
    info = init_process_group_from_env(backend=backend)
    if info.world_size != cfg.run.nproc:
        raise ConfigError(f"'run.nproc' is {cfg.run.nproc} but the launcher started {info.world_size} ranks")
    _quiet(info.rank)
    own_job_dir = info.rank == 0 and job_dir is None  # started by an outside launcher
    if own_job_dir:
        job_dir = run_dir / JOBS_DIR / uuid.uuid4().hex[:12]
        job_dir.mkdir(parents=True)
    job_dir = Path(_broadcast(str(job_dir) if info.rank == 0 else None))
    finished = job_dir / "finished"
    if info.rank == 0:
        results = run_experiment(cfg, run_dir, bissl_runner=run_zero_bissl)
        finished.write_text("ok\n")
    else:
        configure_torch(cfg)
        data = load_pipeline_data(cfg)
        for seed in cfg.run.seeds:
            _follow_seed(cfg, data, seed, run_dir / f"seed_{seed}", device)
        _wait_for(finished)
        results = json.loads((run_dir / "results.json").read_text())
    _barrier()  # every rank has seen the marker
    if own_job_dir:
        shutil.rmtree(job_dir, ignore_errors=True)
        try:
            job_dir.parent.rmdir()
        except OSError:
            pass
    return results


def _report_failure(err: BaseException, job_dir: Path | None) -> None:
    """Tell the calling process what failed (``rank<r>.error.json``) and show it on stderr.

    An unexpected error is reported after :data:`SECONDARY_GRACE_S`: when another rank died first,
    this one typically fails with a gloo/NCCL "connection reset" error, and the launcher stops it
    during the grace period, so the report that reaches the user is the first rank's.
    """
    rank = int(os.environ.get("RANK", "0"))
    expected = isinstance(err, (ConfigError, *_REraised))
    if not expected:
        time.sleep(SECONDARY_GRACE_S)
        traceback.print_exc()
    elif job_dir is None:  # no calling process re-raises it: say it here
        print(f"rank {rank}: {err}", file=sys.stderr)
    if job_dir is not None:
        try:
            (job_dir / f"rank{rank}.error.json").write_text(json.dumps(
                {"rank": rank, "type": type(err).__name__, "message": str(err)}))
        except OSError:
            pass
    sys.stdout.flush()
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> None:
    """Entry point of one rank: ``python -m bissl.trainer.distributed_run --config C --run-dir D``."""
    parser = argparse.ArgumentParser(prog="python -m bissl.trainer.distributed_run",
                                     description="One rank of a multi-rank bissl run (start it "
                                                 "with torchrun, or use `bissl run --nproc N`).")
    parser.add_argument("--config", required=True, help="YAML config (run.nproc = the number of ranks)")
    parser.add_argument("--run-dir", required=True, help="run directory, shared by all ranks")
    parser.add_argument("--job-dir", help=argparse.SUPPRESS)  # set by run_distributed
    args = parser.parse_args(argv)
    job_dir = Path(args.job_dir) if args.job_dir else None
    try:
        run_rank(load_config(args.config), Path(args.run_dir), job_dir)
    except BaseException as err:  # noqa: BLE001 - every failure must end this rank, reported
        _report_failure(err, job_dir)
        os._exit(1)  # no barrier: the other ranks may be inside a collective; the launcher stops them
    exit_rank(0)


if __name__ == "__main__":
    main()
