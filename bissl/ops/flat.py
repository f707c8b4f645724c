"""Parameter dicts <-> one flat buffer.

Solvers keep their state (x, r, p, Ap) in one contiguous ``(P,)`` buffer per dtype/device so a
vector update is one pass over all parameters instead of one launch per tensor. ``unflatten``
returns *views* of the buffer (zero-copy); ``flatten`` copies once (``torch.cat``) unless the dict
already consists of views of one buffer laid out in order, in which case it returns that buffer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bissl.typing import ParamsLike, Params


@dataclass(frozen=True)
class FlatSpec:
    """Layout of a parameter dict inside a flat buffer.

    Attributes:
        names: keys in buffer order.
        shapes: shape of each tensor.
        offsets: start of each tensor in the buffer; ``offsets[i + 1] - offsets[i] == numel_i``.
        dtype, device: of the buffer (all tensors must agree).
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def numel(self) -> int:
        """Total number of scalars P."""
        return self.offsets[-1]

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.offsets[:-1], self.offsets[1:]))

    def segment_ids(self) -> Tensor:
        """``(P,)`` int64 tensor: index of the parameter tensor each scalar belongs to."""
        counts = torch.tensor(self.numels, device=self.device)
        return torch.repeat_interleave(torch.arange(len(self.names), device=self.device), counts)


def flat_spec(params: ParamsLike) -> FlatSpec:
    """Describe how ``params`` is laid out in a flat buffer (dict order).

    Raises:
        ValueError: empty dict, or tensors of mixed dtype/device (one buffer per dtype/device).
    """
    if len(params) == 0:
        raise ValueError("flat_spec: the parameter dict is empty")
    tensors = list(params.values())
    dtype, device = tensors[0].dtype, tensors[0].device
    for name, t in params.items():
        if t.dtype != dtype or t.device != device:
            raise ValueError(
                f"flat_spec: parameter {name!r} is {t.dtype} on {t.device}, but the first is "
                f"{dtype} on {device}; one flat buffer holds a single dtype/device"
            )
    offsets = [0]
    for t in tensors:
        offsets.append(offsets[-1] + t.numel())
    return FlatSpec(tuple(params.keys()), tuple(t.shape for t in tensors), tuple(offsets), dtype, device)


def _views_of_one_buffer(params: ParamsLike, spec: FlatSpec) -> Tensor | None:
    """The buffer that ``params`` are in-order contiguous views of, if they are; else None."""
    tensors = list(params.values())
    first = tensors[0]
    if not all(t.is_contiguous() for t in tensors):
        return None
    base = first._base if first._base is not None else first
    if base.dim() != 1 or base.numel() != spec.numel or not base.is_contiguous():
        return None
    start = base.data_ptr()
    item = base.element_size()
    for t, off in zip(tensors, spec.offsets[:-1]):
        if t.numel() and (t.data_ptr() != start + off * item or (t._base is not None and t._base is not base)):
            return None
    return base


def flatten(params: ParamsLike, spec: FlatSpec | None = None) -> Tensor:
    """Concatenate ``params`` into a ``(P,)`` tensor (zero-copy if already views of one buffer).

    Autograd flows through the copy (``torch.cat``), so this is safe inside differentiated code.
    """
    spec = spec or flat_spec(params)
    if tuple(params.keys()) != spec.names:
        raise ValueError(f"flatten: keys {list(params)[:4]}... do not match the spec's {list(spec.names)[:4]}...")
    if not any(t.requires_grad for t in params.values()):
        base = _views_of_one_buffer(params, spec)
        if base is None:
            base, _ = _one_storage_view(params, spec)
        if base is not None:
            return base
    return torch.cat([t.reshape(-1) for t in params.values()])


def unflatten(flat: Tensor, spec: FlatSpec) -> Params:
    """Split a ``(P,)`` tensor into a dict of views shaped like ``spec`` (zero-copy)."""
    if flat.dim() != 1 or flat.numel() != spec.numel:
        raise ValueError(f"unflatten: expected a flat tensor of {spec.numel} elements, got shape {tuple(flat.shape)}")
    return {
        name: flat[a:b].view(shape)
        for name, shape, a, b in zip(spec.names, spec.shapes, spec.offsets[:-1], spec.offsets[1:])
    }


