"""A :class:`Workspace` keeps a solver's work buffers across solves without changing any answer.

Checked: every solver gives bit-identical answers with and without a workspace, on a second solve
of a different system through the same workspace too; the second solve allocates no new work
buffer (the matvec sees views of the very same storage); an earlier answer survives later solves;
a solve nested inside another solve's matvec with the same workspace raises; a size change
replaces the buffers; the hypergradient takes one.
"""

from __future__ import annotations

import pytest
import torch

from bissl import implicit_hypergrad
from bissl.solvers import SOLVERS, Workspace, cg_solve

F64 = torch.float64
P = 12


def _spd(seed: int, n: int = P) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return (q * torch.linspace(0.5, 4.0, n, dtype=F64)) @ q.T


def _rhs(seed: int, n: int = P) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(100 + seed), dtype=F64)


def _kwargs(name: str) -> dict:
    kw = {"iters": {"cg": 20, "cg_layerwise": 6, "minres": 20, "neumann": 8, "identity": 0}[name]}
    kw.update(scale=0.5, damping=0.25)
    if name == "cg_layerwise":
        kw["segments"] = [5, 7]
    return kw


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_same_answers_with_a_workspace_and_earlier_answers_survive(name):
    solve, ws = SOLVERS[name], Workspace()
    answers = []
    for seed in (0, 1, 2):  # three different systems through one workspace
        A, b = _spd(seed), _rhs(seed)
        plain = solve(lambda v, A=A: A @ v, b.clone(), **_kwargs(name))
        kept = solve(lambda v, A=A: A @ v, b.clone(), workspace=ws, **_kwargs(name))
        assert torch.equal(kept.x, plain.x), (name, seed)
        answers.append((kept.x, plain.x.clone()))
    for kept, plain in answers:  # later solves never wrote into an earlier answer
        assert torch.equal(kept, plain)
    if name == "cg":
        exact = torch.linalg.solve(0.5 * _spd(2) + 0.25 * torch.eye(P, dtype=F64), _rhs(2))
        torch.testing.assert_close(answers[-1][0], exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", ["dict", "tuple", "flat"])
def test_the_second_solve_reuses_the_same_buffers(form):
    A = _spd(3)
    seen: list[int] = []

    def mv(v):
        flat = v if form == "flat" else torch.cat([t.reshape(-1) for t in (v.values() if form == "dict" else v)])
        first = v if form == "flat" else next(iter(v.values() if form == "dict" else v))
        seen.append(first.untyped_storage().data_ptr())
        out = A @ flat
        return out if form == "flat" else (out[:5], out[5:]) if form == "tuple" else {"a": out[:5], "b": out[5:]}

    def rhs(seed):
        b = _rhs(seed)
        return b if form == "flat" else (b[:5], b[5:]) if form == "tuple" else {"a": b[:5], "b": b[5:]}

    ws = Workspace()
    cg_solve(mv, rhs(0), iters=4, workspace=ws)
    first_storages, held = set(seen), ws.nbytes
    seen.clear()
    res = cg_solve(mv, rhs(1), iters=4, workspace=ws)
    assert set(seen) == first_storages  # the matvec read the same buffer on both solves
    assert ws.nbytes == held == 3 * P * 8  # b's copy, the direction, the matvec's output
    answer = res.x if form == "flat" else next(iter(res.x.values() if form == "dict" else res.x))
    assert answer.untyped_storage().data_ptr() not in first_storages  # the answer is never a work buffer


def test_a_nested_solve_with_the_same_workspace_raises_and_the_workspace_recovers():
    ws, A, b = Workspace(), _spd(4), _rhs(4)

    def mv(v):
        cg_solve(lambda u: A @ u, v.clone(), iters=2, workspace=ws)  # solves inside the matvec
        return A @ v

    with pytest.raises(RuntimeError, match="Workspace is in use by an unfinished cg_solve"):
        cg_solve(mv, b, iters=2, workspace=ws)
    # The failed outer solve is gone (its frame freed): the workspace serves the next solve.
    res = cg_solve(lambda v: A @ v, b, iters=P, workspace=ws)
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-11)


def test_a_size_change_replaces_the_buffers_and_clear_frees_them():
    ws = Workspace()
    cg_solve(lambda v: 2.0 * v, _rhs(0), iters=1, workspace=ws)
    assert ws.nbytes == 3 * P * 8
    res = cg_solve(lambda v: 2.0 * v, _rhs(0, n=5).float(), iters=1, workspace=ws)
    torch.testing.assert_close(res.x, _rhs(0, n=5).float() / 2)
    assert ws.nbytes == 3 * 5 * 4
    ws.clear()
    assert ws.nbytes == 0 and "0 buffers" in repr(ws)


def test_a_workspace_must_be_a_workspace():
    with pytest.raises(TypeError, match=r"workspace must be a bissl\.solvers\.Workspace"):
        cg_solve(lambda v: v, _rhs(0), iters=1, workspace={})


def test_implicit_hypergrad_gives_the_same_answer_with_a_workspace():
    g = torch.Generator().manual_seed(5)
    theta = {"w": torch.randn(4, 3, generator=g, dtype=F64), "b": torch.randn(4, generator=g, dtype=F64)}
    x = torch.randn(16, 3, generator=g, dtype=F64)
    y = torch.randn(16, 4, generator=g, dtype=F64)

    def lower(p):
        return torch.tanh(x @ p["w"].T + p["b"]).pow(2).sum(1).mean()

    def upper(p):
        return (x @ p["w"].T + p["b"] - y).pow(2).mean()

    ws = Workspace()
    for solver in ("cg", "cg_layerwise", "minres"):
        plain = implicit_hypergrad(lower, upper, theta, lam=0.5, damping=1.0, iters=6, solver=solver)
        kept = implicit_hypergrad(lower, upper, theta, lam=0.5, damping=1.0, iters=6, solver=solver, workspace=ws)
        for k in theta:
            assert torch.equal(kept[k], plain[k]), (solver, k)
    assert ws.nbytes > 0
