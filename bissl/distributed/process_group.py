"""Process-group set-up for data-parallel BiSSL: one process per device, torchrun's environment.

The launcher (:func:`bissl.distributed.launch` or ``torchrun``) exports ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_process_group_from_env` reads
them and picks the backend from the device: NCCL when CUDA is available (one GPU per local rank),
gloo otherwise. Without those variables it starts a one-process group on 127.0.0.1, so the same
code runs unlaunched (DeepSpeed always wants a process group).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

#: The launcher always binds the rendezvous to the loopback interface (single node).
LOOPBACK = "127.0.0.1"
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits. ``device`` is the one it computes on (``cuda:LOCAL_RANK`` or cpu)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_backend() -> str:
    """``"nccl"`` when CUDA is available, else ``"gloo"``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _int_env(key: str) -> int:
    value = os.environ[key]
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {key}={value!r} is not an integer") from None


def dist_info() -> DistInfo:
    """The :class:`DistInfo` of the initialised default group (raises if there is none)."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; call init_process_group_from_env() first")
    backend = dist.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


def init_process_group_from_env(*, backend: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group from torchrun's environment (idempotent).

    Args:
        backend: ``"gloo"`` or ``"nccl"`` (default: :func:`default_backend`).
        timeout_s: how long a collective may wait for a missing peer before raising (default 600).
            A rank that *dies* is noticed by the launcher much sooner; this bounds a rank that hangs.

    Returns:
        :class:`DistInfo`. Without launcher variables: a one-process group on 127.0.0.1.

    Raises:
        RuntimeError: only some of the launcher variables are set, or a value is not an integer.
        ValueError: unknown backend, or NCCL without CUDA.
    """
    if dist.is_initialized():
        return dist_info()
    present = [k for k in _ENV_KEYS if k in os.environ]
    if not present:
        os.environ.update(
            {
                "RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": LOOPBACK,
                "MASTER_PORT": str(free_port()),
            }
        )
    elif len(present) != len(_ENV_KEYS):
        missing = sorted(set(_ENV_KEYS) - set(present))
        raise RuntimeError(
            f"incomplete launcher environment: {missing} not set (start with "
            "bissl.distributed.launch or torchrun, or set none of them)"
        )
    rank, world, local_rank = _int_env("RANK"), _int_env("WORLD_SIZE"), _int_env("LOCAL_RANK")
    backend = backend or default_backend()
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA; use 'gloo' on CPU")
        torch.cuda.set_device(local_rank)
    if backend == "gloo" and sys.platform == "linux" and os.environ["MASTER_ADDR"] in (LOOPBACK, "localhost"):
        # gloo otherwise picks the interface its hostname resolves to, which inside containers can
        # be unreachable; a single-node job only needs loopback.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        backend, init_method="env://", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )
    return dist_info()


def shutdown() -> None:
    """Barrier, then destroy the default group.

    Exiting with a live gloo group can abort the process ("terminate called without an active
    exception", measured on 1 of 4 two-rank DeepSpeed runs here), which the launcher then reports
    as a failed rank; a clean tear-down avoids that.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_rank(code: int = 0) -> None:
    """End a rank process: :func:`shutdown`, flush, then ``os._exit(code)``.

    DeepSpeed keeps references to its process groups (engines, ZeRO-3 parameters, module globals)
    that outlive ``destroy_process_group``; their gloo threads then still run while the interpreter
    tears down, which intermittently aborts the process ("terminate called without an active
    exception"; seen on 2 of ~20 two-rank runs here) and turns a finished run into a failed rank.
    Skipping interpreter teardown after a clean shutdown avoids that. Call it last, on every rank.
    """
    import logging

    shutdown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