def _one_storage_view(params: ParamsLike, spec: FlatSpec) -> tuple[Tensor | None, str]:
    """``(P,)`` tensor aliasing the storage ``params`` live in back to back, or (None, why not).

    Unlike :func:`_views_of_one_buffer` this needs no autograd ``_base`` link, so it also finds
    parameters re-pointed by :func:`flatten_module_parameters_` and their ``.detach()``-ed copies.
    """
    tensors = list(params.values())
    first = tensors[0]
    storage = first.untyped_storage()
    start = first.storage_offset()
    for name, t, off in zip(spec.names, tensors, spec.offsets[:-1]):
        if t.numel() == 0:
            continue  # an empty tensor occupies no bytes; its storage is irrelevant
        if not t.is_contiguous():
            return None, f"{name!r} is not contiguous, so it is not a piece of a flat buffer"
        if t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != start + off:
            return None, (
                f"{name!r} is not at offset {off} of the buffer that {spec.names[0]!r} starts; the "
                "tensors are not views of one flat buffer (use flatten() to copy them into one)"
            )
    flat = torch.empty(0, dtype=spec.dtype, device=spec.device)
    return flat.set_(storage, start, (spec.numel,), (1,)), ""


def flat_view(params: ParamsLike, spec: FlatSpec | None = None) -> Tensor:
    """The ``(P,)`` buffer that ``params`` already live in, in order, without copying.

    Unlike :func:`flatten` this never copies and never tracks autograd: the result aliases the
    tensors' storage (``result.data_ptr() == first.data_ptr()``), so writing into it writes the
    parameters. Use it for the parameters of a module prepared by
    :func:`flatten_module_parameters_` (they ``require_grad``, where :func:`flatten` copies).

    Raises:
        ValueError: keys differ from ``spec``, or the tensors are not contiguous, in-order,
            back-to-back pieces of one storage.
    """
    spec = spec or flat_spec(params)
    if tuple(params.keys()) != spec.names:
        raise ValueError(f"flat_view: keys {list(params)[:4]}... do not match the spec's {list(spec.names)[:4]}...")
    flat, why_not = _one_storage_view(params, spec)
    if flat is None:
        raise ValueError(f"flat_view: {why_not}")
    return flat


def flatten_module_parameters_(module: torch.nn.Module) -> tuple[Tensor, FlatSpec]:
    """Move every parameter of ``module`` into one flat buffer, in place; return ``(buffer, spec)``.

    Each (de-duplicated: tied weights stay tied) parameter keeps its identity — optimizers and
    hooks that hold it still work — but its data becomes the view ``buffer[a:b].view(shape)``
    (``param.data`` is re-pointed), so ``flat_view(dict(module.named_parameters()), spec)`` and
    ``unflatten(buffer, spec)`` convert between the two forms without copying. Parameters become
    contiguous in the default memory format (a ``channels_last`` weight is copied to the standard
    layout). Gradients are unaffected: ``.grad`` tensors stay separate.

    Args:
        module: parameters of one dtype and device (one flat buffer per dtype/device).

    Returns:
        ``buffer``: ``(P,)`` tensor without ``requires_grad``; ``spec``: layout in
        ``module.named_parameters()`` order.

    Raises:
        ValueError: no parameters, or parameters of mixed dtype/device.
    """
    params = dict(module.named_parameters())
    if not params:
        raise ValueError(f"flatten_module_parameters_: {type(module).__name__} has no parameters")
    spec = flat_spec(params)
    buffer = torch.empty(spec.numel, dtype=spec.dtype, device=spec.device)
    with torch.no_grad():
        for (name, param), a, b in zip(params.items(), spec.offsets[:-1], spec.offsets[1:]):
            view = buffer[a:b].view(param.shape)
            view.copy_(param)
            param.data = view
    return buffer, spec
