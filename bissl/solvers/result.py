"""The one result type every linear solver returns, and its error."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bissl.solvers.lanczos import Tridiagonal
from bissl.typing import Vector


class SolverError(RuntimeError):
    """A linear solve whose answer cannot be trusted (breakdown, negative curvature, NaN/Inf,
    or no convergence when a tolerance was asked for).

    Attributes:
        result: the :class:`SolveResult` that was refused (None when raised before a solve), so a
            caller can tell what went wrong (e.g. ``result.nonfinite``) without parsing the message.
    """

    def __init__(self, message: str, result: SolveResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class IndefiniteSystemWarning(RuntimeWarning):
    """A solver that needs a positive definite system met an indefinite one and its answer was kept
    (``implicit_hypergrad(on_indefinite="warn")``)."""


@dataclass
class SolveResult:
    """Solution of ``A x = b`` with diagnostics that stay on the device until read.

    Attributes:
        x: the solution, in ``b``'s form (a dict, a tuple/list of tensors or a flat tensor).
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
        tridiagonal: the Lanczos tridiagonal of the damped operator the solver ran on (CG, MINRES;
            None for solvers without one). The Ritz estimates below come from it.
        needs_positive_definite: whether the answer is only valid for a positive definite system
            (CG, layer-wise CG, Neumann). Then :attr:`indefinite` is a problem; for MINRES it is
            information.
        action: what :func:`~bissl.hypergrad.implicit_hypergrad`'s ``on_indefinite`` policy did:
            ``"none"`` (``x`` is the requested solver's answer, untouched), ``"warned"`` (indefinite,
            answer kept, warning issued), ``"fallback:<solver>"`` (re-solved by that solver) or
            ``"adaptive_damping"`` (re-solved with a larger damping, see ``damping_used``).
        damping_used: the damping of the system ``x`` solves, when set by the hypergradient layer.
        initial: the first solve when a policy re-solved (its flags say why), else None.
        num_collectives: collectives a data-parallel solve issued, when set by
            :func:`bissl.distributed.distributed_implicit_hypergrad` (unsharded), else None.
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
    tridiagonal: Tridiagonal | None = None
    needs_positive_definite: bool = True
    action: str = "none"
    damping_used: float | None = None
    initial: SolveResult | None = None
    num_collectives: int | None = field(default=None, repr=False, compare=False)
    _ritz: tuple[Tensor, Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    # -- spectrum estimates (lazy: eigvalsh synchronises on CUDA) ---------------------------------

    def _extremes(self) -> tuple[Tensor, Tensor]:
        if self._ritz is None:
            if self.tridiagonal is None:
                nan = torch.full((), float("nan"), dtype=self.residual_norm.dtype, device=self.residual_norm.device)
                self._ritz = (nan, nan)
            else:
                self._ritz = self.tridiagonal.ritz_extremes()
        return self._ritz

    @property
    def ritz_min(self) -> Tensor:
        """0-dim smallest Ritz value of the damped operator (``≥ λ_min``); NaN without a tridiagonal.

        Computed on first read with ``torch.linalg.eigvalsh`` on a ``k×k`` matrix: no extra matvec;
        on CUDA this read synchronises the device (the solve itself does not).
        """
        return self._extremes()[0]

    @property
    def ritz_max(self) -> Tensor:
        """0-dim largest Ritz value of the damped operator (``≤ λ_max``); NaN without a tridiagonal."""
        return self._extremes()[1]

    @property
    def condition_estimate(self) -> Tensor:
        """0-dim ``ritz_max / ritz_min``, a lower bound of ``κ``; NaN when ``ritz_min ≤ 0`` or unknown."""
        lo, hi = self._extremes()
        return torch.where(lo > 0, hi / torch.where(lo > 0, lo, 1), float("nan"))

    @property
    def indefinite(self) -> Tensor:
        """0-dim bool: ``pᵀAp ≤ 0`` was met or a Ritz value is ``≤ 0`` (the operator is not positive
        definite on the Krylov space explored). Reads :attr:`ritz_min` (lazy)."""
        return self.negative_curvature | (self.ritz_min <= 0)

    def ritz_values(self) -> Tensor:
        """All Ritz values ``(m,)`` ascending (empty without a tridiagonal; one host sync)."""
        if self.tridiagonal is None:
            return self.residual_norm.new_zeros(0)
        return self.tridiagonal.ritz_values()

    # -- verdicts --------------------------------------------------------------------------------

    def problems(self, ignore_indefinite: bool = False) -> list[str]:
        """Human-readable list of what went wrong (one host sync). Empty when the answer is usable.

        Args:
            ignore_indefinite: leave out indefiniteness (a policy has accepted it).
        """
        check_pd = self.needs_positive_definite and not ignore_indefinite
        indefinite = self.indefinite if check_pd else self.negative_curvature
        flags = torch.stack([self.nonfinite, self.negative_curvature, indefinite, self.converged]).tolist()
        nonfinite, negative, ritz_negative, converged = flags
        out = []
        if nonfinite:
            out.append(f"{self.method}: NaN/Inf appeared in the matvec or the iterates")
        if negative and check_pd:
            out.append(
                f"{self.method}: negative curvature (pᵀAp ≤ 0) — the system is indefinite, not positive "
                "definite (increase the damping, or use a solver for indefinite systems such as 'minres')"
            )
        elif ritz_negative and check_pd:
            out.append(
                f"{self.method}: indefinite system (smallest Ritz value {float(self.ritz_min):.3e} ≤ 0; "
                "increase the damping, or use a solver for indefinite systems such as 'minres')"
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

    def check(self, ignore_indefinite: bool = False) -> SolveResult:
        """Raise :class:`SolverError` naming the problem if the answer cannot be trusted; else self."""
        problems = self.problems(ignore_indefinite)
        if problems:
            raise SolverError("; ".join(problems), result=self)
        return self

    def summary(self) -> dict[str, float | int | bool | str]:
        """Python scalars for logging (one host sync).

        Keys: ``iters``, ``residual_norm``, ``relative_residual``, ``converged``,
        ``negative_curvature``, ``nonfinite`` and ``ritz_min``, ``ritz_max``, ``condition`` (NaN
        where unknown) of this solve; ``indefinite``: this solve or :attr:`initial` was flagged
        indefinite; ``action``; ``damping_used`` (NaN when not set).
        """
        indefinite = self.indefinite
        if self.initial is not None:
            indefinite = indefinite | self.initial.indefinite
        values = torch.stack(
            [
                self.iters.to(torch.float64),
                self.residual_norm.to(torch.float64),
                (self.residual_norm / self.b_norm.clamp_min(1e-300)).to(torch.float64),
                self.converged.to(torch.float64),
                self.negative_curvature.to(torch.float64),
                self.nonfinite.to(torch.float64),
                self.ritz_min.to(torch.float64),
                self.ritz_max.to(torch.float64),
                self.condition_estimate.to(torch.float64),
                indefinite.to(torch.float64),
            ]
        ).tolist()
        return {
            "iters": int(values[0]),
            "residual_norm": values[1],
            "relative_residual": values[2],
            "converged": bool(values[3]),
            "negative_curvature": bool(values[4]),
            "nonfinite": bool(values[5]),
            "ritz_min": values[6],
            "ritz_max": values[7],
            "condition": values[8],
            "indefinite": bool(values[9]),
            "action": self.action,
            "damping_used": float("nan") if self.damping_used is None else float(self.damping_used),
        }
