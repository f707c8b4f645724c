"""Rank program for the launcher's tests: rank 1 dies, raises or hangs; rank 0 waits in a
collective (so without the launcher's handling it would hang). Each rank writes its pid. Mode
``bar``: rank 0 redraws a progress line on stderr with carriage returns, then succeeds."""

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
    t = torch.ones(4)
    dist.all_reduce(t)  # rank 0 blocks here while rank 1 is gone
    exit_rank(0)


if __name__ == "__main__":
    main()
