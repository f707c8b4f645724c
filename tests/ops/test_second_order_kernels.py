"""The C++ kernels of the linearisation's elementwise second derivatives, against their torch
references and an exact (float64) answer on random inputs:

* ``bissl::layer_norm_double_backward`` (:mod:`bissl.ops.layernorm_double_backward`);
* ``bissl::gelu_backward_and_curvature`` (:mod:`bissl.ops.gelu_double_backward`).

The references themselves are checked against autograd through the whole double backward in
``tests/ops/test_double_backward.py`` (which runs the kernels when ``bissl._C`` is loaded);
``test_reference_route_matches_autograd`` below runs that check with the references forced.
"""

from __future__ import annotations

import pytest
import torch
from fused_cases import DTYPES, assert_within_reference_error, backend_params, non_contiguous

import bissl.ops.gelu_double_backward as gelu_module
import bissl.ops.layernorm_double_backward as ln_module
from bissl.ops import _library
from bissl.ops.gelu_double_backward import _gelu_prime, gelu_backward_and_curvature_ref
from bissl.ops.layernorm_double_backward import layer_norm_double_backward_ref

CPP = [p for p in backend_params(kernels_only=True) if p.id == "cpp"]
LN = torch.ops.bissl.layer_norm_double_backward
GELU = torch.ops.bissl.gelu_backward_and_curvature

#: (rows M, features D): one row, one feature, rows not a multiple of the kernel's 16-row block,
#: and a ViT-sized case above the kernel's serial threshold (parallel blocks).
LN_SHAPES = [(1, 7), (5, 1), (33, 64), (1040, 192)]
#: Which optional vectors are given: (c_w, c_b, w). c_w exists only with w (it is gw's cotangent).
LN_OPTIONALS = [(True, True, True), (False, False, True), (False, True, False), (False, False, False)]


