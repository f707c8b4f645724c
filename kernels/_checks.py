"""Input validation shared by the Python faces of the fused ops (no triton needed).

The native kernels (``csrc/``) validate the same contract with ``TORCH_CHECK``: flat ``(P,)``
vectors, contiguous, one floating dtype (float32 or float64) and one device, equal lengths;
step sizes as one-element floating tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_flat_vectors(op: str, backend: str, **vectors: Tensor) -> Tensor:
    """Validate the vector arguments of ``op``; return the first one (the layout reference).

    Raises:
        TypeError: a non-tensor or an unsupported dtype.
        ValueError: not 1-D, non-contiguous, or mismatched length/dtype/device.
    """
    where = f"bissl.{op} ({backend})"
    ref_name, ref_t = None, None
    for name, t in vectors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(
                f"{where}: {name} must be a flat (P,) tensor, got shape {tuple(t.shape)}"
            )
        if not t.is_contiguous():
            raise ValueError(
                f"{where}: {name} is not contiguous (stride {t.stride()}); the fused ops work on "
                f"flat "
                f"buffers, pass {name}.contiguous() or a bissl.ops.flat buffer"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{where}: {name} has dtype {t.dtype}; supported: float32, float64")
        if ref_t is None:
            ref_name, ref_t = name, t
            continue
        if t.numel() != ref_t.numel():
            raise ValueError(
                f"{where}: {name} has {t.numel()} elements but {ref_name} has {ref_t.numel()}"
            )
        if t.dtype != ref_t.dtype:
            raise ValueError(f"{where}: {name} is {t.dtype} but {ref_name} is {ref_t.dtype}")
        if t.device != ref_t.device:
            raise ValueError(
                f"{where}: {name} is on {t.device} but {ref_name} is on {ref_t.device}"
            )
    if ref_t is None:
        raise ValueError(f"{where}: no vectors given")
    return ref_t


def check_step_size(op: str, backend: str, name: str, value: Tensor, like: Tensor) -> None:
    """Validate a step size: one floating element, on the vectors' device or on the CPU."""
    where = f"bissl.{op} ({backend})"
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{where}: {name} must be a 0-dim tensor (it stays on the device, no host sync), "
            f"got {type(value).__name__}"
        )
    if value.numel() != 1:
        raise ValueError(f"{where}: {name} must have one element, got shape {tuple(value.shape)}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{where}: {name} must be floating point, got {value.dtype}")
    if value.device != like.device and value.device.type != "cpu":
        raise ValueError(
            f"{where}: {name} is on {value.device} but the vectors are on {like.device}"
        )
