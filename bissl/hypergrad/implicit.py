"""BiSSL's implicit-function-theorem term of the upper-level gradient.

With the lower problem ``θ*(φ) = argmin_θ L_P(θ) + (λ/2)‖θ − φ‖²``, the IFT gives
``dθ*/dφ = λ (H + λI)⁻¹ = (I + H/λ)⁻¹`` with ``H = ∇²L_P(θ*)`` (symmetric), so the upper gradient
through θ* is ``(I + H/λ)⁻¹ ∇_θ L_D(θ*)``. As the reference code, the linear system may be damped
separately from the proximal weight: we solve ``(I + H/(λ + damping)) x = ∇_θ L_D(θ)``.

Away from a minimum of ``L_P`` (e.g. at random initialisation) ``H`` can have eigenvalues below
``−(λ + damping)``; the system is then indefinite and CG's answer is meaningless. The solvers detect
it for free (``pᵀAp ≤ 0`` or a non-positive Ritz value, :mod:`bissl.solvers.lanczos`) and
:func:`implicit_hypergrad`'s ``on_indefinite`` policy decides what happens.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Literal

import torch

from bissl.ops.batchnorm import batchnorm_stats_frozen
from bissl.ops.flat import AnyVector, FlatSpec, as_form, one_buffer
from bissl.ops.hvp import HVPMode, as_named, linearize_hvp
from bissl.solvers import get_solver
from bissl.solvers.result import IndefiniteSystemWarning, SolveResult, SolverError
from bissl.typing import LossFn

SolverName = Literal["cg", "cg_layerwise", "minres", "neumann", "identity"]
IndefinitePolicy = Literal["raise", "warn", "fallback", "adaptive_damping"]
#: Values of ``implicit_hypergrad(on_indefinite=...)``.
ON_INDEFINITE: tuple[str, ...] = ("raise", "warn", "fallback", "adaptive_damping")
#: Re-solves ``on_indefinite="adaptive_damping"`` may make; each at least doubles ``λ + damping``.
ADAPTIVE_DAMPING_TRIES = 8


def upper_gradient(upper_loss: LossFn, params: AnyVector) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_D(θ), ∇_θ L_D(θ))`` with the gradient flat ``(P,)``, both detached.

    ``params`` may be a dict, a tuple/list of tensors or a flat tensor (``upper_loss`` receives that
    form). ``upper_loss`` may close over a head whose parameters require grad; only ``θ`` is
    differentiated. The HVP BatchNorm policy applies (batch statistics, running buffers untouched).
    """
    named_loss, named, _, _ = as_named(upper_loss, params, "implicit_hypergrad")
    leaves = {k: p.detach().requires_grad_(True) for k, p in named.items()}
    with torch.enable_grad(), batchnorm_stats_frozen():
        loss = named_loss(leaves)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("implicit_hypergrad: upper_loss must return a scalar tensor")
        grads = torch.autograd.grad(loss, tuple(leaves.values()), allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(leaves.values(), grads)])
    return loss.detach(), flat


def _solve(name: str, matvec: Callable | None, v: torch.Tensor, spec: FlatSpec, flat_matvec: bool, *,
           lam: float, damping: float, iters: int, backend: str | None, rtol: float | None) -> SolveResult:
    """One solve of ``(I + H/(λ + damping)) x = v`` by the named solver.

    ``v`` is flat; with ``flat_matvec`` the matvec maps flat to flat (a ``wrap_matvec`` hook's
    contract), otherwise it takes and returns one tensor per parameter, so the solver reads the
    HVP's own outputs where they lie (no concatenated copy) and layer-wise CG sees one block per
    parameter tensor. Either way ``result.x`` is flat.
    """
    solve = get_solver(name)
    # scale = 1/(λ+damp), shift = 1: the scaling is fused into the damped-matvec epilogue.
    kwargs = {"iters": iters, "scale": 1.0 / (lam + damping), "damping": 1.0, "strict": False}
    if name in ("cg", "minres"):
        kwargs.update(backend=backend, rtol=rtol)
    rhs = v if flat_matvec else as_form(v, spec, "tuple")
    if name == "cg_layerwise" and flat_matvec:
        kwargs["segments"] = spec.numels
    result = solve(None if name == "identity" else matvec, rhs, **kwargs)
    if not flat_matvec:
        # The solver returned views of its own flat buffer, one per tensor, in order: that buffer.
        parts = [t.reshape(-1) for t in result.x]
        whole = one_buffer(parts)
        result.x = whole if whole is not None and whole.numel() == spec.numel else torch.cat(parts)
    result.damping_used = float(damping)
    return result


