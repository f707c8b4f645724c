"""BiSSL's implicit-function-theorem term of the upper-level gradient.

With the lower problem ``θ*(φ) = argmin_θ L_P(θ) + (λ/2)‖θ − φ‖²``, the IFT gives
``dθ*/dφ = λ (H + λI)⁻¹ = (I + H/λ)⁻¹`` with ``H = ∇²L_P(θ*)`` (symmetric), so the upper gradient
through θ* is ``(I + H/λ)⁻¹ ∇_θ L_D(θ*)``. As the reference code, the linear system may be damped
separately from the proximal weight: we solve ``(I + H/(λ + damping)) x = ∇_θ L_D(θ)``.

Per-tensor λ. With one weight per parameter tensor, ``Λ = diag(λ_i I)``, the lower problem is
``L_P(θ) + ½ Σ_i λ_i‖θ_i − φ_i‖²`` and the IFT gives ``dθ*/dφ = (H + Λ)⁻¹ Λ``, so the upper gradient
through θ* is ``Λ (H + Λ)⁻¹ v``; damped as above, ``x = C (H + C)⁻¹ v`` with ``C = Λ + damping·I``
(for one λ this is the system above). ``C (H + C)⁻¹`` is not symmetric, so the solvers get the
congruent system ``(I + C^{-1/2} H C^{-1/2}) z = C^{-1/2} v`` (symmetric, positive definite
exactly when ``H + C`` is) and ``x = C^{1/2} z``; the scaling is one scalar per tensor.

Away from a minimum of ``L_P`` (e.g. at random initialisation) ``H`` can have eigenvalues below
``−(λ + damping)``; the system is then indefinite and CG's answer is meaningless. The solvers detect
it for free (``pᵀAp ≤ 0`` or a non-positive Ritz value, :mod:`bissl.solvers.lanczos`) and
:func:`implicit_hypergrad`'s ``on_indefinite`` policy decides what happens.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeAlias, cast

import torch

from bissl.hypergrad.settings import IndefinitePolicy, SolverName
from bissl.ops.batchnorm import batchnorm_stats_frozen
from bissl.ops.flat import AnyVector, FlatSpec, as_form, one_buffer
from bissl.ops.hvp import HVPMode, as_named, linearize_hvp
from bissl.solvers import Workspace, get_solver
from bissl.solvers.result import IndefiniteSystemWarning, SolverError, SolveResult
from bissl.typing import LossFn

#: λ: one value, or one per parameter tensor (a sequence in θ's order, or a ``{name: λ}`` dict).
LamLike: TypeAlias = "float | Sequence[float] | Mapping[str, float] | torch.Tensor"
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


class VectorSpace(Protocol):
    """Where the solver's vectors live when θ's data-parallel copies span several ranks.

    :func:`implicit_hypergrad` computes this rank's ``v = ∇_θ L_D`` and HVP on whole ``(P,)``
    vectors; a space turns them into the solver's problem and the answer back: averaged across
    ranks (:class:`bissl.distributed.hypergrad.RankAveraged`), or partitioned so that each rank
    keeps only its share of the solver's vectors (:class:`bissl.distributed.shard.ShardedSpace`).
    """

    @property
    def allreduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Sums a tensor of partial dot products across partitions (None: the vectors are whole)."""

    def rhs(self, v: torch.Tensor) -> torch.Tensor:
        """This rank's ``(P,)`` right-hand side -> the solver's ``b``."""

    def operator(self, matvec: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """This rank's ``(P,) -> (P,)`` HVP -> the solver's operator."""

    def solution(self, x: torch.Tensor) -> torch.Tensor:
        """The solver's ``x`` -> the whole ``(P,)`` answer."""

    def segments(self, spec: FlatSpec) -> torch.Tensor:
        """Parameter-tensor index of each entry of the solver's vectors (layer-wise CG)."""


def _solve(
    name: str,
    matvec: Callable | None,
    v: torch.Tensor,
    spec: FlatSpec,
    *,
    lam: float,
    damping: float,
    iters: int,
    backend: str | None,
    rtol: float | None,
    space: VectorSpace | None = None,
    matvec_pieces: bool = False,
    workspace: Workspace | None = None,
) -> SolveResult:
    """One solve of ``(I + H/(λ + damping)) x = v`` (``H x = v`` when ``λ + damping = 0``) by the
    named solver; ``result.x`` is flat.

    ``v`` is flat. With ``matvec_pieces`` the matvec takes and returns one tensor per parameter
    tensor of ``spec`` (the HVP's own outputs, read by the solver where they lie: no concatenated
    copy; layer-wise CG then sees one block per tensor); otherwise it maps flat to flat.
    """
    solve = get_solver(name)
    # scale = 1/(λ+damp), shift = 1: the scaling is fused into the damped-matvec epilogue.
    c = lam + damping
    scale, shift = (1.0 / c, 1.0) if c > 0 else (1.0, 0.0)
    kwargs: dict[str, Any] = {
        "iters": iters,
        "scale": scale,
        "damping": shift,
        "strict": False,
        "allreduce": None if space is None else space.allreduce,
        "workspace": workspace,
    }
    if name in ("cg", "minres"):
        kwargs.update(backend=backend, rtol=rtol)
    if name == "cg_layerwise" and not matvec_pieces:
        kwargs["segments"] = spec.numels if space is None else space.segments(spec)
    rhs = as_form(v, spec, "tuple") if matvec_pieces else v
    result = solve(None if name == "identity" else matvec, rhs, **kwargs)
    if matvec_pieces:
        # The solver returned views of its own flat buffer, one per tensor, in order: that buffer.
        parts = [t.reshape(-1) for t in result.x]
        whole = one_buffer(parts)
        result.x = whole if whole is not None and whole.numel() == spec.numel else torch.cat(parts)
    result.damping_used = float(damping)
    return result


def per_tensor_lam(lam: LamLike, spec: FlatSpec, where: str) -> tuple[float, ...] | None:
    """``lam`` as one float per tensor of ``spec`` (spec order), or None for a single λ.

    Args:
        lam: a number (or 0-d tensor); a sequence or 1-D tensor with one value per tensor, in
            ``spec.names`` order; or a ``{name: λ}`` dict with exactly the names of ``spec``.

    Raises:
        ValueError: wrong count or names, or a value that is not finite and > 0 (names the tensor).
    """
    if isinstance(lam, torch.Tensor):
        if lam.dim() == 0:
            return None
        lam = [float(v) for v in lam.detach().reshape(-1).tolist()]
    if isinstance(lam, (int, float)):
        return None
    names = spec.names
    if isinstance(lam, Mapping):
        missing, extra = [n for n in names if n not in lam], [k for k in lam if k not in names]
        if missing or extra:
            raise ValueError(
                f"{where}: per-tensor lam must name exactly θ's tensors; missing {missing[:5]}, unknown {extra[:5]}"
            )
        values = [float(lam[n]) for n in names]
    else:
        values = [float(v) for v in lam]
        if len(values) != len(names):
            raise ValueError(f"{where}: per-tensor lam has {len(values)} values but θ has {len(names)} tensors")
    for name, value in zip(names, values):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{where}: lam of tensor {name!r} must be finite and > 0, got {value}")
    return tuple(values)


def _congruent(matvec: Callable, inv_root: tuple[float, ...], inv_root_flat: torch.Tensor, pieces: bool) -> Callable:
    """``z ↦ C^{-1/2} H C^{-1/2} z`` from ``H``'s matvec: per-tensor pieces (one scalar each) or
    flat vectors in the solver's layout (``inv_root_flat`` entry by entry)."""
    if pieces:
        return lambda zs: [h * s for h, s in zip(matvec([z * s for z, s in zip(zs, inv_root)]), inv_root)]
    return lambda z: matvec(z * inv_root_flat) * inv_root_flat


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
    lam: LamLike,
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
    space: VectorSpace | None = None,
    workspace: Workspace | None = None,
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
        lam: proximal weight λ > 0 (reference: 0.001), or one per parameter tensor (a sequence in
            θ's order or a ``{name: λ}`` dict; the reference code accepts a tuple): then ``x``
            solves ``(H + C) C⁻¹ x = v``, ``C = diag(λ_i + damping)`` (module docstring).
            ``on_indefinite="adaptive_damping"`` needs a single λ.
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
        space: where the solver's vectors live across ranks (:class:`VectorSpace`; data
            parallelism: averaged, or partitioned). The solver's scalars then come from the
            space's operator and dot products only. Default: one process, whole vectors.
        workspace: a :class:`~bissl.solvers.Workspace` for the solver's work buffers, kept across
            calls (a training loop that computes a hypergradient every step: on CPU, large models
            then skip the page faults of fresh buffers each step). Default: allocated per call.

    Returns:
        ``x`` in ``lower_params``' form — views of one flat buffer (and the solve info if
        ``return_info``).

    Example:
        >>> x = implicit_hypergrad(pretext_loss, downstream_loss, theta, lam=1e-3, damping=10.0,
        ...                        on_indefinite="fallback")
        >>> g_phi = {k: x[k] + gamma * grad_phi[k] for k in x}
    """
    where = "implicit_hypergrad"
    _, _, spec, form = as_named(lower_loss, lower_params, where)
    lams = per_tensor_lam(lam, spec, where)
    scalar_lam = 1.0 if lams is not None else float(cast(float, lam))
    if lams is None and not scalar_lam > 0:
        raise ValueError(f"{where}: lam must be > 0, got {lam}")
    if lams is not None and on_indefinite == "adaptive_damping":
        raise ValueError(f"{where}: on_indefinite='adaptive_damping' needs a single lam, not one per tensor")
    check_solve_options(
        where, lam=scalar_lam, damping=damping, solver=solver, on_indefinite=on_indefinite, fallback=fallback
    )
    _, v = upper_gradient(upper_loss, lower_params)
    if space is not None:
        v = space.rhs(v)
    matvec: Callable | None = None
    pieces = False
    if solver != "identity":  # identity is never flagged indefinite, so never falls back
        op = linearize_hvp(lower_loss, lower_params, mode=hvp_mode, need_grad=False)
        # One process: the solver reads the HVP's per-parameter outputs as they are (no copy).
        pieces = space is None
        matvec = op.hv_pieces if pieces else cast(VectorSpace, space).operator(op.matvec)
    root: torch.Tensor | None = None  # C^{1/2} per entry of the solver's vectors (per-tensor λ)
    if lams is not None:
        # The congruent system I + C^{-1/2} H C^{-1/2}, built in the solver's own layout (whole or
        # partitioned vectors), so the space and its hooks see the true v and H.
        roots = torch.tensor([math.sqrt(x + damping) for x in lams], dtype=v.dtype, device=v.device)
        root = roots[spec.segment_ids() if space is None else space.segments(spec)]
        v = v / root
        if matvec is not None:
            matvec = _congruent(matvec, tuple(1.0 / float(r) for r in roots), root.reciprocal(), pieces)
    result = solve_ift_system(
        matvec,
        v,
        spec,
        # A per-tensor λ is folded into the operator above: the solver's system is I + (that).
        lam=scalar_lam,
        damping=0.0 if lams is not None else damping,
        solver=solver,
        iters=iters,
        backend=backend,
        strict=strict,
        on_indefinite=on_indefinite,
        fallback=fallback,
        rtol=rtol,
        space=space,
        matvec_pieces=pieces,
        workspace=workspace,
    )
    flat_x = cast(torch.Tensor, result.x)  # _solve leaves it flat
    if root is not None:
        flat_x = flat_x * root
        result.damping_used = float(damping)
    x = as_form(flat_x if space is None else space.solution(flat_x), spec, form)
    result.x = x
    return (x, result) if return_info else x


def check_solve_options(
    where: str, *, lam: float, damping: float, solver: str, on_indefinite: str, fallback: str
) -> None:
    """Validate the options of :func:`solve_ift_system` up front (``where`` names the caller).

    Raises:
        ValueError: a negative ``lam`` or ``damping``, an unknown solver or policy, a fallback equal
            to the solver, or ``adaptive_damping`` with ``λ + damping = 0`` (it scales that sum).
    """
    if lam < 0 or damping < 0:
        raise ValueError(f"{where}: lam and damping must be >= 0, got lam={lam}, damping={damping}")
    if on_indefinite not in ON_INDEFINITE:
        raise ValueError(f"{where}: unknown on_indefinite {on_indefinite!r}; choose one of {ON_INDEFINITE}")
    get_solver(solver)
    get_solver(fallback)
    if on_indefinite == "fallback" and fallback == solver:
        raise ValueError(f"{where}: fallback solver must differ from solver ({solver!r})")
    if on_indefinite == "adaptive_damping" and not lam + damping > 0:
        raise ValueError(
            f"{where}: on_indefinite='adaptive_damping' needs a positive damping to "
            f"start from (it at least doubles λ + damping), got {lam + damping}"
        )


def solve_ift_system(
    matvec: Callable | None,
    v: torch.Tensor,
    spec: FlatSpec,
    *,
    lam: float,
    damping: float,
    solver: str,
    iters: int,
    backend: str | None = None,
    strict: bool = True,
    on_indefinite: str = "raise",
    fallback: str = "minres",
    rtol: float | None = None,
    space: VectorSpace | None = None,
    matvec_pieces: bool = False,
    workspace: Workspace | None = None,
) -> SolveResult:
    """Solve ``(I + A/(λ + damping)) x = v`` (``A x = v`` when ``λ + damping = 0``) with a policy.

    The one solve behind :func:`implicit_hypergrad` (``A = ∇²L_P``) and
    :func:`bissl.hypergrad.argmin` (``A = ∇²_θθ F``, ``λ = 0``): the named solver, then the
    ``on_indefinite`` policy and ``strict`` check described in :func:`implicit_hypergrad`.
    Options are validated by :func:`check_solve_options` (call it first for an early error).

    Args:
        matvec: flat ``(P,) -> (P,)`` operator ``A`` (``None`` only for ``solver="identity"``; per
            tensor with ``matvec_pieces``).
        v: flat ``(P,)`` right-hand side.
        spec: layout of the flat vectors (layer-wise CG solves per tensor of it).
        space: where the solver's vectors live (see :func:`implicit_hypergrad`); ``matvec`` and
            ``v`` are then already in it.
        matvec_pieces: ``matvec`` takes and returns one tensor per tensor of ``spec`` instead of
            flat vectors (what :meth:`bissl.ops.hvp.LinearizedHVP.hv_pieces` does; saves a copy).
        workspace: the solvers' work buffers (see :func:`implicit_hypergrad`); every re-solve of
            the policy uses it too, one after the other.

    Returns:
        The :class:`~bissl.solvers.SolveResult` whose flat ``x`` is the answer, with ``action``,
        ``damping_used`` and ``initial`` set.
    """
    check_solve_options(
        "solve_ift_system", lam=lam, damping=damping, solver=solver, on_indefinite=on_indefinite, fallback=fallback
    )

    def solve(name: str, damp: float) -> SolveResult:
        if matvec is None and name != "identity":
            raise ValueError(f"solve_ift_system: no Hessian for solver {name!r}")
        return _solve(
            name,
            matvec,
            v,
            spec,
            lam=lam,
            damping=damp,
            iters=iters,
            backend=backend,
            rtol=rtol,
            space=space,
            matvec_pieces=matvec_pieces and name != "identity",
            workspace=workspace,
        )

    result = solve(solver, damping)
    # Report-only mode never reads a flag, so it stays free of host synchronisation.
    acting = strict or on_indefinite != "raise"
    if acting and result.needs_positive_definite and bool(result.indefinite):
        result = _apply_policy(result, on_indefinite, fallback, solver, lam, damping, solve)
    if strict:
        result.check(ignore_indefinite=result.action == "warned")
    return result


def _apply_policy(
    result: SolveResult,
    policy: str,
    fallback: str,
    solver: str,
    lam: float,
    damping: float,
    solve: Callable[[str, float], SolveResult],
) -> SolveResult:
    """What ``on_indefinite`` does with a solve flagged indefinite; returns the result to use."""
    if policy == "raise":  # only reached with strict=True (report-only mode skips the policy)
        problems = result.problems()
        raise SolverError("; ".join(problems) if problems else f"{solver}: indefinite system", result=result)
    if policy == "warn":
        warnings.warn(
            f"implicit_hypergrad: the system I + H/(λ+damping) is indefinite (smallest Ritz value "
            f"{float(result.ritz_min):.3e}); keeping the {solver} answer as on_indefinite='warn' asks",
            IndefiniteSystemWarning,
            stacklevel=4,
        )
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
