"""The torchrun launcher: a rank that dies, raises or hangs ends the job with a clear message and a
non-zero exit code instead of hanging; no rank survives the job."""

from __future__ import annotations

import os
import time

import pytest
from _dist_launch import run_ranks

from bissl.distributed.launcher import TIMEOUT_EXIT_CODE, failure_summary, torchrun_command


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _pids(out) -> list[int]:
    return [int((out / f"pid{r}").read_text()) for r in range(2) if (out / f"pid{r}").exists()]


def test_torchrun_command_binds_loopback_without_restarts():
    cmd = torchrun_command(2, ["-m", "bissl", "run", "c.yaml"], master_port=29999)
    assert "--master-addr=127.0.0.1" in cmd and "--max-restarts=0" in cmd
    assert "--nproc-per-node=2" in cmd and cmd[-4:] == ["-m", "bissl", "run", "c.yaml"]
    with pytest.raises(ValueError, match="nproc"):
        torchrun_command(0, ["x.py"], master_port=1)
    with pytest.raises(ValueError, match="argv"):
        torchrun_command(2, ["-m"], master_port=1)


def test_failure_summary_without_report_is_none():
    assert failure_summary(["Traceback (most recent call last):", "ValueError: x"]) is None


@pytest.mark.slow
def test_killed_rank_fails_the_job_fast_and_names_the_rank(tmp_path):
    start = time.monotonic()
    code, log = run_ranks("failing_worker.py", "--mode", "kill", "--out", str(tmp_path), timeout_s=90)
    elapsed = time.monotonic() - start
    assert code not in (0, TIMEOUT_EXIT_CODE), log[-3000:]
    assert elapsed < 60  # rank 0 was blocked in all_reduce: torchrun stopped it, no hang
    assert "rank 1 (local rank 1" in log and "killed by SIGKILL" in log, log[-3000:]
    assert not any(_alive(p) for p in _pids(tmp_path))


@pytest.mark.slow
def test_raising_rank_fails_the_job_with_its_traceback(tmp_path):
    code, log = run_ranks("failing_worker.py", "--mode", "raise", "--out", str(tmp_path), timeout_s=90)
    assert code not in (0, TIMEOUT_EXIT_CODE)
    assert "ValueError: rank 1 failed on purpose" in log
    assert "rank 1 (local rank 1" in log and "exit code 1" in log, log[-3000:]
    assert not any(_alive(p) for p in _pids(tmp_path))


@pytest.mark.slow
def test_hanging_rank_is_killed_at_the_timeout(tmp_path):
    start = time.monotonic()
    code, log = run_ranks("failing_worker.py", "--mode", "hang", "--out", str(tmp_path), timeout_s=12)
    assert code == TIMEOUT_EXIT_CODE
    assert time.monotonic() - start < 40
    assert "ran past 12 s" in log
    pids = _pids(tmp_path)
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


@pytest.mark.slow
def test_healthy_job_exits_zero(tmp_path):
    code, log = run_ranks("failing_worker.py", "--mode", "ok", "--out", str(tmp_path), timeout_s=90)
    assert code == 0, log[-3000:]
    assert len(_pids(tmp_path)) == 2


@pytest.mark.slow
def test_output_reaches_the_caller_unchanged(tmp_path):
    """A progress bar redraws its line with carriage returns: the launcher must pass them on as
    written (not one line per redraw, not held back until a newline)."""
    code, log = run_ranks("failing_worker.py", "--mode", "bar", "--out", str(tmp_path), timeout_s=90)
    assert code == 0, log[-3000:]
    assert "\rprogress 0/3\rprogress 1/3\rprogress 2/3\n" in log
