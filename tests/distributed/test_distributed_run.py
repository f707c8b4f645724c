"""``run_experiment`` with ``run.nproc: 2`` (2 gloo ranks on 127.0.0.1, the BiSSL stage under
DeepSpeed ZeRO) on the tiny pipeline of tests/trainer.

What is compared against what:

* ZeRO 0 (LARS below), 2 and 3 (SGD below): the BiSSL stage's parameters after its 11 steps equal a
  single-process computation of the same stage on **shard-averaged** losses — the same global
  batches, each step by :func:`reference_bissl_step` over the 2 shards. Exact equality with the plain
  single-process run is impossible here: every rank normalises with its own shard's BatchNorm
  statistics and SimCLR takes its negatives within the shard (see docs/distributed.md).
* One rank (world size 1, ZeRO 0, LARS): the DeepSpeed phase against BisslPhase of a plain
  single-process run — parameters, BatchNorm buffers and every metrics row.
* A run interrupted twice in the BiSSL stage (a raised interruption, then a rank that dies) and
  resumed ends bit-identical to the uninterrupted run.
* Unsupported keys and bad DeepSpeed keys fail before any process starts.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from _dist_launch import JOB_TIMEOUT_S

from bissl.config import ConfigError, load_config
from bissl.distributed import launch
from bissl.distributed.objectives import LowerObjective, UpperObjective
from bissl.distributed.reference import reference_bissl_step
from bissl.distributed.sharding import check_shardable, shard_of
from bissl.extras import describe_missing
from bissl.trainer import RunInterrupted, run_experiment
from bissl.trainer.bissl_stage import (
    StageBatches, StageSchedule, downstream_objective, lower_optimizer, lower_schedule,
    pretext_objective, start_models, upper_optimizer, upper_schedule, warmup_loss, warmup_optimizer,
)
from bissl.trainer.checkpoint import load_checkpoint
from bissl.trainer.distributed_run import DistributedRunError, _job_failure
from bissl.trainer.experiment import load_pipeline_data
from bissl.trainer.metrics import read_metrics
from bissl.trainer.rng import derive_seed, seed_everything
from bissl.trainer.zero_bissl_phase import hypergrad_settings

TINY = Path(__file__).parents[1] / "trainer" / "tiny.yaml"
# A skip here fails CI (BISSL_REQUIRE_ALL=1, tests/conftest.py): CI installs the extra.
needs_deepspeed = pytest.mark.skipif(bool(describe_missing("distributed")), reason=describe_missing("distributed"))
# Per stage: LARS is layer-wise, so ZeRO >= 1 needs the elementwise SGD below (at a stable lr).
STAGE_OVERRIDES = {
    0: ["deepspeed.zero_stage=0"],
    2: ["deepspeed.zero_stage=2", "bissl.lower.optimizer=sgd", "bissl.lower.lr=0.05"],
    3: ["deepspeed.zero_stage=3", "bissl.lower.optimizer=sgd", "bissl.lower.lr=0.05"],
}


def _tiny(*overrides: str):
    return load_config(TINY, list(overrides))


def _snapshot(run_dir: Path) -> dict:
    ckpts = run_dir / "seed_0" / "checkpoints"
    rows = [{k: v for k, v in r.items() if k != "wall_s"} for r in read_metrics(run_dir / "seed_0" / "metrics.csv")]
    return {"bissl": load_checkpoint(ckpts / "bissl.done.pt")["result"],
            "pretext": load_checkpoint(ckpts / "pretext.done.pt")["result"], "rows": rows,
            "leftovers": sorted(p.name for p in ckpts.iterdir() if not p.name.endswith(".done.pt"))
                         + sorted(p.name for p in run_dir.iterdir() if p.name.startswith("."))}


def _run(tmp: Path, stage: int, *extra: str):
    run_dir = tmp / "run"
    results = run_experiment(_tiny("run.nproc=2", *STAGE_OVERRIDES[stage], *extra), run_dir)
    return run_dir, results


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """``two_rank_run(stage)`` -> ``(results, snapshot)`` of the 2-rank tiny run (each run once)."""
    cache: dict[int, tuple[dict, dict]] = {}

    def get(stage: int) -> tuple[dict, dict]:
        if stage not in cache:
            run_dir, results = _run(tmp_path_factory.mktemp(f"nproc2_zero{stage}"), stage)
            cache[stage] = (results, _snapshot(run_dir))
        return cache[stage]
    return get


def _oracle_stage(cfg, pretext_result: dict, world: int, seed: int = 0) -> dict:
    """The BiSSL stage in one process on shard-averaged losses: the head warm-up on the full batch
    (φ in eval mode: the shard average is the full-batch loss), then every lower/upper block by
    :func:`reference_bissl_step` on the ``world`` shards of the same global batches."""
    data, cpu, b = load_pipeline_data(cfg), torch.device("cpu"), cfg.bissl
    seed_everything(derive_seed(seed, "bissl"))
    m = start_models(cfg, data, cpu, pretext_result)
    batches = StageBatches(cfg, data, seed, cpu)
    schedule = StageSchedule.from_config(cfg, batches.upper_sampler.steps_per_epoch)
    opt, sched = warmup_optimizer(cfg, m.head.parameters(), schedule.warmup_steps)
    for _ in range(schedule.warmup_steps):
        loss = warmup_loss(m.phi_net, m.head, *batches.downstream())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    lower = LowerObjective(m.theta_net, m.pretext, pretext_objective, lam=b.lam).train()
    upper = UpperObjective(m.phi_net, m.head, downstream_objective, gamma=b.gamma).train()
    lo = lower_optimizer(cfg, [p for p in lower.parameters() if p.requires_grad])
    uo = upper_optimizer(cfg, [p for p in upper.parameters() if p.requires_grad])
    kw = {"lower_clip_norm": b.clip_norm, "upper_clip_norm": b.clip_norm,
          "lower_scheduler": lower_schedule(cfg, lo), "upper_scheduler": upper_schedule(cfg, uo)}

    def split(batch):
        return [shard_of(batch, r, world) for r in range(world)]

    for stage in range(b.stages):
        lower_shards = [split(batches.lower_views()) for _ in range(b.lower_steps)]
        for k in range(b.upper_steps):
            reference_bissl_step(lower, upper, lo, uo, lower_shards if k == 0 else [],
                                 split(batches.hvp_views(stage)), split(batches.downstream()),
                                 hypergrad_settings(cfg), **kw)
    return {"lower_backbone": m.theta_net, "pretext": m.pretext, "upper_backbone": m.phi_net,
            "head": m.head}


def _max_param_diff(result: dict, modules: dict) -> float:
    """Largest |difference| between a parameter of ``result`` and of ``modules``, over all parts."""
    diff = 0.0
    for part, module in modules.items():
        for name, p in module.named_parameters():
            diff = max(diff, (result[part][name] - p.detach()).abs().max().item())
    return diff


# --------------------------------------------------------------------------- fast: no processes
@pytest.mark.parametrize("override, key", [
    ("bissl.direct_term=theta", "bissl.direct_term"),
    ("bissl.prox_pull=0.5", "bissl.prox_pull"),
    ("bissl.lam_schedule=distance", "bissl.lam_schedule"),
    ("run.workers=2", "run.workers"),
    ("bissl.upper.batch_size=127", "bissl.upper.batch_size"),
    ("bissl.hvp_batch_size=2", "bissl.hvp_batch_size"),
    ("run.device=cuda:1", "run.device"),
    ("bissl.hvp_mode=auto", "bissl.hvp_mode"),
])
def test_unsupported_keys_fail_before_any_rank_starts(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        run_experiment(_tiny("run.nproc=2", override), tmp_path / "run")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_byol_is_refused_under_zero3_only(tmp_path):
    byol = ["run.nproc=2", "pretext.method=byol", "bissl.lower.optimizer=sgd"]
    with pytest.raises(ConfigError, match=r"'pretext\.method' is 'byol' with deepspeed\.zero_stage 3"):
        run_experiment(_tiny(*byol, "deepspeed.zero_stage=3"), tmp_path / "run")
    from bissl.trainer.distributed_run import check_distributed_config

    check_distributed_config(_tiny(*byol, "deepspeed.zero_stage=2"))  # accepted


def test_bad_deepspeed_key_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown key 'zero_stag' \(did you mean 'zero_stage'\?\)"):
        _tiny("run.nproc=2", "deepspeed.zero_stag=2")
    with pytest.raises(ConfigError, match="'bissl.lower.optimizer' is 'lars'"):
        _tiny("run.nproc=2", "deepspeed.zero_stage=1")


def test_rank_errors_are_reraised_with_their_type(tmp_path):
    def report(rank, kind, message):
        (tmp_path / f"rank{rank}.error.json").write_text(json.dumps(
            {"rank": rank, "type": kind, "message": message}))

    report(1, "NonFiniteLossError", "non-finite loss (nan) in phase 'bissl'")
    from bissl.trainer.loop import NonFiniteLossError

    err = _job_failure(tmp_path, 1, [], 2)
    assert isinstance(err, NonFiniteLossError) and "phase 'bissl'" in str(err)
    report(0, "ConfigError", "config error: 'bissl.lower.batch_size' is 3")
    err = _job_failure(tmp_path, 1, [], 2)  # the lowest rank's report wins
    assert isinstance(err, ConfigError) and str(err) == "config error: 'bissl.lower.batch_size' is 3"
    report(0, "KeyError", "'x'")
    err = _job_failure(tmp_path, 1, [], 2)
    assert isinstance(err, DistributedRunError) and "rank 0 of 2 failed with KeyError" in str(err)


def test_a_rank_that_dies_silently_is_named(tmp_path):
    line = ("bissl launch: the 2-process job failed (exit code 1 from torchrun): rank 1 (local rank 1, "
            "pid 7) failed first: killed by SIGKILL; the other ranks were stopped")
    (tmp_path / "rank0.error.json").write_text(json.dumps(
        {"rank": 0, "type": "RuntimeError", "message": "Connection reset by peer"}))
    err = _job_failure(tmp_path, 1, ["noise", line, "more noise"], 2)  # rank 0's error came second
    assert isinstance(err, DistributedRunError) and "Connection reset" not in str(err)
    assert str(err).startswith("the 2-process job failed") and "rank 1 (local rank 1" in str(err)
    assert str(err).endswith("rerun the same command to resume from the last checkpoint")


def test_sharding_splits_global_batches_evenly():
    x, y = torch.arange(12.0).view(6, 2), torch.arange(6)
    shards = [shard_of((x, y), r, 3) for r in range(3)]
    assert torch.equal(torch.cat([s[0] for s in shards]), x) and torch.equal(shards[2][1], y[4:])
    with pytest.raises(ValueError, match="not a multiple of the 4 ranks"):
        shard_of((x, y), 0, 4)
    with pytest.raises(ValueError, match="1 per rank with 2 ranks, at least 2 needed"):
        check_shardable(2, 2, "the batch", min_shard=2)


# --------------------------------------------------------------------------- two ranks
@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [0, 2, 3], ids=lambda s: f"zero{s}")
def test_bissl_stage_matches_the_shard_averaged_single_process_stage(two_rank_run, stage):
    results, snap = two_rank_run(stage)
    assert results["nproc"] == 2 and set(results["per_seed"]) == {"0"}
    cfg = _tiny("run.nproc=2", *STAGE_OVERRIDES[stage])
    oracle = _oracle_stage(cfg, snap["pretext"], world=2)
    theta_names = dict(oracle["lower_backbone"].named_parameters())
    moved = max((snap["bissl"]["lower_backbone"][k] - snap["pretext"]["backbone"][k]).abs().max().item()
                for k in theta_names)
    assert moved > 1e-3  # the stage did something the comparison can see
    diff = _max_param_diff(snap["bissl"], oracle)
    # Measured: 2.4e-7 (ZeRO-0, LARS), 6e-8 (ZeRO-2, ZeRO-3) on parameters that moved by 0.49 / 0.097.
    assert diff < 2e-6, f"ZeRO-{stage}: max |Δparam| {diff:.3g} vs the shard-averaged oracle (moved {moved:.3g})"


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [0, 3], ids=lambda s: f"zero{s}")
def test_outputs_are_written_once_and_bookkeeping_is_cleaned(two_rank_run, stage):
    _, snap = two_rank_run(stage)
    assert snap["leftovers"] == []  # no bissl.pt, no engine checkpoints, no job folder left
    parts = [r["part"] for r in snap["rows"] if r["phase"] == "bissl"]
    assert parts == ["warmup"] * 3 + (["lower"] * 2 + ["upper"] * 2) * 2  # each row once
    upper = [r for r in snap["rows"] if r["part"] == "upper"]
    assert all(r["cg_iters"] is not None and r["loss_theta"] is not None for r in upper)


def _single_process_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["phase"] == "bissl"]


@pytest.mark.slow
@needs_deepspeed
def test_one_rank_under_deepspeed_follows_bissl_phase(tmp_path):
    """World size 1 (no sharding): the DeepSpeed phase must reproduce BisslPhase — same schedule,
    warm-up, LARS steps, BatchNorm policy (buffers compared too) and metrics rows."""
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(TINY.read_text().replace("quiet: true}", "quiet: true, num_threads: 1}"))
    log = io.StringIO()
    code = launch(1, ["-m", "bissl.trainer.distributed_run", "--config", str(cfg_path), "--run-dir",
                      str(tmp_path / "zero")], timeout_s=JOB_TIMEOUT_S, stream=log)
    assert code == 0, log.getvalue()[-4000:]
    zero = _snapshot(tmp_path / "zero")
    run_experiment(load_config(cfg_path), tmp_path / "plain")
    plain = _snapshot(tmp_path / "plain")
    # Measured with one thread each: parameters and buffers bit-identical, rows within 1.5e-7
    # relative (the proximal term is summed in another order).
    for part, state in plain["bissl"].items():
        for name, want in state.items():
            got = zero["bissl"][part][name]
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=f"{part}.{name}")
    z_rows, p_rows = _single_process_rows(zero["rows"]), _single_process_rows(plain["rows"])
    assert [r.keys() for r in z_rows] == [r.keys() for r in p_rows] and len(z_rows) == 11
    for zr, pr in zip(z_rows, p_rows):
        for key, want in pr.items():
            if isinstance(want, float):
                assert zr[key] == pytest.approx(want, rel=1e-6, abs=1e-9), (key, zr, pr)
            else:
                assert zr[key] == want, (key, zr, pr)


@pytest.mark.slow
@needs_deepspeed
def test_interrupted_run_resumes_to_the_identical_result(tmp_path, two_rank_run):
    stage = 2  # partitioned optimizer state
    results, reference = two_rank_run(stage)
    # Rank 0's step budget: pretext 4 steps, then BiSSL (3 warm-up, 2 x (2 lower + 2 upper)),
    # checkpoints every 2 steps. First stop: after the last warm-up step (checkpoint at step 2,
    # before the engines exist). Second stop, in the resumed process: rank 0 dies (os._exit, like
    # a kill) after BiSSL step 7, an upper step; the checkpoint at step 6 is under ZeRO.
    with pytest.raises(RunInterrupted, match="stop_after_steps=7"):
        _run(tmp_path, stage, "debug.stop_after_steps=7")
    with pytest.raises(DistributedRunError, match=r"rank 0 \(local rank 0, pid \d+\) failed first: exit code 75"):
        _run(tmp_path, stage, "debug.stop_after_steps=5", "debug.stop_mode=exit")
    ckpts = tmp_path / "run" / "seed_0" / "checkpoints"
    assert load_checkpoint(ckpts / "bissl.pt")["state"]["engine_tag"] == "step6"
    _, resumed = _run(tmp_path, stage)
    snap = _snapshot(tmp_path / "run")
    for part, state in reference["bissl"].items():
        for name, want in state.items():
            assert torch.equal(snap["bissl"][part][name], want), f"{part}.{name}"
    assert snap["rows"] == reference["rows"] and snap["leftovers"] == []
    assert resumed["per_seed"] == results["per_seed"]
