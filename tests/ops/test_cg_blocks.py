"""Layer-wise CG's per-block ops — ``bissl::damped_into_blocks_``, ``cg_step_blocks_`` and
``cg_direction_blocks_`` — the C++ kernels against their torch references and an exact answer on
random vectors, and ``cg_layerwise_solve`` taking the same iterates through the kernels as through
the per-block loop of the torch backend."""

from __future__ import annotations

import itertools

import pytest
import torch
from fused_cases import DTYPES, assert_within_reference_error, backend_params, exact_sum, randn

from bissl.ops import reference as ref
from bissl.solvers import cg_layerwise_solve

CPP = [p for p in backend_params(kernels_only=True) if p.id == "cpp"]
SCALE, SHIFT = 1.0 / 10.001, 1.0
#: Block lengths: empty blocks (first, middle, last), one-element blocks, blocks straddling the
#: kernels' 16 Ki-element chunks and one spanning several, and a single block.
LAYOUTS = {
    "mixed": (0, 5, 70_001, 0, 1, 16_384, 3, 40_000, 0),
    "one_block": (33_000,),
    "many_small": (7,) * 40 + (16_385,),
}


def _offsets(lengths: tuple[int, ...]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _per_block_exact(terms: torch.Tensor, offsets: list[int]) -> list[float]:
    return [exact_sum(terms[lo:hi]) if hi > lo else 0.0 for lo, hi in itertools.pairwise(offsets)]


def _check_sums(what, got, reference, terms, offsets):
    exact = _per_block_exact(terms, offsets)
    magnitude = _per_block_exact(terms.abs(), offsets)
    for k, (e, m) in enumerate(zip(exact, magnitude)):
        assert_within_reference_error(f"{what}[{k}]", got[k], reference[k], e, m)


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_damped_into_blocks_matches_reference(backend, dtype, layout):
    offsets = _offsets(LAYOUTS[layout])
    n = offsets[-1]
    # The matvec's pieces cut the vector elsewhere than the blocks do.
    cuts = [0, n // 3, n // 3 + 1, n]
    hv = [randn(hi - lo, dtype) for lo, hi in itertools.pairwise(cuts)]
    v = randn(n, dtype)
    out = torch.full_like(v, float("nan"))
    out_ref = torch.full_like(v, float("nan"))
    got = torch.ops.bissl.damped_into_blocks_(out, hv, v, SCALE, SHIFT, offsets)
    want = ref.damped_into_blocks_ref_(out_ref, hv, v, SCALE, SHIFT, offsets)
    exact = SCALE * torch.cat(hv).double() + SHIFT * v.double()
    assert got.shape == (len(offsets) - 1,) and got.dtype == dtype
    assert_within_reference_error("Av", out, out_ref, exact, exact.abs().max().item())
    _check_sums("vAv", got, want, v.double() * out.double(), offsets)


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cg_step_and_direction_blocks_match_reference(backend, dtype, layout):
    offsets = _offsets(LAYOUTS[layout])
    n, blocks = offsets[-1], len(offsets) - 1
    x, r, p, ap = (randn(n, dtype) for _ in range(4))
    g = torch.Generator().manual_seed(5)
    alpha = torch.rand(blocks, generator=g, dtype=torch.float64).to(dtype) + 0.1
    beta = torch.rand(blocks, generator=g, dtype=torch.float64).to(dtype)
    mine = [t.clone() for t in (x, r, p)]
    theirs = [t.clone() for t in (x, r, p)]

    rr = torch.ops.bissl.cg_step_blocks_(mine[0], mine[1], mine[2], ap, alpha, offsets)
    rr_ref = ref.cg_step_blocks_ref_(theirs[0], theirs[1], theirs[2], ap, alpha, offsets)
    a_full = torch.repeat_interleave(alpha.double(), torch.tensor(LAYOUTS[layout]))
    x_exact, r_exact = x.double() + a_full * p.double(), r.double() - a_full * ap.double()
    assert_within_reference_error("x", mine[0], theirs[0], x_exact, x_exact.abs().max().item())
    assert_within_reference_error("r", mine[1], theirs[1], r_exact, r_exact.abs().max().item())
    _check_sums("rr", rr, rr_ref, mine[1].double() ** 2, offsets)

    torch.ops.bissl.cg_direction_blocks_(mine[2], mine[1], beta, offsets)
    ref.cg_direction_blocks_ref_(theirs[2], mine[1], beta, offsets)
    b_full = torch.repeat_interleave(beta.double(), torch.tensor(LAYOUTS[layout]))
    p_exact = mine[1].double() + b_full * p.double()
    assert_within_reference_error("p", mine[2], theirs[2], p_exact, p_exact.abs().max().item())


@pytest.mark.parametrize("backend", CPP)
def test_block_sums_are_deterministic_across_thread_counts(backend):
    offsets = _offsets(LAYOUTS["mixed"])
    n = offsets[-1]
    hv, v = [randn(n, torch.float32)], randn(n, torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = torch.empty_like(v)
            results.append((torch.ops.bissl.damped_into_blocks_(out, hv, v, SCALE, SHIFT, offsets), out))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("kernel", [pytest.param(True, marks=CPP[0].marks, id="cpp"), pytest.param(False, id="torch")])
def test_bad_offsets_name_the_problem(kernel):
    x, r, p, ap = (randn(10, torch.float64) for _ in range(4))
    alpha = torch.ones(2, dtype=torch.float64)
    step = torch.ops.bissl.cg_step_blocks_ if kernel else ref.cg_step_blocks_ref_
    with pytest.raises(ValueError, match="offsets must run from 0 to the vectors' length 10"):
        step(x, r, p, ap, alpha, [0, 4, 9])
    with pytest.raises(ValueError, match="non-decreasing"):
        step(x, r, p, ap, torch.ones(3, dtype=torch.float64), [0, 6, 4, 10])
    if kernel:
        with pytest.raises(ValueError, match="one value per block"):
            step(x, r, p, ap, torch.ones(3, dtype=torch.float64), [0, 4, 10])


def test_opcheck():
    offsets = [0, 3, 3, 9]
    v = randn(9, torch.float64)
    torch.library.opcheck(
        torch.ops.bissl.damped_into_blocks_.default,
        (torch.empty_like(v), [randn(9, torch.float64)], v, 0.5, 1.0, offsets),
    )
    x, r, p, ap = (randn(9, torch.float64) for _ in range(4))
    coeffs = torch.rand(3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.bissl.cg_step_blocks_.default, (x, r, p, ap, coeffs, offsets))
    torch.library.opcheck(torch.ops.bissl.cg_direction_blocks_.default, (p, r, coeffs, offsets))


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("form", ["dict", "flat_segments"])
def test_layerwise_cg_takes_the_same_iterates_with_and_without_the_kernels(backend, form, monkeypatch):
    """The per-block kernels (``cpp``) and the torch backend's per-block loop: same α, β and x."""
    g = torch.Generator().manual_seed(11)
    lengths = (300, 0, 1, 4097, 20_000)
    n = sum(lengths)
    q = torch.randn(n, generator=g, dtype=torch.float64)
    diag = torch.rand(n, generator=g, dtype=torch.float64) * 5 + 0.5

    def matvec_flat(v):  # symmetric positive definite and coupling every block: D + q qᵀ / n
        return diag * v + q * (q @ v) / n

    b_flat = torch.randn(n, generator=g, dtype=torch.float64)
    if form == "dict":
        names = [f"t{k}" for k in range(len(lengths))]
        b = dict(zip(names, torch.split(b_flat, lengths)))

        def matvec(v):
            out = matvec_flat(torch.cat([v[k] for k in names]))
            return dict(zip(names, torch.split(out, lengths)))

        kw = {}
    else:
        b, matvec, kw = b_flat, matvec_flat, {"segments": list(lengths)}
    runs = {}
    for name in ("cpp", "torch"):
        monkeypatch.setenv("BISSL_BACKEND", name)
        runs[name] = cg_layerwise_solve(matvec, b, iters=5, scale=0.3, damping=1.0, **kw)
    x = {k: torch.cat(list(r.x.values())) if form == "dict" else r.x for k, r in runs.items()}
    torch.testing.assert_close(x["cpp"], x["torch"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(runs["cpp"].alphas, runs["torch"].alphas, rtol=1e-12, atol=0)
    torch.testing.assert_close(runs["cpp"].betas, runs["torch"].betas, rtol=1e-12, atol=0)
