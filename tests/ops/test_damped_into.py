"""bissl::damped_into_: out = scale·cat(hv) + shift·v from a matvec's pieces, and vᵀout — the C++
kernel (the ``cpp`` backend) and the torch reference against an exact answer, on random pieces."""

from __future__ import annotations

import pytest
import torch
from fused_cases import DTYPES, assert_within_reference_error, backend_params, exact_sum, non_contiguous, randn

from bissl.ops import _library
from bissl.ops.damped_into import damped_into_

SCALE, SHIFT = 1.0 / 10.001, 1.0
#: Piece sizes: a weight spanning several 16 Ki-element chunks, empty and one-element pieces, and
#: pieces that start and end inside a chunk.
PIECES = {
    "resnet_like": (1_000_003, 64, 0, 1, 70_001, 37),
    "one_piece": (4097,),
    "many_small": (3,) * 50 + (16_385,),
}
CPP = [p for p in backend_params(kernels_only=True) if p.id == "cpp"]


def _pieces(sizes: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    return [randn(n, dtype) for n in sizes]


def _run(pieces: list[torch.Tensor], v: torch.Tensor, scale: float, shift: float, kernel: bool):
    out = torch.full_like(v, float("nan"))  # every element must be written
    av, vav = damped_into_(out, pieces, v, scale, shift, cpu_kernel=kernel)
    assert av is out
    return out, vav


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(PIECES))
def test_kernel_matches_reference(backend, dtype, layout):
    pieces = _pieces(PIECES[layout], dtype)
    v = randn(sum(PIECES[layout]), dtype)
    exact = SCALE * torch.cat(pieces).double() + SHIFT * v.double()

    out, vav = _run(pieces, v, SCALE, SHIFT, kernel=True)
    out_ref, vav_ref = _run(pieces, v, SCALE, SHIFT, kernel=False)

    assert vav.shape == () and vav.dtype == dtype
    assert_within_reference_error("Av", out, out_ref, exact, exact.abs().max().item())
    terms = v.double() * out.double()
    assert_within_reference_error("vAv", vav, vav_ref, exact_sum(terms), exact_sum(terms.abs()))


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("scale,shift", [(-2.5, 0.0), (1.0, 0.3), (0.7, -1.5)])
def test_kernel_other_constants(backend, scale, shift):
    pieces = _pieces((513, 20_000, 9), torch.float64)
    v = randn(20_522, torch.float64)
    out, vav = _run(pieces, v, scale, shift, kernel=True)
    expected = scale * torch.cat(pieces) + shift * v
    torch.testing.assert_close(out, expected, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(vav, torch.dot(v, expected), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", CPP)
def test_kernel_reads_pieces_in_any_layout(backend):
    """Pieces as the matvec returned them: multi-dimensional, a transposed (non-contiguous) one."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(30, 40, generator=g, dtype=torch.float64).t()  # non-contiguous (40, 30)
    pieces = [torch.randn(2, 3, 5, generator=g, dtype=torch.float64), w]
    v = torch.randn(30 + 1200, generator=g, dtype=torch.float64)
    out, _ = _run(pieces, v, SCALE, SHIFT, kernel=True)
    torch.testing.assert_close(out, SCALE * torch.cat([t.reshape(-1) for t in pieces]) + SHIFT * v)


@pytest.mark.parametrize("backend", CPP)
def test_kernel_is_deterministic_across_thread_counts(backend):
    pieces = _pieces((70_001, 5, 33_000), torch.float32)
    v = randn(103_006, torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_run(pieces, v, SCALE, SHIFT, kernel=True))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("kernel", [pytest.param(True, marks=CPP[0].marks, id="cpp"), pytest.param(False, id="torch")])
def test_bad_inputs_name_the_problem(kernel):
    v, out = randn(10, torch.float32), torch.empty(10)
    with pytest.raises(ValueError, match="10"):
        damped_into_(out, [randn(4, torch.float32)], v, SCALE, SHIFT, cpu_kernel=kernel)
    with pytest.raises(ValueError, match="10"):
        damped_into_(out, [randn(4, torch.float32), randn(7, torch.float32)], v, SCALE, SHIFT, cpu_kernel=kernel)
    if kernel:
        with pytest.raises(TypeError, match=r"Double but v is Float"):
            damped_into_(out, [randn(10, torch.float64)], v, SCALE, SHIFT, cpu_kernel=True)
        with pytest.raises(ValueError, match="contiguous"):
            torch.ops.bissl.damped_into_(out, [non_contiguous(randn(10, torch.float32))], v, SCALE, SHIFT)


def test_reference_is_the_default_kernel():
    """Devices without a kernel of their own (all but CPU with ``bissl._C``) run the reference."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("bissl::damped_into_", "CompositeExplicitAutograd")
    assert "damped_into_" not in _library.OP_NAMES  # not among the ops every backend must provide


def test_opcheck():
    pieces, v = _pieces((7, 30), torch.float64), randn(37, torch.float64)
    torch.library.opcheck(torch.ops.bissl.damped_into_.default, (torch.empty_like(v), pieces, v, SCALE, SHIFT))
