"""The optional TensorBoard copy of metrics.csv: same scalars, rebuilt on truncation, off by env."""

from __future__ import annotations

import pytest

from bissl.extras import describe_missing
from bissl.trainer.metrics import TENSORBOARD_DIR, MetricsLog, read_metrics, tensorboard_enabled

pytestmark = pytest.mark.skipif(bool(describe_missing("tensorboard")), reason=describe_missing("tensorboard"))


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _row(step, loss, **kw):
    return {"seed": 0, "phase": "bissl", "part": "upper", "step": step, "loss": loss, **kw}


def test_scalars_mirror_the_csv_and_truncation(tmp_path, monkeypatch):
    monkeypatch.delenv("BISSL_TENSORBOARD", raising=False)
    assert tensorboard_enabled()
    log = MetricsLog(tmp_path / "metrics.csv")
    log.log(_row(1, 0.5, cg_iters=5, cg_converged=True, cg_action="none", lr=0.1))
    offset = log.offset()
    log.log(_row(2, 0.25, cg_iters=5, cg_converged=False, cg_action="fallback:minres", lr=0.1))
    log.offset()
    tags = _scalars(tmp_path / TENSORBOARD_DIR)
    assert tags["bissl/upper/loss"] == [(1, 0.5), (2, 0.25)]
    assert tags["bissl/upper/cg_converged"] == [(1, 1.0), (2, 0.0)]
    assert not any(t.endswith(("/cg_action", "/step", "/seed")) for t in tags)  # text and keys stay out
    log.truncate(offset)  # a resume: step 2 is redone
    log.log(_row(2, 0.125, lr=0.1))
    log.close()
    assert _scalars(tmp_path / TENSORBOARD_DIR)["bissl/upper/loss"] == [(1, 0.5), (2, 0.125)]
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.csv")] == [0.5, 0.125]
    # Reopening an existing CSV (a resumed process) rebuilds the copy from it, without duplicates.
    MetricsLog(tmp_path / "metrics.csv").close()
    assert _scalars(tmp_path / TENSORBOARD_DIR)["bissl/upper/loss"] == [(1, 0.5), (2, 0.125)]


def test_environment_switches_it_off(tmp_path, monkeypatch):
    monkeypatch.setenv("BISSL_TENSORBOARD", "0")
    assert not tensorboard_enabled()
    log = MetricsLog(tmp_path / "metrics.csv")
    log.log(_row(1, 0.5))
    log.close()
    assert not (tmp_path / TENSORBOARD_DIR).exists()
