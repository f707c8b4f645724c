"""Multi-rank runs of the pipeline: ``bissl run CONFIG --nproc N`` (``run.nproc: N``).

:func:`run_distributed` starts N rank processes on this machine (:func:`bissl.distributed.launch`:
torchrun on 127.0.0.1, a free port, gloo on CPU and NCCL on GPUs), each running :func:`main`, and
returns the run's ``results.json``. Started by an outside launcher instead (``torchrun ... -m
bissl.trainer.distributed_run --config C --run-dir D``), a process is a rank itself.

Every rank runs every phase of every seed (:func:`bissl.trainer.experiment.run_here`) on its
shard of each global batch; rank 0 writes every output. With ``run.workers`` W > 1 the seeds are
split into W groups that run as W concurrent N-rank jobs; the outputs are then summarised once.

Failures: a rank that raises writes ``<run_dir>/.ranks/<job>/rank<r>.error.json`` and exits 1;
torchrun then stops the others and :func:`run_distributed` re-raises the error in the calling
process (``ConfigError``, ``NonFiniteLossError``, ``SolverError`` and ``RunInterrupted`` keep their
type; anything else, or a rank that died without a word, becomes :class:`DistributedRunError`
naming the rank). Re-running the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml

from bissl.config import Config, ConfigError, config_to_dict, load_config
from bissl.distributed.launcher import launch
from bissl.distributed.process_group import exit_rank, init_process_group_from_env
from bissl.distributed.trainable import DataParallel
from bissl.solvers import SolverError
from bissl.trainer.errors import DistributedRunError, NonFiniteLossError, RunInterrupted
from bissl.trainer.experiment import prepare_run_dir, resolve_device, run_here, summarize_done

#: Per-job bookkeeping under the run directory: the rank config and error reports.
JOBS_DIR = ".ranks"
#: Environment variable telling rank 0 whether to draw progress bars (its stderr is a pipe).
PROGRESS_ENV = "BISSL_PROGRESS"
#: Seconds a rank with an unexpected error waits before reporting it (see ``_report_failure``).
SECONDARY_GRACE_S = 2.0
_REraised = (RunInterrupted, NonFiniteLossError, SolverError)


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
        return DistributedRunError(
            f"rank {report['rank']} of {nproc} failed with {kind}: {message} "
            "(its traceback is above); rerun the same command to resume "
            "from the last checkpoint"
        )
    what = (
        summary.removeprefix("bissl launch: ") if summary else (f"the {nproc}-process job failed with exit code {code}")
    )
    return DistributedRunError(f"{what}; rerun the same command to resume from the last checkpoint")


def _run_job(cfg: Config, run_dir: Path, env: dict[str, str]) -> None:
    """One N-rank job over ``cfg.run.seeds``; raises what a rank raised."""
    job_dir = run_dir / JOBS_DIR / uuid.uuid4().hex[:12]
    job_dir.mkdir(parents=True)
    config_path = job_dir / "config.yaml"  # the full config, debug section included
    config_path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    stream = _TailStream(sys.stderr)
    try:
        code = launch(
            cfg.run.nproc,
            [
                "-m",
                "bissl.trainer.distributed_run",
                "--config",
                str(config_path),
                "--run-dir",
                str(run_dir),
                "--job-dir",
                str(job_dir),
            ],
            env=env,
            stream=stream,
        )
        if code != 0:
            raise _job_failure(job_dir, code, list(stream.lines), cfg.run.nproc)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # another job's folder is still there
            job_dir.parent.rmdir()


def run_distributed(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """Run (or resume) the experiment on ``cfg.run.nproc`` ranks; returns ``results.json``'s content.

    In a process started by a launcher (``RANK``/``WORLD_SIZE`` set), run as that rank instead.

    Raises:
        ConfigError: a bad config on a rank (e.g. a batch that does not split into equal shards).
        RunInterrupted, NonFiniteLossError, SolverError: raised by a rank.
        DistributedRunError: a rank failed otherwise, or died (the message names it).
    """
    run_dir = Path(run_dir)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return run_rank(cfg, run_dir)
    prepare_run_dir(cfg, run_dir)  # a config that differs from the run being resumed fails here
    seeds = list(cfg.run.seeds)
    jobs = max(1, min(cfg.run.workers, len(seeds)))
    env = dict(os.environ, **{PROGRESS_ENV: "1" if _progress(cfg) and jobs == 1 else "0"})
    # Cores shared among every rank of every concurrent job (unless run.num_threads says).
    env.setdefault(
        "OMP_NUM_THREADS", str(cfg.run.num_threads or max(1, (os.cpu_count() or 1) // (cfg.run.nproc * jobs)))
    )
    if jobs == 1:
        _run_job(cfg, run_dir, env)
        return json.loads((run_dir / "results.json").read_text())
    groups = [seeds[i::jobs] for i in range(jobs)]
    configs = [dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seeds=g, workers=1)) for g in groups]
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(_run_job, c, run_dir, env) for c in configs]
        errors = [f.exception() for f in futures]
    for err in errors:
        if err is not None:
            raise err
    return summarize_done(cfg, run_dir)


def _progress(cfg: Config) -> bool:
    from bissl.trainer.metrics import progress_enabled

    return progress_enabled(cfg.run.quiet)


# --------------------------------------------------------------------------- a rank
def _quiet(rank: int, zero_stage: int) -> None:
    """Rank-0-only logging: ranks > 0 print no warnings; DeepSpeed logs warnings on rank 0 only."""
    if zero_stage >= 1:
        from bissl.distributed.engines import import_deepspeed

        import_deepspeed()  # its logger is configured at import; adjust it afterwards
        logger = logging.getLogger("DeepSpeed")
        logger.setLevel(logging.WARNING if rank == 0 else logging.ERROR)
        # The engines get torch optimizers on purpose (docs/distributed.md); DeepSpeed warns each time.
        logger.addFilter(lambda record: "untested optimizer" not in record.getMessage())
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*", category=FutureWarning)
    if rank != 0:
        warnings.simplefilter("ignore")


def run_rank(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """This process's part of a multi-rank run: every phase of every seed on its shards.

    Args:
        cfg: the experiment config (``run.nproc`` = the launcher's world size).
        run_dir: the run directory (shared by all ranks).
    """
    device = resolve_device(cfg.run.device)
    backend = "gloo" if device.type == "cpu" else "nccl"
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed must not pick a GPU for a CPU run
    info = init_process_group_from_env(backend=backend)
    if info.world_size != cfg.run.nproc:
        raise ConfigError(f"'run.nproc' is {cfg.run.nproc} but the launcher started {info.world_size} ranks")
    stage = cfg.deepspeed.zero_stage
    _quiet(info.rank, stage)
    dp = DataParallel(info.world_size, info.rank, cfg.deepspeed if stage >= 1 else None)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    return run_here(cfg, run_dir, dp=dp, device=device)


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
        with contextlib.suppress(OSError):
            (job_dir / f"rank{rank}.error.json").write_text(
                json.dumps({"rank": rank, "type": type(err).__name__, "message": str(err)})
            )
    sys.stdout.flush()
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> None:
    """Entry point of one rank: ``python -m bissl.trainer.distributed_run --config C --run-dir D``."""
    parser = argparse.ArgumentParser(
        prog="python -m bissl.trainer.distributed_run",
        description="One rank of a multi-rank bissl run (start it with torchrun, or use `bissl run --nproc N`).",
    )
    parser.add_argument("--config", required=True, help="YAML config (run.nproc = the number of ranks)")
    parser.add_argument("--run-dir", required=True, help="run directory, shared by all ranks")
    parser.add_argument("--job-dir", help=argparse.SUPPRESS)  # set by run_distributed
    args = parser.parse_args(argv)
    job_dir = Path(args.job_dir) if args.job_dir else None
    try:
        run_rank(load_config(args.config), Path(args.run_dir))
    except BaseException as err:  # every failure must end this rank, reported
        _report_failure(err, job_dir)
        os._exit(1)  # no barrier: the other ranks may be inside a collective; the launcher stops them
    exit_rank(0)


if __name__ == "__main__":
    main()
