"""The faithful authors' loop: same iterates as our solvers (without the guard) and the authors' work."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from bissl.hypergrad import authors_cg_solver, implicit_hypergrad, reference_hypergrad
from bissl.ops import flatten
from bissl.ops.flat import as_form, vector_spec
from bissl.solvers import cg_layerwise_solve, cg_solve
from bissl.testing import cnn_problem

F64 = torch.float64
SHAPES = [(3, 2), (4,), (1,), (2, 2)]


def _system(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = sum(torch.Size(s).numel() for s in SHAPES)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    A = (q * torch.logspace(0, 2, n, dtype=F64)) @ q.T
    b = torch.randn(n, generator=g, dtype=F64)
    spec = vector_spec(tuple(torch.zeros(s, dtype=F64) for s in SHAPES), "test")[1]
    return A, b, spec


def _mvp(A, spec):
    return lambda ds: as_form(A @ torch.cat([d.reshape(-1) for d in ds]), spec, "tuple")


@pytest.mark.parametrize("iters", [1, 3, 6])
def test_global_path_takes_cg_iterates_without_the_guard(iters):
    A, b, spec = _system()
    ours = cg_solve(lambda v: A @ v, b, iters=iters).x
    theirs = authors_cg_solver(
        _mvp(A, spec), as_form(b.clone(), spec, "tuple"), iters=iters, layerwise=False, guard=None
    )
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in theirs]), ours, rtol=1e-12, atol=1e-14)


def test_layerwise_path_takes_layerwise_cg_iterates_without_the_guard():
    A, b, spec = _system(1)
    ours = cg_layerwise_solve(_mvp(A, spec), as_form(b.clone(), spec, "tuple"), iters=4).x
    theirs = authors_cg_solver(_mvp(A, spec), as_form(b.clone(), spec, "tuple"), iters=4, layerwise=True, guard=None)
    for a, t in zip(ours, theirs):
        torch.testing.assert_close(t, a, rtol=1e-11, atol=1e-13)


class _Count(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layerwise", [False, True])
def test_the_loop_does_the_authors_work_and_no_more(layerwise):
    """rᵀr once per iteration (carried over), no clone of the residual, in-place division of the HVP."""
    A, b, spec = _system()
    n, iters = len(SHAPES), 4
    rhs = as_form(b.clone(), spec, "tuple")
    with _Count() as count:
        authors_cg_solver(_mvp(A, spec), rhs, iters=iters, layerwise=layerwise)
    # n sums for the initial rᵀr, then per iteration n for dᵀ(Hd) and n for the new rᵀr.
    assert count.calls.get("sum") == n + iters * 2 * n
    assert count.calls.get("clone") == n  # the first direction only
    prob = cnn_problem()
    with _Count() as count:
        reference_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=0.5, damping=1.0, iters=2)
    assert count.calls.get("div_") == 2 * len(prob.params)  # (H d)ᵢ / c in place, per tensor per HVP


def test_reference_hypergradient_matches_ours_on_a_cnn_without_the_guard():
    prob = cnn_problem()
    kw = dict(lam=0.5, damping=1.0, iters=5)
    for solver, layerwise in (("cg", False), ("cg_layerwise", True)):
        ours = implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, solver=solver, **kw)
        ref = reference_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, layerwise=layerwise, guard=None, **kw)
        torch.testing.assert_close(flatten(ref), flatten(ours), rtol=1e-10, atol=1e-12, msg=solver)