def _next_damping(result: SolveResult, lam: float, damping: float) -> float:
    """A damping that should make ``I + H/(λ + damping)`` positive definite, from the Ritz estimate.

    ``ritz_min = μ`` of ``I + H/c`` (``c = λ + damping``) estimates ``λ_min(H) ≈ (μ − 1)·c``; the new
    ``c' = 2·max(−λ_min(H), c)`` puts the estimated smallest eigenvalue at ``≥ 1/2``. ``μ`` is an upper
    bound of the true one, so the caller re-solves and checks again; ``c`` at least doubles each time.
    """
    c = lam + damping
    mu = float(result.ritz_min)
    h_min = (mu - 1.0) * c if math.isfinite(mu) else -c
    return 2.0 * max(-h_min, c) - lam


def implicit_hypergrad(
    lower_loss: LossFn,
    upper_loss: LossFn,
    lower_params: AnyVector,
    *,
    lam: float,
    iters: int = 5,
    damping: float = 0.0,
    solver: SolverName = "cg",
    hvp_mode: HVPMode = "revrev",
    backend: str | None = None,
    strict: bool = True,
    on_indefinite: IndefinitePolicy = "raise",
    fallback: SolverName = "minres",
    rtol: float | None = None,
    return_info: bool = False,
    reduce_rhs: Callable[[torch.Tensor], object] | None = None,
    wrap_matvec: Callable[[Callable[[torch.Tensor], torch.Tensor]], Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> AnyVector | tuple[AnyVector, SolveResult]:
    """The IFT term ``x = (I + H/(λ + damping))⁻¹ ∇_θ L_D(θ)``, ``H = ∇²_θ L_P(θ)``.

    With ``damping = 0`` this is exactly ``λ (H + λI)⁻¹ ∇_θ L_D(θ)``; BiSSL's upper φ-gradient is then
    ``x + γ ∇_φ L_D(φ)``. The Hessian is linearised once at ``lower_params`` and reused for every
    solver iteration (and for any re-solve the ``on_indefinite`` policy makes).

    Indefinite systems. A solver that needs a positive definite system (``cg``, ``cg_layerwise``,
    ``neumann``) flags ``info.indefinite`` when it meets ``pᵀAp ≤ 0`` or a Ritz value ``≤ 0`` (only
    CG and layer-wise CG can detect it; detection sees the Krylov space the iterations explored,
    not the whole spectrum). Then ``on_indefinite`` decides:

    * ``"raise"`` (default): :class:`~bissl.solvers.SolverError`;
    * ``"warn"``: keep the solver's answer, issue an :class:`~bissl.solvers.IndefiniteSystemWarning`
      (``info.action = "warned"``);
    * ``"fallback"``: re-solve with the ``fallback`` solver — ``"minres"`` (default; exact for
      indefinite systems with enough iterations) or ``"identity"`` (first order, ``x = ∇_θ L_D``)
      (``info.action = "fallback:<name>"``, ``info.initial`` = the flagged solve);
    * ``"adaptive_damping"``: re-solve with a larger damping, chosen from the Ritz estimate of
      ``λ_min(H)``, until the solve is no longer flagged (at most :data:`ADAPTIVE_DAMPING_TRIES`
      times, ``λ + damping`` at least doubling each time). ``x`` then solves the more damped system;
      ``info.damping_used`` says which (``info.action = "adaptive_damping"``).

    ``strict`` says whether what is *left* wrong raises. ``strict=True``: NaN/Inf, non-convergence
    under ``rtol``, and indefiniteness not resolved by the policy (``"raise"``, or adaptive damping
    out of tries) raise. ``strict=False`` means *report only*: nothing raises, ``"raise"`` becomes
    "return the solver's answer with its flags" (no host sync at all in this mode), the other
    policies act as above and return whatever they reached, flagged. Read ``info.summary()``.

    Args:
        lower_loss: ``L_P(θ)`` — the pretext loss *without* the proximal term, a scalar function of
            the backbone dict (may close over a projector/predictor that requires grad).
        upper_loss: ``L_D(θ)`` — the downstream loss evaluated at the lower backbone (closing over
            the downstream head).
        lower_params: ``θ``: a ``{name: Tensor}`` dict, a tuple/list of tensors or a flat ``(P,)``
            tensor; both losses receive that form.
        lam: proximal weight λ > 0 (reference: 0.001).
        iters: solver iterations (reference: 5).
        damping: extra damping of the linear system (reference ``cg_lam_dampening``: 10).
        solver: ``"cg"`` (global CG, default), ``"cg_layerwise"`` (the reference's per-tensor CG),
            ``"minres"`` (symmetric indefinite systems), ``"neumann"`` or ``"identity"`` (first
            order, ``x = ∇_θ L_D``).
        hvp_mode: ``"revrev"`` (default: first-order graph built once, one double backward per
            iteration — measured fastest), ``"fwdrev"`` (``jvp(grad)`` per iteration) or
            ``"autograd"`` (reference-style recompute).
        backend: fused vector-op backend for CG/MINRES (default: auto).
        strict: raise :class:`~bissl.solvers.SolverError` on what the policy leaves wrong
            (default: True, so a wrong hypergradient is never returned silently); False: report only.
        on_indefinite: ``"raise"`` (default), ``"warn"``, ``"fallback"`` or ``"adaptive_damping"``.
        fallback: the solver ``on_indefinite="fallback"`` uses (default: ``"minres"``).
        rtol: optional relative tolerance for early stopping (one host sync per iteration).
        return_info: also return the :class:`~bissl.solvers.SolveResult` of the solve whose ``x`` is
            returned, with ``action``, ``damping_used`` and ``initial`` set.
        reduce_rhs: optional in-place reduction of the flat right-hand side ``v`` before the solve
            (data parallelism: average it across ranks).
        wrap_matvec: optional ``matvec ↦ matvec'`` applied to the flat HVP (e.g. rank averaging,
            tracing). The solver's scalars then come from the wrapped operator only.

    Returns:
        ``x`` in ``lower_params``' form — views of one flat buffer (and the solve info if
        ``return_info``).

    Example:
        >>> x = implicit_hypergrad(pretext_loss, downstream_loss, theta, lam=1e-3, damping=10.0,
        ...                        on_indefinite="fallback")
        >>> g_phi = {k: x[k] + gamma * grad_phi[k] for k in x}
    """
    if not lam > 0:
        raise ValueError(f"implicit_hypergrad: lam must be > 0, got {lam}")
    if damping < 0:
        raise ValueError(f"implicit_hypergrad: damping must be >= 0, got {damping}")
    if on_indefinite not in ON_INDEFINITE:
        raise ValueError(f"implicit_hypergrad: unknown on_indefinite {on_indefinite!r}; "
                         f"choose one of {ON_INDEFINITE}")
    get_solver(solver)
    get_solver(fallback)
    if on_indefinite == "fallback" and fallback == solver:
        raise ValueError(f"implicit_hypergrad: fallback solver must differ from solver ({solver!r})")
    _, v = upper_gradient(upper_loss, lower_params)
    if reduce_rhs is not None:
        reduce_rhs(v)
    matvec, spec, form = None, None, None
    if solver != "identity":
        op = linearize_hvp(lower_loss, lower_params, mode=hvp_mode, need_grad=False)
        spec, form = op.spec, op.form
        # Without a hook the solver gets the HVP's per-parameter outputs as they are (no copy).
        matvec = op.hv_pieces if wrap_matvec is None else wrap_matvec(op.matvec)
    if spec is None:
        _, _, spec, form = as_named(lower_loss, lower_params, "implicit_hypergrad")

    def solve(name: str, damp: float) -> SolveResult:
        if matvec is None and name != "identity":
            raise ValueError(f"implicit_hypergrad: no Hessian for solver {name!r}")
        return _solve(name, matvec, v, spec, wrap_matvec is not None or matvec is None, lam=lam,
                      damping=damp, iters=iters, backend=backend, rtol=rtol)

    result = solve(solver, damping)
    # Report-only mode never reads a flag, so it stays free of host synchronisation.
    acting = strict or on_indefinite != "raise"
    if acting and result.needs_positive_definite and bool(result.indefinite):
        result = _apply_policy(result, on_indefinite, fallback, solver, lam, damping, solve)
    if strict:
        result.check(ignore_indefinite=result.action == "warned")
    x = as_form(result.x, spec, form)
    result.x = x
    return (x, result) if return_info else x


def _apply_policy(result: SolveResult, policy: str, fallback: str, solver: str, lam: float,
                  damping: float, solve: Callable[[str, float], SolveResult]) -> SolveResult:
    """What ``on_indefinite`` does with a solve flagged indefinite; returns the result to use."""
    if policy == "raise":  # only reached with strict=True (report-only mode skips the policy)
        problems = result.problems()
        raise SolverError("; ".join(problems) if problems else f"{solver}: indefinite system")
    if policy == "warn":
        warnings.warn(
            f"implicit_hypergrad: the system I + H/(λ+damping) is indefinite (smallest Ritz value "
            f"{float(result.ritz_min):.3e}); keeping the {solver} answer as on_indefinite='warn' asks",
            IndefiniteSystemWarning, stacklevel=3)
        result.action = "warned"
        return result
    if policy == "fallback":
        new = solve(fallback, damping)
        new.action, new.initial = f"fallback:{fallback}", result
        return new
    # adaptive damping
    damp, current = damping, result
    for _ in range(ADAPTIVE_DAMPING_TRIES):
        damp = _next_damping(current, lam, damp)
        current = solve(solver, damp)
        if not bool(current.indefinite | current.nonfinite):
            break
    current.action, current.initial = "adaptive_damping", result
    return current
