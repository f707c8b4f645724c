"""bissl.ops.reference.dot_ref: float64-accumulated dot products, the CG scalars' source of truth."""

from __future__ import annotations

import pytest
import torch

from bissl.ops.reference import DOT_BLOCK, dot_ref


@pytest.mark.parametrize("n", [1, DOT_BLOCK, DOT_BLOCK + 1, 3 * DOT_BLOCK + 17, 2_000_003])
def test_dot_ref_matches_float64(n):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, generator=g) + 0.3  # a non-zero mean: a sum of like-signed terms, as rᵀr
    b = torch.randn(n, generator=g)
    for x, y in ((a, a), (a, b)):
        exact = torch.dot(x.double(), y.double())
        got = dot_ref(x, y)
        assert got.shape == () and got.dtype == torch.float32
        # Error relative to ‖x‖‖y‖ (the scale of every term's rounding): float32 rounding of the
        # result plus short block sums, far below a float32-accumulated sum over 2e6 terms.
        scale = float(x.double().norm() * y.double().norm())
        assert abs(float(got) - float(exact)) <= 4e-7 * scale, (n, float(got), float(exact))


def test_dot_ref_beats_float32_accumulation_on_long_sums():
    # The reason dot_ref exists: a long like-signed sum accumulated in float32 drifts.
    a = torch.full((2_000_003,), 0.1) + torch.linspace(0, 1e-3, 2_000_003)
    exact = float(torch.dot(a.double(), a.double()))
    plain = abs(float(torch.dot(a, a)) - exact) / exact  # one float32-accumulated dot: ~2e-4 here
    ours = abs(float(dot_ref(a, a)) - exact) / exact
    # A few float32 ulps of the result (~1e-7 each): the block dots' own float32 accumulation
    # depends on the BLAS thread split (measured 1.5e-8 with one thread, 3e-7 with two).
    assert ours < 5e-7 and ours < plain / 100
    assert abs(float(dot_ref(a.double(), a.double())) - exact) / exact < 1e-12


def test_dot_ref_reads_any_shape_as_its_flattened_entries():
    # Above the block length the blocks are cut from the flattened tensor, not along dim 0.
    a, b = torch.randn(64, 32, 3, 3 * 12), torch.randn(64, 32, 3, 3 * 12)
    assert a.numel() > DOT_BLOCK
    exact = float((a.double() * b.double()).sum())
    assert abs(float(dot_ref(a, b)) - exact) <= 1e-6 * abs(exact) + 1e-3
    assert float(dot_ref(a[:2], b[:2])) == pytest.approx(float((a[:2].double() * b[:2].double()).sum()), rel=1e-6)
