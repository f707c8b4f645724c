"""Why a run stops early: the exceptions the trainer raises (and the CLI maps to exit statuses)."""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """A loss (or an averaged gradient) became NaN or Inf; the message names the phase, the kind of
    step and its number, and the last checkpoint."""


class RunInterrupted(RuntimeError):
    """Raised by the ``debug.stop_after_steps`` fault injection (tests of resume)."""


class DistributedRunError(RuntimeError):
    """A rank of a multi-rank run failed (the message names it); rerunning resumes the run."""
