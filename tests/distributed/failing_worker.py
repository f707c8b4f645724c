"""Rank program for the launcher's tests: rank 1 dies, raises or hangs; rank 0 waits (so without
the launcher's handling the job would hang). Each rank writes its pid. Mode ``bar``: rank 0
redraws a progress line on stderr with carriage returns, then succeeds.

When rank 1 dies or raises, rank 0 waits by sleeping, not in a collective: a gloo collective
fails as soon as its peer's socket closes, so rank 0 would exit with an error of its own and
which rank torchrun reports as failing first would be a race (seen once in ``make test``)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bissl.distributed import exit_rank, init_process_group_from_env


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("kill", "raise", "hang", "ok", "bar"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    info = init_process_group_from_env(timeout_s=300)
    (args.out / f"pid{info.rank}").write_text(str(os.getpid()))
    dist.barrier()
    if info.rank == 1:
        if args.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if args.mode == "raise":
            raise ValueError("rank 1 failed on purpose")
        if args.mode == "hang":
            time.sleep(3600)
    if info.rank == 0 and args.mode == "bar":
        for i in range(3):
            sys.stderr.write(f"\rprogress {i}/3")
            sys.stderr.flush()
        sys.stderr.write("\n")
    if args.mode in ("kill", "raise"):
        time.sleep(3600)  # rank 0: stopped by the launcher once rank 1 is gone
    t = torch.ones(4)
    dist.all_reduce(t)  # rank 0 blocks here while rank 1 hangs
    exit_rank(0)


if __name__ == "__main__":
    main()
