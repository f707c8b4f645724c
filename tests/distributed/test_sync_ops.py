"""SyncBatchNorm, the differentiable collectives and SimCLR's gathered negatives on two gloo ranks
(tests/distributed/sync_ops_worker.py), against one process on the concatenated global batch in
float64: values, gradients, HVPs of every kind, running statistics, unequal shards, bad input."""

from __future__ import annotations

import pytest
import torch
from _dist_launch import run_ranks

TOL = 1e-10


@pytest.fixture(scope="module")
def two_rank_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync_ops")
    code, log = run_ranks("sync_ops_worker.py", "--out", str(out))
    assert code == 0, f"two-rank job failed (exit {code}):\n{log[-4000:]}"
    return torch.load(out / "result.pt", weights_only=False)


@pytest.mark.slow
def test_loss_gradients_and_hvps_match_the_global_batch(two_rank_result):
    r = two_rank_result["model"]
    assert two_rank_result["world_size"] == 2
    assert r["n_sync_layers"] == 5  # four in the CNN, one in the projector
    # the per-rank loss is not the global one; only their mean is (the check can fail)
    assert r["local_loss_differs"] > 1e-3
    assert r["local_hvp_differs"] > 1e-3
    assert r["grad_norm"] > 1e-2 and r["hvp_norm"] > 1e-2
    assert r["loss_err"] < TOL and r["train_step_loss_err"] < TOL
    assert set(r["grad_errors"]) >= {"torch.func grad", "module .grad after backward", "linearize_hvp revrev .grad"}
    for name, err in r["grad_errors"].items():
        assert err < TOL, name
    assert set(r["hvp_errors"]) >= {
        "double backward",
        "torch.func jvp(grad)",
        "hvp fwdrev",
        "hvp revrev",
        "hvp autograd",
        "linearize_hvp revrev",
        "linearize_hvp fwdrev",
    }
    for name, err in r["hvp_errors"].items():
        assert err < TOL, name


@pytest.mark.slow
def test_running_statistics_follow_the_global_batch_and_freeze_in_hvps(two_rank_result):
    r = two_rank_result["model"]
    assert r["running_stats_moved"] > 1e-3
    assert r["running_stats_err"] < TOL
    assert r["frozen_buffers_identical"]


@pytest.mark.slow
def test_unequal_shards(two_rank_result):
    r = dict(two_rank_result["unequal"])
    assert r.pop("num_batches_tracked") == 2
    assert r.pop("eval bit-identical")
    assert r.pop("bfloat16 dtype") == "torch.bfloat16"
    assert r.pop("bfloat16 output") < 0.05  # the output is rounded to bfloat16 (8 bits): |y| < 4 moves < 4 * 2**-8
    for name, err in r.items():
        assert err < TOL, name


@pytest.mark.slow
def test_mismatched_gathers_raise_on_every_rank(two_rank_result):
    per_rank = two_rank_result["errors_per_rank"]
    msgs = per_rank[0]
    for name in msgs:  # every rank raised (none was left waiting), the gathers with the same message
        assert (per_rank[1][name] == msgs[name]) or name == "global batch of 1", name
        assert per_rank[1][name] is not None and msgs[name] is not None, name
    assert "rank 0: shape (2, 4)" in msgs["rows"] and "rank 1: shape (3, 4)" in msgs["rows"]
    assert "rank 1: shape (2, 4, 1)" in msgs["ndim"]
    assert "different dtype" in msgs["dtype"]
    assert "same shape" in msgs["simclr shards"]
    for m in per_rank:
        assert "more than 1 value per channel in the global batch" in m["global batch of 1"]
    assert msgs["after"] == [[0.0, 0.0, 1.0, 1.0]]
