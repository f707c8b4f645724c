"""Linear solvers for inverse-Hessian-vector products; all return :class:`SolveResult`.

Every solver takes ``(matvec, b, *, iters, damping=0.0, scale=1.0, strict=False, ...)`` and solves
``(scale·A + damping·I) x = b``; :data:`SOLVERS` maps names to them. CG, layer-wise CG and Neumann
need a positive definite system; MINRES does not. Each takes ``workspace=`` (:class:`Workspace`) to
keep its work buffers across repeated solves. CG and MINRES also return free Ritz estimates of
the damped operator's spectrum (:mod:`bissl.solvers.lanczos`).
"""

from __future__ import annotations

from bissl.solvers.cg import cg_layerwise_solve, cg_solve
from bissl.solvers.lanczos import Tridiagonal
from bissl.solvers.minres import minres_solve
from bissl.solvers.neumann import identity_solve, neumann_solve
from bissl.solvers.result import IndefiniteSystemWarning, SolverError, SolveResult
from bissl.solvers.workspace import Workspace

#: Solver name -> function, as accepted by ``implicit_hypergrad(solver=...)`` and the configs.
SOLVERS = {
    "cg": cg_solve,
    "cg_layerwise": cg_layerwise_solve,
    "minres": minres_solve,
    "neumann": neumann_solve,
    "identity": identity_solve,
}


def get_solver(name: str):
    """The solver function registered under ``name``; raises ``ValueError`` listing valid names."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None


__all__ = [
    "SOLVERS",
    "IndefiniteSystemWarning",
    "SolveResult",
    "SolverError",
    "Tridiagonal",
    "Workspace",
    "cg_layerwise_solve",
    "cg_solve",
    "get_solver",
    "identity_solve",
    "minres_solve",
    "neumann_solve",
]
