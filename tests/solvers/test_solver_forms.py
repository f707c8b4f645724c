"""Every solver gives the same answer for dict, tuple/list and flat inputs and matvecs (float64).

The caller's matvec must be fed views of the solver's own flat buffer (no copy), and its result
may come in any form; the answer comes back in the right-hand side's form.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from bissl.ops.flat import as_form, vector_spec
from bissl.solvers import SOLVERS, cg_solve

F64 = torch.float64
SHAPES = {"w": (2, 3), "b": (3,), "bn": (1,), "c": (2, 2, 2)}  # P = 6 + 3 + 1 + 8 = 18
P = 18
B_FORMS = ("dict", "tuple", "list", "flat")
MV_FORMS = ("dict", "tuple", "flat")
ITERS = {"cg": 30, "cg_layerwise": 4, "minres": 30, "neumann": 6, "identity": 0}


def _system():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=F64))
    A = (q * torch.linspace(1.0, 3.0, P, dtype=F64)) @ q.T  # SPD, spectrum in [1, 3]
    b = torch.randn(P, generator=g, dtype=F64)
    spec = vector_spec({k: torch.zeros(s, dtype=F64) for k, s in SHAPES.items()}, "test")[1]
    return A, b, spec


def _to_flat(v) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    parts = v.values() if isinstance(v, dict) else v
    return torch.cat([t.reshape(-1) for t in parts])


def _matvec(A, spec, out_form: str, seen: list | None = None):
    def mv(v):
        if seen is not None:
            seen.append(v)
        av = A @ _to_flat(v)
        return av if out_form == "flat" else as_form(av.clone(), spec, out_form)

    return mv


def _kwargs(name: str, b_form: str, spec) -> dict:
    kw = {"iters": ITERS[name], "scale": 0.5, "damping": 0.25}
    if name == "neumann":
        kw["step"] = 1.0
    if name == "cg_layerwise" and b_form == "flat":
        kw["segments"] = spec.numels  # one block per tensor, like the structured forms
    return kw


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_same_answer_for_every_input_and_matvec_form(name):
    A, b, spec = _system()
    solve = SOLVERS[name]
    ref = solve(_matvec(A, spec, "flat"), b.clone(), **_kwargs(name, "flat", spec)).x
    if name in ("cg", "minres"):
        exact = torch.linalg.solve(0.5 * A + 0.25 * torch.eye(P, dtype=F64), b)
        torch.testing.assert_close(ref, exact, rtol=1e-10, atol=1e-12)
    for b_form, mv_form in itertools.product(B_FORMS, MV_FORMS):
        rhs = as_form(b.clone(), spec, b_form)
        res = solve(_matvec(A, spec, mv_form), rhs, **_kwargs(name, b_form, spec))
        assert type(res.x) is type(rhs), (b_form, type(res.x))
        if b_form == "dict":
            assert list(res.x) == list(SHAPES) and all(res.x[k].shape == SHAPES[k] for k in SHAPES)
        torch.testing.assert_close(
            _to_flat(res.x), ref, rtol=1e-13, atol=1e-15, msg=f"{name}: b {b_form}, matvec returns {mv_form}"
        )


@pytest.mark.parametrize("b_form", ["dict", "tuple", "flat"])
def test_matvec_gets_views_of_the_solver_buffer_and_b_is_not_aliased(b_form):
    A, b, spec = _system()
    rhs = as_form(b.clone(), spec, b_form)
    rhs_ptrs = {
        t.untyped_storage().data_ptr()
        for t in ([rhs] if b_form == "flat" else (rhs.values() if b_form == "dict" else rhs))
    }
    before = _to_flat(rhs).clone()
    seen: list = []
    res = cg_solve(_matvec(A, spec, "dict", seen), rhs, iters=5)
    assert len(seen) == 5
    storages = set()
    for v in seen:
        parts = [v] if b_form == "flat" else list(v.values() if b_form == "dict" else v)
        storage = parts[0].untyped_storage()
        storages.add(storage.data_ptr())
        assert storage.nbytes() == P * 8, "the matvec must see views of one P-element buffer"
        offset = parts[0].storage_offset()
        for t in parts:  # consecutive pieces of that buffer: views, not copies
            assert t.untyped_storage().data_ptr() == storage.data_ptr() and t.storage_offset() == offset
            offset += t.numel()
    assert len(storages) == 1, "every matvec sees the same search-direction buffer"
    assert not storages & rhs_ptrs, "the solver must never work in the caller's b"
    assert torch.equal(_to_flat(rhs), before)
    x_parts = [res.x] if b_form == "flat" else list(res.x.values() if b_form == "dict" else res.x)
    assert len({t.untyped_storage().data_ptr() for t in x_parts}) == 1  # x: views of one buffer


def test_initial_guess_in_another_form():
    A, b, spec = _system()
    x0 = torch.linspace(-1, 1, P, dtype=F64)
    ref = cg_solve(_matvec(A, spec, "flat"), b, iters=30, x0=x0).x
    got = cg_solve(
        _matvec(A, spec, "tuple"), as_form(b.clone(), spec, "dict"), iters=30, x0=as_form(x0.clone(), spec, "tuple")
    ).x
    torch.testing.assert_close(_to_flat(got), ref, rtol=1e-12, atol=1e-14)


def test_matvec_results_that_do_not_match_b_are_rejected_with_a_reason():
    _, b, spec = _system()
    rhs = as_form(b.clone(), spec, "dict")
    with pytest.raises(ValueError, match="matvec returned a dict with keys"):
        cg_solve(lambda v: {"w": v["w"]}, rhs, iters=2)
    with pytest.raises(ValueError, match="returned 3 tensors, expected 4"):
        cg_solve(lambda v: tuple(v.values())[:3], rhs, iters=2)
    with pytest.raises(ValueError, match="for 'b', expected shape"):
        cg_solve(lambda v: {**v, "b": v["b"][:2]}, rhs, iters=2)
    with pytest.raises(ValueError, match=r"expected a flat \(18,\) tensor"):
        cg_solve(lambda v: torch.zeros(17, dtype=F64), rhs, iters=2)
    with pytest.raises(ValueError, match="float32"):
        cg_solve(lambda v: {k: t.float() for k, t in v.items()}, rhs, iters=2)
    with pytest.raises(TypeError, match="tuple/list of tensors"):
        cg_solve(lambda v: v, "not a vector", iters=2)
