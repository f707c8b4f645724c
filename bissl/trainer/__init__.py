"""The BiSSL pipeline: phases (pretext, BiSSL, fine-tuning), the resumable loop, outputs."""

from __future__ import annotations

from bissl.trainer.errors import DistributedRunError, NonFiniteLossError, RunInterrupted
from bissl.trainer.experiment import load_pipeline_data, prepare_run_dir, resolve_device
from bissl.trainer.loop import Phase, RunContext, StepBudget, run_phase
from bissl.trainer.report import format_table, summarize
from bissl.trainer.runner import run_experiment

__all__ = [
    "DistributedRunError",
    "NonFiniteLossError",
    "Phase",
    "RunContext",
    "RunInterrupted",
    "StepBudget",
    "format_table",
    "load_pipeline_data",
    "prepare_run_dir",
    "resolve_device",
    "run_experiment",
    "run_phase",
    "summarize",
]
