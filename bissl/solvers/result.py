"""The one result type every linear solver returns, and its error."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bissl.typing import Vector


class SolverError(RuntimeError):
    """A linear solve whose answer cannot be trusted (breakdown, negative curvature, NaN/Inf,
    or no convergence when a tolerance was asked for)."""


@dataclass
class SolveResult:
    """Solution of ``A x = b`` with diagnostics that stay on the device until read.

    Attributes:
        x: the solution, a dict or flat tensor like ``b``.
        iters: 0-dim int64, iterations that updated ``x``.
        residual_norm: 0-dim, ``‖b − A x‖`` as tracked by the recursion.
        b_norm: 0-dim, ``‖b‖``.
        converged: 0-dim bool, ``residual_norm ≤ max(rtol·‖b‖, atol)`` (with no tolerance given:
            the residual reached round-off level).
        negative_curvature: 0-dim bool, a search direction with ``pᵀAp ≤ 0`` was met (A is not
            positive definite); ``x`` is the last iterate before it.
        nonfinite: 0-dim bool, NaN/Inf appeared in the matvec or the recursion.
        alphas, betas: ``(iters,)`` CG step sizes and direction weights per iteration (0 where an
            iteration was skipped); they define the Lanczos tridiagonal of the Krylov space.
        method: solver name.
        tolerance_requested: whether the caller asked for a tolerance (then non-convergence is an
            error under ``check``).
    """

    x: Vector
    iters: Tensor
    residual_norm: Tensor
    b_norm: Tensor
    converged: Tensor
    negative_curvature: Tensor
    nonfinite: Tensor
    alphas: Tensor = field(default_factory=lambda: torch.empty(0))
    betas: Tensor = field(default_factory=lambda: torch.empty(0))
    method: str = "cg"
    tolerance_requested: bool = False

    def problems(self) -> list[str]:
        """Human-readable list of what went wrong (one host sync). Empty when the answer is usable."""
        flags = torch.stack([self.nonfinite, self.negative_curvature, self.converged]).tolist()
        nonfinite, negative, converged = flags
        out = []
        if nonfinite:
            out.append(f"{self.method}: NaN/Inf appeared in the matvec or the iterates")
        if negative:
            out.append(
                f"{self.method}: negative curvature (pᵀAp ≤ 0) — the system is not positive definite "
                "(increase the damping, or use a solver for indefinite systems)"
            )
        if self.tolerance_requested and not converged and not out:
            out.append(
                f"{self.method}: no convergence after {int(self.iters)} iterations "
                f"(relative residual {float(self.residual_norm / self.b_norm.clamp_min(1e-300)):.3e})"
            )
        return out

    @property
    def ok(self) -> bool:
        """True when :meth:`problems` is empty (syncs)."""
        return not self.problems()

    def check(self) -> "SolveResult":
        """Raise :class:`SolverError` naming the problem if the answer cannot be trusted; else self."""
        problems = self.problems()
        if problems:
            raise SolverError("; ".join(problems))
        return self

    def summary(self) -> dict[str, float | int | bool]:
        """Python scalars for logging (one host sync)."""
        return {
            "iters": int(self.iters),
            "residual_norm": float(self.residual_norm),
            "relative_residual": float(self.residual_norm / self.b_norm.clamp_min(1e-300)),
            "converged": bool(self.converged),
            "negative_curvature": bool(self.negative_curvature),
            "nonfinite": bool(self.nonfinite),
        }
