"""Start an N-process job on this machine with torchrun, bound to 127.0.0.1.

:func:`launch` runs ``python -m torch.distributed.run`` (torchrun) with a fresh port on the loopback
interface and no restarts, streams its output, and returns its exit code. When a rank dies,
torchrun stops the other ranks (they would otherwise wait in a collective) and exits non-zero; we
then print one line naming the rank that failed first and how, taken from torchrun's
"Root Cause" report. A wall-clock ``timeout_s`` bounds the whole job (exit code 124).

CPU specifics: ``DS_ACCELERATOR=cpu`` (DeepSpeed would otherwise probe for accelerators) and
``OMP_NUM_THREADS = cores // nproc`` unless already set, so ranks do not oversubscribe the cores.
"""

from __future__ import annotations

import codecs
import io
import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Protocol, cast

import torch

from bissl.distributed.process_group import LOOPBACK, free_port

#: Exit code of :func:`launch` when the job ran past ``timeout_s`` (as GNU ``timeout``).
TIMEOUT_EXIT_CODE = 124
_ROOT_CAUSE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)")
_EXITCODE = re.compile(r"exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)")


class TextSink(Protocol):
    """What :func:`launch` writes its output to: a text stream, or anything with these two."""

    def write(self, text: str, /) -> object: ...

    def flush(self) -> object: ...


def torchrun_command(nproc: int, argv: Sequence[str], *, master_port: int) -> list[str]:
    """The torchrun command line for ``nproc`` local ranks running ``argv``.

    ``argv`` is what follows ``python``: ``["script.py", ...]`` or ``["-m", "package", ...]``.
    """
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ValueError(f"launch: nproc must be a positive int, got {nproc!r}")
    argv = list(argv)
    if not argv or (argv[0] == "-m" and len(argv) < 2):
        raise ValueError("launch: argv must name a script or '-m module' to run")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--nnodes=1",
        f"--master-addr={LOOPBACK}",
        f"--master-port={master_port}",
        "--max-restarts=0",
        "--monitor-interval=0.2",
    ]
    return cmd + argv  # torchrun's own "-m" flag has python's meaning


def launch_env(nproc: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the ranks: ``base`` (default: ours) plus CPU defaults (see module doc)."""
    env = dict(os.environ if base is None else base)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def failure_summary(log_tail: Sequence[str]) -> str | None:
    """``"rank R (local rank L, pid P) failed first: killed by SIGKILL"`` from torchrun's report."""
    text = "\n".join(log_tail)
    start = text.rfind("Root Cause")
    if start < 0:
        return None
    block = text[start:]
    who, how = _ROOT_CAUSE.search(block), _EXITCODE.search(block)
    if who is None or how is None:
        return None
    return (
        f"rank {who.group(1)} (local rank {who.group(2)}, pid {how.group(2)}) failed first: "
        f"{_describe_exit(int(how.group(1)))}"
    )


def launch(
    nproc: int,
    argv: Sequence[str],
    *,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
    master_port: int | None = None,
    stream: TextSink | None = None,
) -> int:
    """Run ``argv`` on ``nproc`` local ranks (torchrun, 127.0.0.1) and return the exit code.

    Args:
        nproc: number of processes (ranks).
        argv: ``["script.py", args...]`` or ``["-m", "module", args...]``.
        timeout_s: kill the whole job after this many seconds and return 124 (default: no limit).
        env: environment for the ranks (default: this process's), completed by :func:`launch_env`.
        master_port: rendezvous port (default: a free one).
        stream: where torchrun's and the ranks' stderr goes (default: ``sys.stderr``); stdout is
            inherited.

    Returns:
        0 on success; torchrun's non-zero code when a rank failed (a one-line summary naming that
        rank is written to ``stream``); 124 on timeout.

    Example:
        >>> code = launch(2, ["-m", "bissl", "run", "configs/demo.yaml"])
    """
    stream = stream or sys.stderr
    port = master_port if master_port is not None else free_port()
    cmd = torchrun_command(nproc, argv, master_port=port)
    proc = subprocess.Popen(cmd, env=launch_env(nproc, env), stderr=subprocess.PIPE, start_new_session=True)
    tail: deque[str] = deque(maxlen=400)
    # A buffered pipe (Popen's default), which has read1; the stubs type it only as IO[bytes].
    err_pipe = cast("io.BufferedReader | None", proc.stderr)

    def pump() -> None:
        # Raw chunks, not lines: a progress bar redraws its line with "\r" and no newline, which
        # line iteration would hold back (or, in text mode, turn into a new line per redraw).
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            chunk = err_pipe.read1(1 << 16) if err_pipe is not None else b""
            text = decoder.decode(chunk, final=not chunk)
            if text:
                stream.write(text)
                stream.flush()
                *lines, pending = (pending + text).split("\n")
                tail.extend(lines)
                pending = pending[-4096:]  # a line without end (a bar) must not grow forever
            if not chunk:
                break
        if pending:
            tail.append(pending)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_job(proc)
        reader.join(timeout=5)
        stream.write(f"bissl launch: the {nproc}-process job ran past {timeout_s:g} s and was killed\n")
        stream.flush()
        return TIMEOUT_EXIT_CODE
    except BaseException:
        _kill_job(proc)  # e.g. KeyboardInterrupt: never leave orphaned ranks behind
        raise
    reader.join(timeout=5)
    if code != 0:
        who = failure_summary(list(tail)) or "see the first traceback above"
        stream.write(
            f"bissl launch: the {nproc}-process job failed ({_describe_exit(code)} from "
            f"torchrun): {who}; the other ranks were stopped\n"
        )
        stream.flush()
    return code


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun's process group (it forwards to the ranks), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
