"""Linear solvers for inverse-Hessian-vector products; all return :class:`SolveResult`.

Every solver takes ``(matvec, b, *, iters, damping=0.0, scale=1.0, strict=False, ...)`` and solves
``(scale·A + damping·I) x = b``; :data:`SOLVERS` maps names to them.
"""
from __future__ import annotations

from bissl.solvers.cg import cg_layerwise_solve, cg_solve
from bissl.solvers.neumann import identity_solve, neumann_solve
from bissl.solvers.result import SolveResult, SolverError

#: Solver name -> function, as accepted by ``implicit_hypergrad(solver=...)`` and the configs.
SOLVERS = {
    "cg": cg_solve,
    "cg_layerwise": cg_layerwise_solve,
    "neumann": neumann_solve,
    "identity": identity_solve,
}


def get_solver(name: str):
    """The solver function registered under ``name``; raises ``ValueError`` listing valid names."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None


__all__ = sorted([
    "SOLVERS", "SolveResult", "SolverError", "cg_layerwise_solve", "cg_solve", "get_solver",
    "identity_solve", "neumann_solve",
])
