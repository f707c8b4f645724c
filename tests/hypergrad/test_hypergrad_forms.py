"""implicit_hypergrad and linearize_hvp take θ as a dict, a tuple/list or a flat tensor (float64)."""

from __future__ import annotations

import pytest
import torch

from bissl.hypergrad import implicit_hypergrad
from bissl.ops import flat_spec, flatten, linearize_hvp, unflatten
from bissl.testing import cnn_problem, dense_hessian, mlp_problem

F64 = torch.float64


def _forms(prob):
    """``{form: (lower_loss, upper_loss, theta)}`` of one problem in every form."""
    names = list(prob.params)
    spec = flat_spec(prob.params)

    def by_seq(f):
        return lambda seq: f(dict(zip(names, seq)))

    def by_flat(f):
        return lambda flat: f(unflatten(flat, spec))

    params = list(prob.params.values())
    return {
        "dict": (prob.lower_loss, prob.upper_loss, prob.params),
        "tuple": (by_seq(prob.lower_loss), by_seq(prob.upper_loss), tuple(params)),
        "list": (by_seq(prob.lower_loss), by_seq(prob.upper_loss), list(params)),
        "flat": (by_flat(prob.lower_loss), by_flat(prob.upper_loss), flatten(prob.params).clone()),
    }


def _flat(x):
    if isinstance(x, torch.Tensor):
        return x
    return torch.cat([t.reshape(-1) for t in (x.values() if isinstance(x, dict) else x)])


@pytest.mark.parametrize("solver", ["cg", "cg_layerwise", "minres", "neumann", "identity"])
@pytest.mark.parametrize("make", [mlp_problem, cnn_problem], ids=["mlp", "cnn_bn"])
def test_same_hypergradient_for_every_parameter_form(make, solver):
    prob = make()
    kw = dict(lam=0.5, damping=1.0, iters=4, solver=solver, strict=False)
    results = {form: implicit_hypergrad(lo, up, theta, **kw) for form, (lo, up, theta) in _forms(prob).items()}
    ref = _flat(results["dict"])
    for form, x in results.items():
        expected_type = {"dict": dict, "tuple": tuple, "list": list, "flat": torch.Tensor}[form]
        assert isinstance(x, expected_type), form
        if solver == "cg_layerwise" and form == "flat":
            continue  # a flat θ has no tensor structure: one block, a different method
        torch.testing.assert_close(_flat(x), ref, rtol=1e-12, atol=1e-14, msg=f"{solver}, θ as {form}")


def test_hypergradient_in_every_form_matches_the_dense_formula():
    prob = mlp_problem()
    H = dense_hessian(prob.lower_loss, prob.params)
    lam, damping = 0.5, 1.0
    assert torch.linalg.eigvalsh(torch.eye(H.shape[0], dtype=F64) + H / (lam + damping)).min() > 0
    v = torch.func.grad(prob.upper_loss)(prob.params)
    expected = torch.linalg.solve(torch.eye(H.shape[0], dtype=F64) + H / (lam + damping), flatten(v))
    for form, (lo, up, theta) in _forms(prob).items():
        x = implicit_hypergrad(lo, up, theta, lam=lam, damping=damping, iters=H.shape[0] + 10)
        torch.testing.assert_close(_flat(x), expected, rtol=1e-9, atol=1e-12, msg=form)


def test_linearized_hvp_in_every_form_and_its_pieces_are_not_copied():
    prob = cnn_problem()
    H = dense_hessian(prob.lower_loss, prob.params)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(3), dtype=F64)
    spec = flat_spec(prob.params)
    for form, (lo, _, theta) in _forms(prob).items():
        op = linearize_hvp(lo, theta)
        assert op.form == form
        torch.testing.assert_close(op(v), H @ v, rtol=1e-10, atol=1e-12, msg=form)  # flat in, flat out
        if form == "flat":
            continue
        as_form = unflatten(v, spec)
        vin = as_form if form == "dict" else (tuple if form == "tuple" else list)(as_form.values())
        out = op(vin)
        assert type(out) is type(vin)
        torch.testing.assert_close(_flat(out), H @ v, rtol=1e-10, atol=1e-12, msg=form)
        pieces = op.hv_pieces(vin)
        assert len({t.untyped_storage().data_ptr() for t in pieces}) == len(pieces)  # autograd's own
