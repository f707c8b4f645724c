"""Hyperparameter sweeps: a grid of configs run (resumably) through the BiSSL pipeline, collected
into CSVs and drawn as sensitivity plots. See docs/sweeps.md.

The names below load on first use (PEP 562): ``bissl.cli`` imports :mod:`bissl.sweep.cli` to
register the ``sweep`` command, and that must not pull the trainer and matplotlib into every
``bissl`` invocation.

Example:
    >>> from bissl.sweep import run_sweep
    >>> result = run_sweep("bissl/configs/demo_digits.yaml", {"bissl.lam": [1e-3, 1e-2]},
    ...                    seeds=3)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Cell": "grid",
    "make_cells": "grid",
    "parse_grid_args": "grid",
    "validate_grid": "grid",
    "SweepPlan": "plan",
    "build_plan": "plan",
    "read_manifest": "plan",
    "CellOutcome": "runner",
    "SweepResult": "runner",
    "resume_sweep": "runner",
    "run_plan": "runner",
    "run_sweep": "runner",
    "SharingPlan": "sharing",
    "parts_affected": "sharing",
    "plan_sharing": "sharing",
    "register_sweep_command": "cli",
}

__all__ = sorted(_EXPORTS)

# For type checkers only; at run time __getattr__ below loads these names (F401: ruff cannot read
# __all__ = sorted(_EXPORTS), so it does not see them re-exported).
if TYPE_CHECKING:
    from bissl.sweep.cli import register_sweep_command  # noqa: F401
    from bissl.sweep.grid import Cell, make_cells, parse_grid_args, validate_grid  # noqa: F401
    from bissl.sweep.plan import SweepPlan, build_plan, read_manifest  # noqa: F401
    from bissl.sweep.runner import CellOutcome, SweepResult, resume_sweep, run_plan, run_sweep  # noqa: F401
    from bissl.sweep.sharing import SharingPlan, parts_affected, plan_sharing  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bissl.sweep' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"bissl.sweep.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