def _ln_args(m: int, d: int, dtype: torch.dtype, optionals: tuple[bool, bool, bool], seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    has_cw, has_cb, has_w = optionals
    u, gy, xhat, gx = r(m, d), r(m, d), r(m, d), r(m, d)
    s = (r(m, 1).abs() + 0.5).to(dtype)
    m_gxh = r(m, 1)
    return (u, r(d) if has_cw else None, r(d) if has_cb else None, gy, xhat, s, gx, m_gxh, r(d) if has_w else None)


def _double(args):
    return tuple(a.double() if a is not None else None for a in args)


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LN_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("optionals", LN_OPTIONALS, ids=lambda o: "cw{:d}cb{:d}w{:d}".format(*o))
def test_layer_norm_kernel_matches_reference(backend, dtype, shape, optionals):
    args = _ln_args(*shape, dtype, optionals)
    got = LN(*args)
    ref = layer_norm_double_backward_ref(*args)
    exact = layer_norm_double_backward_ref(*_double(args))
    for what, a, b, e in zip(("d_gy", "d_x", "d_w"), got, ref, exact):
        assert a.shape == b.shape and a.dtype == dtype, what
        if e.numel():
            assert_within_reference_error(what, a, b, e, e.abs().max().item())
    assert got[2].shape == ((shape[1],) if optionals[2] else (0,))


@pytest.mark.parametrize("backend", CPP)
def test_layer_norm_kernel_is_deterministic_across_thread_counts(backend):
    """``d_w`` sums over rows in fixed blocks: the same bits whatever the thread count."""
    args = _ln_args(1040, 192, torch.float32, (True, True, True), seed=4)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(LN(*args))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("backend", CPP)
def test_layer_norm_kernel_bad_inputs_name_the_problem(backend):
    args = list(_ln_args(6, 4, torch.float32, (True, True, True)))
    bad = list(args)
    bad[0] = torch.randn(6, 5)  # u of the wrong width
    with pytest.raises(ValueError, match=r"u must have shape \(6, 4\)"):
        LN(*bad)
    bad = list(args)
    bad[6] = non_contiguous(args[6].reshape(-1)).reshape(6, 4)
    with pytest.raises(ValueError, match="gx is not contiguous"):
        LN(*bad)
    bad = list(args)
    bad[8] = torch.randn(5)
    with pytest.raises(ValueError, match="w must have 4 elements"):
        LN(*bad)
    with pytest.raises(TypeError, match="gy is Double but xhat is Float"):
        LN(*[a.double() if i == 3 else a for i, a in enumerate(args)])
    with pytest.raises(TypeError, match="supported: float32, float64"):
        LN(*[a.half() if a is not None else None for a in args])


def test_layer_norm_half_precision_goes_to_the_reference():
    """The wrapper sends dtypes the kernel does not take to the reference instead of failing."""
    args = tuple(a.to(torch.bfloat16) if a is not None else None for a in _ln_args(6, 4, torch.float32, (True,) * 3))
    got = ln_module.layer_norm_double_backward(*args)
    for a, b in zip(got, layer_norm_double_backward_ref(*args)):
        assert torch.equal(a, b)


def _gelu_inputs(n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Random points at several scales plus a sweep over the tails, where exp(-x²/2) underflows.
    x = torch.cat(
        [torch.randn(n, generator=g, dtype=torch.float64) * 3, torch.linspace(-30, 30, 601, dtype=torch.float64)]
    )
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    x, gy = x.to(dtype), gy.to(dtype)
    return gy, x, _gelu_prime(x, "none")


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 1000, 200_003])
def test_gelu_kernel_matches_reference(backend, dtype, n):
    gy, x, d1 = _gelu_inputs(n, dtype)
    gx, gy_d2 = GELU(gy, x, d1)
    gx_ref, gy_d2_ref = gelu_backward_and_curvature_ref(gy, x, d1)
    assert torch.equal(gx, gx_ref)  # the same float product
    exact = gelu_backward_and_curvature_ref(gy.double(), x.double(), d1.double())[1]
    assert_within_reference_error("gy·gelu''", gy_d2, gy_d2_ref, exact, exact.abs().max().item())
    # Elementwise too, not only at the largest magnitude: within a few ulps of each term's scale
    # |gy| φ(x) (2 + x²) (where 2 − x² cancels, that is the scale of the rounding, in any kernel),
    # times exp's condition number x²/2 (the rounding of x² moves exp(−x²/2) by x²/2 ulps), and
    # where φ(x) leaves the normal range (|x| > 13.2 in float32) the same factor times it. The
    # torch reference meets the same bound.
    xd = x.double()
    factor = gy.double().abs() * (2 + xd * xd)
    scale = factor * torch.exp(-0.5 * xd * xd) / (2 * torch.pi) ** 0.5
    bound = torch.finfo(dtype).eps * scale * (8 + xd * xd) + factor * torch.finfo(dtype).tiny
    assert ((gy_d2.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("backend", CPP)
def test_gelu_kernel_keeps_shape_and_bad_inputs_name_the_problem(backend):
    gy, x, d1 = (t.reshape(4, -1) for t in _gelu_inputs(1399, torch.float32))  # 1399 + 601 = 2000 = 4 · 500
    gx, gy_d2 = GELU(gy, x, d1)
    assert gx.shape == x.shape == gy_d2.shape
    with pytest.raises(ValueError, match=r"d1 has shape .* but x has"):
        GELU(gy, x, d1[:, :5].contiguous())
    with pytest.raises(ValueError, match="gy is not contiguous"):
        GELU(gy.t(), x.t().contiguous(), d1.t().contiguous())
    with pytest.raises(TypeError, match="gy is Double but x is Float"):
        GELU(gy.double(), x, d1)


def test_new_ops_default_to_their_references():
    """Without a kernel of its own (all but CPU with ``bissl._C``) a device runs the reference."""
    for op in ("layer_norm_double_backward", "gelu_backward_and_curvature"):
        assert op in _library.CPU_SCHEMAS and op not in _library.OP_NAMES
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bissl::{op}", "CompositeExplicitAutograd")


def test_opcheck():
    args = _ln_args(5, 3, torch.float64, (True, True, True))
    torch.library.opcheck(LN.default, args)
    torch.library.opcheck(GELU.default, _gelu_inputs(10, torch.float64))


def test_reference_route_matches_autograd(monkeypatch):
    """The torch references, forced in place of the kernels, against autograd's own double backward
    of ``layer_norm`` and ``gelu`` (float64)."""
    from bissl.ops.gelu_double_backward import gelu
    from bissl.ops.layernorm_double_backward import layer_norm

    monkeypatch.setattr(ln_module, "layer_norm_double_backward", layer_norm_double_backward_ref)
    monkeypatch.setattr(
        gelu_module, "_backward_and_curvature", lambda gy, x, d1, a: gelu_backward_and_curvature_ref(gy, x, d1)
    )
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(4, 5, 6, generator=g, dtype=torch.float64)
    vs = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, w, b)]

    def hvp(ln, act):
        loss = (act(ln(x, [6], w, b)) * probe).sum().square()
        grads = torch.autograd.grad(loss, (x, w, b), create_graph=True)
        return torch.autograd.grad(grads, (x, w, b), vs)

    ours = hvp(layer_norm, gelu)
    stock = hvp(torch.nn.functional.layer_norm, torch.nn.functional.gelu)
    for a, e in zip(ours, stock):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
