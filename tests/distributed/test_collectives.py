"""Bucketed collectives, the rank-averaged matvec and hypergradient: single-process unit tests,
and one two-rank gloo job (tests/distributed/collectives_worker.py) checked against a
single-process run of the shard-averaged losses and a dense float64 solve."""

from __future__ import annotations

import math

import pytest
import torch
from _dist_launch import run_ranks

from bissl.distributed import DistributedMatVec, allreduce_mean_, distributed_implicit_hypergrad
from bissl.distributed.shard import ShardLayout
from bissl.hypergrad import HypergradSettings, implicit_hypergrad
from bissl.testing import cnn_problem


# ---------------------------------------------------------------- single process (no group)
def test_allreduce_mean_validates_input():
    with pytest.raises(ValueError, match="contiguous 1-D floating"):
        allreduce_mean_(torch.ones(2, 3))
    with pytest.raises(ValueError, match="contiguous 1-D floating"):
        allreduce_mean_(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="contiguous 1-D floating"):
        allreduce_mean_(torch.ones(8)[::2])
    with pytest.raises(ValueError, match="bucket_numel"):
        allreduce_mean_(torch.ones(4), bucket_numel=0)


def test_allreduce_mean_is_identity_on_one_rank():
    flat = torch.arange(5.0)
    assert allreduce_mean_(flat) == 0
    assert torch.equal(flat, torch.arange(5.0))


def test_distributed_matvec_checks_and_never_writes_into_v():
    v = torch.arange(4.0)
    op = DistributedMatVec(lambda u: u)  # returns its input: the wrapper must copy
    out = op(v)
    assert torch.equal(out, v) and out.data_ptr() != v.data_ptr() and op.num_matvecs == 1
    with pytest.raises(ValueError, match="expected"):
        DistributedMatVec(lambda u: u[:2])(v)
    with pytest.raises(TypeError, match="callable"):
        DistributedMatVec(None)


def test_distributed_hypergrad_equals_core_on_one_rank():
    """Without a process group the reductions vanish: implicit_hypergrad's answer. Not bit for bit:
    the core solver reads the HVP's per-tensor pieces, the space's operator a flat vector, so the
    float64-accumulated dots sum in a different order (round-off only)."""
    prob = cnn_problem(norm="group")
    settings = HypergradSettings(iters=4, damping=30.0)
    want, info_want = implicit_hypergrad(
        prob.lower_loss, prob.upper_loss, prob.params, lam=1.0, return_info=True, **settings.kwargs()
    )
    got, info = distributed_implicit_hypergrad(
        prob.lower_loss, prob.upper_loss, prob.params, lam=1.0, settings=settings, return_info=True
    )
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(info.alphas, info_want.alphas, rtol=1e-12, atol=0)
    assert info.num_collectives == 0


def test_distributed_hypergrad_validates_like_the_core():
    prob = cnn_problem(norm="group")
    with pytest.raises(ValueError, match="lam"):
        distributed_implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=0.0)
    with pytest.raises(ValueError, match="on_indefinite"):
        distributed_implicit_hypergrad(
            prob.lower_loss, prob.upper_loss, prob.params, lam=1.0, settings=HypergradSettings(on_indefinite="ignore")
        )


def test_sharded_hypergrad_equals_core_on_one_rank():
    """One process: the partition is the whole vector (no padding), same answer as the core."""
    prob = cnn_problem(norm="group")
    settings = HypergradSettings(iters=4, damping=30.0)
    want = implicit_hypergrad(prob.lower_loss, prob.upper_loss, prob.params, lam=1.0, **settings.kwargs())
    got = distributed_implicit_hypergrad(
        prob.lower_loss, prob.upper_loss, prob.params, lam=1.0, settings=settings, shard=True
    )
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-14)


