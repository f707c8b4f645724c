"""Which implementation of the fused vector ops runs: the one place that decides.

Backends: ``torch`` (the references in :mod:`bissl.ops.reference`, always available), and the
kernel backends ``triton``, ``cpp`` and ``cuda`` added by the kernels work. ``auto`` picks the
fastest available one for the device; ``BISSL_BACKEND`` overrides ``auto``; an explicitly named
backend that is unavailable raises, an automatic choice falls back to ``torch`` with a one-line
warning.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from bissl.ops import reference as ref

BACKENDS = ("torch",)


@dataclass(frozen=True)
class CGVectorOps:
    """The vector operations a CG iteration needs, as one bundle per backend.

    Attributes:
        name: backend name.
        damped_matvec: ``(hv, v, scale, shift) -> (Av, vᵀAv)``.
        cg_step_: ``(x, r, p, Ap, alpha) -> rᵀr`` (updates x, r in place).
        cg_direction_: ``(p, r, beta) -> p`` (updates p in place).
    """

    name: str
    damped_matvec: Callable[[Tensor, Tensor, float, float], tuple[Tensor, Tensor]]
    cg_step_: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
    cg_direction_: Callable[[Tensor, Tensor, Tensor], Tensor]


TORCH_OPS = CGVectorOps("torch", ref.damped_matvec_ref, ref.cg_step_ref_, ref.cg_direction_ref_)


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Name of the backend that will run on ``device`` for the request ``backend``."""
    requested = backend or os.environ.get("BISSL_BACKEND", "auto")
    if requested == "auto":
        return "torch"
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {('auto',) + BACKENDS}")
    return requested


def cg_vector_ops(backend: str | None, device: torch.device) -> CGVectorOps:
    """The :class:`CGVectorOps` bundle for ``backend`` on ``device``."""
    resolve_backend(backend, device)
    return TORCH_OPS
