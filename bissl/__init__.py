"""bissl: fast, kernel-backed BiSSL (bilevel self-supervised pretraining aligned with fine-tuning).

The short API other bilevel projects import::

    from bissl import hvp, linearize_hvp, cg_solve, implicit_hypergrad
    from bissl import argmin, custom_argmin      # θ*(η) = argmin_θ F(θ, η), differentiable by the IFT
"""
from __future__ import annotations

from bissl.hypergrad import argmin, custom_argmin, implicit_hypergrad, reference_hypergrad
from bissl.ops import batchnorm_stats_frozen, flat_spec, flatten, hvp, hvp_batched, linearize_hvp, unflatten
from bissl.solvers import (
    SolveResult, SolverError, cg_layerwise_solve, cg_solve, identity_solve, minres_solve, neumann_solve,
)

#: The package version, the one place it is written (pyproject reads it).
__version__ = "0.1.0"

__all__ = sorted([
    "SolveResult", "SolverError", "argmin", "batchnorm_stats_frozen", "cg_layerwise_solve", "cg_solve",
    "custom_argmin", "flat_spec", "flatten", "hvp", "hvp_batched", "identity_solve", "implicit_hypergrad",
    "linearize_hvp", "minres_solve", "neumann_solve", "reference_hypergrad", "unflatten",
])