def test_shard_layout_partitions_like_zero3():
    """Tensor i of n_i entries: ⌈n_i/N⌉-entry chunks, rank r holds chunk r of each tensor,
    zero-padded; gathering the partitions restores the vector."""
    numels = [5, 1, 8, 3]
    full = torch.arange(1.0, 18.0)
    layouts = [ShardLayout(numels, 3, r) for r in range(3)]
    assert [lay.local_numel for lay in layouts] == [2 + 1 + 3 + 1] * 3
    parts = [lay.local(full) for lay in layouts]
    assert parts[0].tolist() == [1, 2, 6, 7, 8, 9, 15]
    assert parts[2].tolist() == [5, 0, 0, 13, 14, 0, 17]  # padding is zero
    assert torch.equal(layouts[0]._scatter(torch.stack(parts)), full)
    assert layouts[1].local_segments.tolist() == [0, 0, 1, 2, 2, 2, 3]
    assert sum(lay.local_numel for lay in layouts) < full.numel() + 3 * len(numels)


# ---------------------------------------------------------------- two ranks (gloo, 127.0.0.1)
@pytest.fixture(scope="module")
def two_rank_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("collectives")
    code, log = run_ranks("collectives_worker.py", "--out", str(out))
    assert code == 0, f"two-rank job failed (exit {code}):\n{log[-4000:]}"
    return torch.load(out / "result.pt", weights_only=False)


@pytest.mark.slow
def test_allreduce_mean_values_and_collective_counts(two_rank_result):
    assert two_rank_result["world_size"] == 2
    for name, r in two_rank_result["allreduce"].items():
        assert r["err"] < 1e-12, name
        assert r["issued"] == r["counted"] == r["expected"], name


@pytest.mark.slow
def test_distributed_hypergrad_matches_single_process_and_dense(two_rank_result):
    short, long_, bucketed = two_rank_result["hypergrad"]
    for r in (short, long_, bucketed):
        assert r["min_eig_A"] > 0.05  # the test system is positive definite: CG's answer is meaningful
        assert r["err_vs_single_process"] < 1e-10
    # converged (iterations > P): the shard-averaged dense solve is the exact answer
    assert long_["iters"] > long_["numel"]
    assert long_["err_vs_dense"] < 1e-8
    assert short["err_vs_dense"] > 1e-6  # 5 iterations do not converge: the two checks differ


@pytest.mark.slow
def test_cg_state_identical_on_every_rank(two_rank_result):
    for r in two_rank_result["hypergrad"]:
        assert r["cg_state_identical"]
        # control: without the reductions the ranks' solutions differ (the check can fail)
        assert not r["unreduced_solutions_identical"]


@pytest.mark.slow
def test_one_collective_per_matvec(two_rank_result):
    short, long_, bucketed = two_rank_result["hypergrad"]
    for r in (short, long_):
        assert r["num_collectives_counted"] == r["num_collectives_reported"] == 1 + r["num_matvecs"]
    per_vector = math.ceil(bucketed["numel"] / bucketed["bucket"])
    assert bucketed["num_collectives_counted"] == (1 + bucketed["num_matvecs"]) * per_vector
    assert bucketed["num_collectives_reported"] == bucketed["num_collectives_counted"]


@pytest.mark.slow
def test_sharded_solve_matches_unsharded(two_rank_result):
    r = two_rank_result["sharded"]
    # Each rank keeps ~P/N entries of every solver vector (ceil per tensor).
    assert r["local_numel"] < r["numel"] / 2 + 8 and r["local_numel"] >= r["numel"] / 2
    for solver in ("cg", "cg_layerwise", "minres", "neumann", "identity"):
        assert r[solver]["rel_err"] < 1e-12, (solver, r[solver])
        assert r[solver]["identical_on_ranks"], solver
    # CG (7 iterations): rhs reduce-scatter (gloo: 1 all-reduce), 7 HVP reductions, and one
    # all-reduce per dot: bᵀb, r₀ᵀr₀, and pᵀAp, rᵀr per iteration.
    assert r["cg"]["collectives"] == 1 + 7 + 2 + 2 * 7
    assert r["host_sync"] is None, r["host_sync"]
