"""``run_experiment``: one process, or N ranks when ``run.nproc > 1``.

The one entry point of the CLI, sweeps and the Python API; it picks where the run happens and
leaves the how to :func:`bissl.trainer.experiment.run_here` (this process) and
:func:`bissl.trainer.distributed_run.run_distributed` (N rank processes, each calling run_here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bissl.config import Config
from bissl.trainer.preflight import preflight


def run_experiment(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """Run (or resume) every seed of ``cfg`` in ``run_dir``; write results.json and curves.png.

    Args:
        cfg: the experiment config (validated).
        run_dir: the run directory; an existing one must hold a run of the same config.

    Returns:
        The ``results.json`` content (see :func:`bissl.trainer.report.summarize`).

    Raises:
        ConfigError: a setting that cannot run here (named in the message).
        NonFiniteLossError, SolverError, RunInterrupted: from a phase (on any rank).
        DistributedRunError: a rank failed otherwise, or died.
    """
    preflight(cfg)
    if cfg.run.nproc > 1:
        from bissl.trainer.distributed_run import run_distributed

        return run_distributed(cfg, run_dir)
    from bissl.trainer.experiment import run_here

    return run_here(cfg, run_dir)
