"""bissl: fast, kernel-backed BiSSL (bilevel self-supervised pretraining aligned with fine-tuning).

The short API other bilevel projects import::

    from bissl import hvp, linearize_hvp, cg_solve, implicit_hypergrad
    from bissl import argmin, custom_argmin      # θ*(η) = argmin_θ F(θ, η), differentiable by the IFT

The names below are loaded on first use (PEP 562), so ``import bissl.config`` (validating a config
file, the CLI's argument handling) does not import torch or build the kernel extension.
"""

from __future__ import annotations

import importlib
from typing import Any

#: The package version, the one place it is written (pyproject reads it).
__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "argmin": "bissl.hypergrad",
    "custom_argmin": "bissl.hypergrad",
    "implicit_hypergrad": "bissl.hypergrad",
    "reference_hypergrad": "bissl.hypergrad",
    "HypergradSettings": "bissl.hypergrad",
    "batchnorm_stats_frozen": "bissl.ops",
    "flat_spec": "bissl.ops",
    "flatten": "bissl.ops",
    "hvp": "bissl.ops",
    "hvp_batched": "bissl.ops",
    "linearize_hvp": "bissl.ops",
    "unflatten": "bissl.ops",
    "SolveResult": "bissl.solvers",
    "SolverError": "bissl.solvers",
    "Workspace": "bissl.solvers",
    "cg_layerwise_solve": "bissl.solvers",
    "cg_solve": "bissl.solvers",
    "identity_solve": "bissl.solvers",
    "minres_solve": "bissl.solvers",
    "neumann_solve": "bissl.solvers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bissl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
