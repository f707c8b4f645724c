"""The inverse-HVP solver settings of a hypergradient, as one value.

:class:`HypergradSettings` holds every keyword of :func:`bissl.hypergrad.implicit_hypergrad` that
says *how* to solve (not *what*: the losses, θ and λ are arguments). Its defaults are that
function's defaults (a test keeps them equal), and the trainer builds one from the ``bissl``
section of a config (:meth:`from_config`), whose defaults are the BiSSL reference's (damping 10,
5 iterations) — so a setting is defined in one place and flows unchanged into the solve:
``implicit_hypergrad(lower, upper, theta, lam=lam, **settings.kwargs())``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

SolverName = Literal["cg", "cg_layerwise", "minres", "neumann", "identity"]
IndefinitePolicy = Literal["raise", "warn", "fallback", "adaptive_damping"]
HVPModeName = Literal["revrev", "fwdrev", "autograd"]


@dataclass(frozen=True)
class HypergradSettings:
    """How ``x = (I + H/(λ + damping))⁻¹ v`` is solved (see :func:`implicit_hypergrad` for each).

    Attributes:
        iters: solver iterations.
        damping: extra damping of the linear system.
        solver: ``cg``, ``cg_layerwise``, ``minres``, ``neumann`` or ``identity``.
        hvp_mode: ``revrev``, ``fwdrev`` or ``autograd`` (the trainer resolves ``auto`` before
            building the settings).
        backend: fused vector-op backend (None: automatic).
        strict: raise on what the indefiniteness policy leaves wrong (NaN/Inf, unresolved
            indefiniteness, non-convergence under ``rtol``).
        on_indefinite: ``raise``, ``warn``, ``fallback`` or ``adaptive_damping``.
        fallback: the solver of ``on_indefinite="fallback"``.
        rtol: relative tolerance for early stopping (None: exactly ``iters`` iterations).
    """

    iters: int = 5
    damping: float = 0.0
    solver: SolverName = "cg"
    hvp_mode: HVPModeName = "revrev"
    backend: str | None = None
    strict: bool = True
    on_indefinite: IndefinitePolicy = "raise"
    fallback: SolverName = "minres"
    rtol: float | None = None

    @classmethod
    def from_config(cls, bissl_section: Any, *, hvp_mode: HVPModeName | None = None) -> HypergradSettings:
        """The settings of a config's ``bissl`` section (:class:`bissl.config.BisslConfig`).

        Args:
            bissl_section: the section.
            hvp_mode: the resolved mode when ``bissl.hvp_mode`` is ``auto`` (or None: the
                section's own value, default ``revrev``).
        """
        mode = hvp_mode or bissl_section.hvp_mode or cls.hvp_mode
        if mode == "auto":
            raise ValueError(
                "HypergradSettings.from_config: resolve hvp_mode 'auto' first (bissl.ops.hvp_mode.select_hvp_mode)"
            )
        return cls(
            iters=bissl_section.cg_iters,
            damping=bissl_section.damping,
            solver=bissl_section.solver,
            hvp_mode=mode,
            backend=bissl_section.backend,
            on_indefinite=bissl_section.on_indefinite,
            fallback=bissl_section.fallback_solver,
        )

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`implicit_hypergrad` these settings stand for."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> HypergradSettings:
        return dataclasses.replace(self, **changes)
