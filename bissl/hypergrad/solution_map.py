"""A differentiable solution map ``θ*(η) = argmin_θ F(θ, η)`` by implicit differentiation.

Whatever finds the minimiser (gradient descent, L-BFGS, Newton, a training loop), :func:`argmin`
returns it as a tensor whose backward pass applies the implicit function theorem instead of
differentiating through that search. At a minimiser ``∇_θ F(θ*, η) = 0`` for every ``η`` nearby,
so

    dθ*/dη = −(∇²_θθ F)⁻¹ ∇²_θη F,

and an upper loss ``L(θ*, ...)`` sends ``η`` the gradient ``−∇_η ⟨∇_θ F(θ*, η), w⟩`` where ``w``
solves ``(∇²_θθ F + damping·I) w = ∇_θ L`` (``damping = 0``: the exact IFT). The solve is the one
of :func:`~bissl.hypergrad.implicit_hypergrad`: the Hessian is linearised once with
:func:`~bissl.ops.linearize_hvp` (any HVP mode), solved by any registered solver, under the same
``on_indefinite`` policies and ``strict`` checks (:func:`~bissl.hypergrad.implicit.solve_ift_system`).
Upper parameters that ``L`` uses directly (a classifier head) get their gradient from ordinary
autograd; the ones inside ``F`` get the IFT term; one that is both gets the sum.

BiSSL's lower problem is the special case ``F(θ, φ) = L_P(θ) + (λ/2)‖θ − φ‖²``:
``∇²_θθ F = H + λI`` and ``∇²_θφ F = −λI``, so ``φ`` receives ``λ (H + λI)⁻¹ ∇_θ L``, the
``x`` of ``implicit_hypergrad(..., lam=λ, damping=0)``. (With ``damping = d > 0`` it receives
``λ/(λ + d)`` times that function's ``x``: here ``d`` regularises ``∇²_θθ F`` itself, whereas
BiSSL's trainer keeps its own normalisation.)

Only the tensors passed as arguments are differentiated, as ``torch.func`` transforms do:
``η`` must reach ``F`` through the call, not through its closure. Tensors ``F`` closes over (a
projector the lower level also trains) are constants of the backward pass and receive nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from bissl.hypergrad.implicit import IndefinitePolicy, SolverName, check_solve_options, solve_ift_system
from bissl.ops.batchnorm import batchnorm_stats_frozen
from bissl.ops.flat import FlatSpec, flat_spec, flatten, unflatten
from bissl.ops.hvp import HVPMode, _check_mode, linearize_hvp
from bissl.solvers.result import SolveResult
from bissl.typing import Params, ParamsLike

#: ``argmin``'s key for a tensor ``θ`` in its internal parameter dict.
_TENSOR_KEY = "theta"


@dataclass(frozen=True)
class SolveOptions:
    """How the backward pass solves ``(∇²_θθ F + damping·I) w = ∇_θ L`` (see :func:`argmin`)."""

    solver: SolverName = "cg"
    iters: int = 20
    damping: float = 0.0
    hvp_mode: HVPMode = "revrev"
    backend: str | None = None
    rtol: float | None = None
    strict: bool = True
    on_indefinite: IndefinitePolicy = "raise"
    fallback: SolverName = "minres"
    on_solve: Callable[[SolveResult], None] | None = None

    def check(self, where: str) -> None:
        check_solve_options(
            where,
            lam=0.0,
            damping=self.damping,
            solver=self.solver,
            on_indefinite=self.on_indefinite,
            fallback=self.fallback,
        )
        _check_mode(self.hvp_mode)
        if not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"{where}: iters must be a positive int, got {self.iters!r}")


class _Arguments:
    """The positional arguments of ``F`` with their differentiable tensors pulled out.

    A tensor that requires grad, or one inside a mapping argument, is a *leaf*: the backward pass
    returns a gradient for it. Everything else (data, ints, tensors without grad) is passed as is.
    """

    def __init__(self, args: tuple[Any, ...]):
        self.args = args
        self.leaves: list[Tensor] = []
        self._slots: list[tuple[int, str | None]] = []  # (argument index, key in a mapping or None)
        for i, arg in enumerate(args):
            if isinstance(arg, Tensor) and arg.requires_grad:
                self._slots.append((i, None))
                self.leaves.append(arg)
            elif isinstance(arg, Mapping):
                for key, value in arg.items():
                    if isinstance(value, Tensor) and value.requires_grad:
                        self._slots.append((i, key))
                        self.leaves.append(value)

    def rebuild(self, leaves: list[Tensor]) -> tuple[Any, ...]:
        """The arguments with each leaf replaced by ``leaves[j]`` (mappings become dicts)."""
        args = [dict(a) if isinstance(a, Mapping) else a for a in self.args]
        for (i, key), leaf in zip(self._slots, leaves):
            if key is None:
                args[i] = leaf
            else:
                args[i][key] = leaf
        return tuple(args)

    def detached(self) -> tuple[Any, ...]:
        return self.rebuild([leaf.detach() for leaf in self.leaves])


@dataclass
class _Problem:
    """Everything the backward pass needs, held by the autograd node."""

    objective: Callable[..., Tensor]
    as_tensor: bool  # θ was given as one tensor (``objective`` takes a tensor, not a dict)
    spec: FlatSpec
    arguments: _Arguments
    options: SolveOptions

    def call(self, theta: Params, args: tuple[Any, ...]) -> Tensor:
        return self.objective(theta[_TENSOR_KEY] if self.as_tensor else theta, *args)

    def hypergradient(self, theta: Params, grads: tuple[Tensor, ...], wanted: list[bool]) -> list[Tensor | None]:
        """``−∇_η ⟨∇_θ F(θ, η), w⟩`` for each leaf ``η`` (None where not wanted or unused)."""
        opts = self.options
        constants = self.arguments.detached()
        v = flatten({k: g.detach() for k, g in zip(self.spec.names, grads)}, self.spec).contiguous()
        matvec = None
        if opts.solver != "identity":
            matvec = linearize_hvp(lambda p: self.call(p, constants), theta, mode=opts.hvp_mode, need_grad=False).matvec
        result = solve_ift_system(
            matvec,
            v,
            self.spec,
            lam=0.0,
            damping=opts.damping,
            solver=opts.solver,
            iters=opts.iters,
            backend=opts.backend,
            strict=opts.strict,
            on_indefinite=opts.on_indefinite,
            fallback=opts.fallback,
            rtol=opts.rtol,
        )
        if opts.on_solve is not None:
            opts.on_solve(result)
        # solve_ift_system returns x of (I + A/c) x = v for c = damping_used > 0, i.e. c·w.
        c = float(result.damping_used or 0.0)
        x = cast(Tensor, result.x)  # flat, as v
        w = unflatten(x / c if c > 0 else x, self.spec)
        return self._cross_term(theta, w, wanted)

    def _cross_term(self, theta: Params, w: Params, wanted: list[bool]) -> list[Tensor | None]:
        leaves = [leaf.detach().requires_grad_(True) for leaf in self.arguments.leaves]
        targets = [leaf for leaf, want in zip(leaves, wanted) if want]
        if not targets:
            return [None] * len(leaves)
        with torch.enable_grad(), batchnorm_stats_frozen():
            point = {k: t.detach().requires_grad_(True) for k, t in theta.items()}
            loss = self.call(point, self.arguments.rebuild(leaves))
            grad_theta = torch.autograd.grad(loss, tuple(point.values()), create_graph=True, allow_unused=True)
            coupled = [(g * w[k]).sum() for k, g in zip(point, grad_theta) if g is not None and g.requires_grad]
            cross: tuple[Tensor | None, ...] = (None,) * len(targets)
            if coupled:  # else ∇_θ F does not depend on any leaf: zero IFT gradient
                cross = torch.autograd.grad(torch.stack(coupled).sum(), targets, allow_unused=True)
        out: list[Tensor | None] = []
        it = iter(cross)
        for want in wanted:
            g = next(it) if want else None
            out.append(None if g is None else -g)
        return out


class _ImplicitArgmin(torch.autograd.Function):
    """Identity on ``θ`` forward; the IFT backward of :func:`argmin` (inputs: θ's tensors, then leaves)."""

    @staticmethod
    def forward(ctx: Any, problem: _Problem, *tensors: Tensor) -> tuple[Tensor, ...]:
        n = len(problem.spec.names)
        ctx.problem = problem
        ctx.theta = dict(zip(problem.spec.names, (t.detach() for t in tensors[:n])))
        return tuple(t.detach().clone() for t in tensors[:n])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        problem: _Problem = ctx.problem
        n = len(problem.spec.names)
        wanted = list(ctx.needs_input_grad[1 + n :])
        leaf_grads = problem.hypergradient(ctx.theta, grads, wanted) if any(wanted) else [None] * len(wanted)
        return (None,) * (1 + n) + tuple(leaf_grads)


def argmin(
    objective: Callable[..., Tensor],
    theta: Tensor | ParamsLike,
    *args: Any,
    solver: SolverName = "cg",
    iters: int = 20,
    damping: float = 0.0,
    hvp_mode: HVPMode = "revrev",
    backend: str | None = None,
    rtol: float | None = None,
    strict: bool = True,
    on_indefinite: IndefinitePolicy = "raise",
    fallback: SolverName = "minres",
    on_solve: Callable[[SolveResult], None] | None = None,
) -> Tensor | Params:
    """``θ*(args)``: the minimiser ``theta`` of ``objective(θ, *args)``, differentiable in ``args``.

    The value is ``theta`` (detached and copied); the backward pass gives every tensor argument
    that requires grad (directly, or as a value of a dict argument) the implicit-function-theorem
    gradient ``−∇²_ηθ F · w``, ``(∇²_θθ F + damping·I) w = ∇_θ L``, where ``∇_θ L`` is the gradient
    arriving at the returned tensor(s). Nothing flows back into ``theta`` itself: how it was found
    does not matter, only that it (nearly) minimises ``F``: the answer is as accurate as
    ``∇_θ F(theta) ≈ 0`` is.

    Args:
        objective: ``F(θ, *args) -> ()`` tensor; ``θ`` arrives in the form ``theta`` has (a tensor
            of any shape, or a ``{name: Tensor}`` dict, as for :func:`torch.func.functional_call`).
            Must be twice differentiable in ``θ`` and once more in the differentiated arguments.
        theta: the minimiser found by any means; a tensor or a dict of tensors (one dtype/device).
        *args: the rest of ``F``'s arguments: hyperparameters, upper-level weights, data.
        solver: ``"cg"`` (default; ``∇²_θθ F`` positive definite), ``"minres"`` (symmetric
            indefinite), ``"cg_layerwise"``, ``"neumann"`` or ``"identity"`` (ignores the Hessian:
            ``w = ∇_θ L / damping``, or ``∇_θ L`` when ``damping`` is 0).
        iters: solver iterations (default: 20); with ``rtol`` the most it may take.
        damping: ``d ≥ 0`` added to the diagonal of ``∇²_θθ F`` (default: 0, the exact IFT).
        hvp_mode: ``"revrev"`` (default), ``"fwdrev"`` or ``"autograd"`` (:func:`bissl.ops.hvp`).
        backend: fused vector-op backend of CG/MINRES (default: auto).
        rtol: relative residual tolerance for early stopping; then ``strict`` also raises when it
            is not reached.
        strict: raise :class:`~bissl.solvers.SolverError` from ``backward()`` when the solve cannot
            be trusted (NaN/Inf, indefinite system left unresolved, no convergence under ``rtol``;
            default: True). False: report only, through ``on_solve``.
        on_indefinite: ``"raise"`` (default), ``"warn"``, ``"fallback"`` or ``"adaptive_damping"``
            (needs ``damping > 0``), as in :func:`~bissl.hypergrad.implicit_hypergrad`.
        fallback: the solver of ``on_indefinite="fallback"`` (default: ``"minres"``).
        on_solve: called with the :class:`~bissl.solvers.SolveResult` of each backward solve
            (diagnostics: ``info.summary()``). Its ``x`` solves ``(I + ∇²_θθ F/d) x = ∇_θ L``,
            i.e. ``x = d·w``, when ``d = info.damping_used > 0``, else ``x = w``.

    Returns:
        ``θ*`` in the form of ``theta``: a tensor, or a dict with the same keys.

    Raises:
        ValueError: bad options (at call time), or ``objective`` not returning a scalar.
        SolverError: from ``backward()``, see ``strict``.

    Example:
        >>> w_star = argmin(lambda w, l2: loss(X @ w, y) + l2 / 2 * w.square().sum(), w_fit, l2)
        >>> val_loss(w_star).backward()          # l2.grad: d val_loss / d l2 by the IFT
    """
    options = SolveOptions(
        solver=solver,
        iters=iters,
        damping=float(damping),
        hvp_mode=hvp_mode,
        backend=backend,
        rtol=rtol,
        strict=strict,
        on_indefinite=on_indefinite,
        fallback=fallback,
        on_solve=on_solve,
    )
    options.check("argmin")
    as_tensor = isinstance(theta, Tensor)
    params: Params = {_TENSOR_KEY: theta} if as_tensor else dict(theta)  # type: ignore[dict-item]
    spec = flat_spec(params)
    if not spec.dtype.is_floating_point:
        raise TypeError(f"argmin: theta must be floating point, got {spec.dtype}")
    arguments = _Arguments(args)
    problem = _Problem(objective, as_tensor, spec, arguments, options)
    out = _ImplicitArgmin.apply(problem, *(t.detach() for t in params.values()), *arguments.leaves)
    return out[0] if as_tensor else dict(zip(spec.names, out))


def custom_argmin(
    objective: Callable[..., Tensor], **options: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: an inner solver ``fit(*args) -> θ̂`` becomes the differentiable map ``θ*(args)``.

    In the spirit of TorchOpt's ``custom_root``: the decorated function runs ``fit`` on detached
    copies of its arguments (its own graph is never used, so it may step an optimiser, call
    ``torch.func`` or anything else) and returns :func:`argmin` of ``objective`` at the result.

    Args:
        objective: ``F(θ, *args)``, called with ``fit``'s output and the same arguments.
        **options: :func:`argmin`'s keyword options (``solver``, ``iters``, ``damping``, ...),
            validated here.

    Example:
        >>> @custom_argmin(lambda w, l2: loss(X @ w, y) + l2 / 2 * w.square().sum(), iters=10)
        ... def fit(l2):
        ...     return newton(...)                # any inner solver
        >>> val_loss(fit(l2)).backward()          # l2.grad by the IFT
    """
    SolveOptions(**options).check("custom_argmin")

    def decorate(fit: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fit)
        def solution(*args: Any) -> Tensor | Params:
            theta = fit(*_Arguments(args).detached())
            return argmin(objective, theta, *args, **options)

        return solution

    return decorate
