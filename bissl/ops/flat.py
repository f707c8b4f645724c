"""Parameter dicts, tuples and flat tensors <-> one flat buffer.

Solvers keep their state (x, r, p, Ap) in one contiguous ``(P,)`` buffer per dtype/device so a
vector update is one pass over all parameters instead of one launch per tensor. ``unflatten``
returns *views* of the buffer (zero-copy); ``flatten`` copies once (``torch.cat``) unless the dict
already consists of views of one buffer laid out in order, in which case it returns that buffer.

A vector reaches the library in one of three *forms* (:data:`FORMS`): a ``{name: Tensor}`` dict
(the ``torch.func`` convention), a tuple or list of tensors (``torch.autograd.grad``'s), or one
flat ``(P,)`` tensor. :func:`vector_spec` describes any of them as a :class:`FlatSpec` (a sequence's
names are ``"0"``, ``"1"``, ...; a flat tensor is one piece), :func:`as_form` gives zero-copy views
of a flat buffer in a form, and :func:`pieces` reads a vector of any form back as the flat pieces
of a spec, in order, without copying.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from bissl.typing import Params, ParamsLike, Vector

#: The forms a vector may take: ``"dict"``, ``"tuple"``, ``"list"`` (of tensors) or ``"flat"`` ((P,) tensor).
Form = Literal["dict", "tuple", "list", "flat"]
FORMS: tuple[str, ...] = ("dict", "tuple", "list", "flat")
#: A vector in any form (:data:`bissl.typing.Vector`).
AnyVector = Vector


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
        for param, a, b in zip(params.values(), spec.offsets[:-1], spec.offsets[1:]):
            view = buffer[a:b].view(param.shape)
            view.copy_(param)
            param.data = view
    return buffer, spec


def vector_form(v: object, where: str) -> str:
    """The :data:`FORMS` entry of ``v``; raises ``TypeError`` naming ``where`` for anything else."""
    if isinstance(v, Tensor):
        return "flat"
    if isinstance(v, Mapping):
        return "dict"
    if isinstance(v, (tuple, list)) and all(isinstance(t, Tensor) for t in v):
        return "tuple" if isinstance(v, tuple) else "list"
    raise TypeError(
        f"{where}: expected a dict of tensors, a tuple/list of tensors or a flat tensor, got {type(v).__name__}"
    )


def vector_spec(v: AnyVector, where: str) -> tuple[str, FlatSpec]:
    """``(form, spec)`` of a vector in any form (one dtype/device; a flat tensor must be 1-D).

    Raises:
        TypeError: not a vector form, or not floating point.
        ValueError: empty, mixed dtype/device, or a tensor of a flat form that is not 1-D.
    """
    form = vector_form(v, where)
    if isinstance(v, Tensor):  # form "flat"
        if v.dim() != 1:
            raise ValueError(
                f"{where}: a tensor must be flat (P,), got shape {tuple(v.shape)}; pass a "
                "dict or a tuple of tensors for shaped parameters"
            )
        spec = FlatSpec(("",), (v.shape,), (0, v.numel()), v.dtype, v.device)
    else:
        named = v if isinstance(v, Mapping) else {str(i): t for i, t in enumerate(v)}
        try:
            spec = flat_spec(named)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    if not spec.dtype.is_floating_point:
        raise TypeError(f"{where}: vectors must be floating point, got {spec.dtype}")
    return form, spec


def as_form(flat: Tensor, spec: FlatSpec, form: str) -> AnyVector:
    """Zero-copy views of the ``(P,)`` buffer ``flat`` in ``form`` (the inverse of :func:`pieces`)."""
    if form == "flat":
        return flat
    views = unflatten(flat, spec)
    if form == "dict":
        return views
    seq = list(views.values())
    return tuple(seq) if form == "tuple" else seq


def pieces(v: AnyVector, spec: FlatSpec, where: str, form: str = "dict") -> list[Tensor]:
    """``v`` (any form) as 1-D tensors whose concatenation is the ``(P,)`` vector of ``spec``.

    ``form`` is the form ``spec`` describes. Nothing is copied: a flat ``v`` is one piece; a dict or
    a sequence gives one ``reshape(-1)`` per tensor (a view when contiguous). A dict is looked up by
    ``spec``'s names when ``form`` is ``"dict"`` (its order does not matter) and read in its own
    order otherwise; shapes must match ``spec``'s, except for a ``"flat"`` spec, whose pieces only
    need to add up to ``P`` elements. Raises ``ValueError`` naming ``where`` on any mismatch.
    """
    if isinstance(v, Tensor):
        if v.dim() != 1 or v.numel() != spec.numel:
            raise ValueError(
                f"{where} returned a tensor of shape {tuple(v.shape)}, expected a flat "
                f"({spec.numel},) tensor or the form of its input"
            )
        if v.dtype != spec.dtype or v.device != spec.device:
            raise ValueError(f"{where} returned {v.dtype} on {v.device}, expected {spec.dtype} on {spec.device}")
        return [v]
    if isinstance(v, Mapping):
        if form == "dict":
            if len(v) != len(spec.names) or any(n not in v for n in spec.names):
                missing = [n for n in spec.names if n not in v][:3]
                raise ValueError(
                    f"{where} returned a dict with keys {list(v)[:4]}...; expected the keys "
                    f"{list(spec.names)[:4]}... (missing {missing})"
                )
            names, tensors = list(spec.names), [v[n] for n in spec.names]
        else:
            names, tensors = [str(k) for k in v], list(v.values())
    elif isinstance(v, (tuple, list)):
        names, tensors = [str(i) for i in range(len(v))], list(v)
    else:
        raise ValueError(
            f"{where} returned {type(v).__name__}; expected a dict, a tuple/list of tensors or a flat tensor"
        )
    shapes: Sequence = spec.shapes
    if form == "flat":
        shapes = [t.shape if isinstance(t, Tensor) else None for t in tensors]
        total = sum(t.numel() for t in tensors if isinstance(t, Tensor))
        if total != spec.numel:
            raise ValueError(
                f"{where} returned {len(tensors)} tensors of {total} elements in all, expected {spec.numel}"
            )
    elif len(tensors) != len(spec.names):
        raise ValueError(f"{where} returned {len(tensors)} tensors, expected {len(spec.names)}")
    out = []
    for name, shape, t in zip(names, shapes, tensors):
        if not isinstance(t, Tensor) or t.shape != shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{where} returned {got} for {name!r}, expected shape {tuple(shape)}")
        if t.dtype != spec.dtype or t.device != spec.device:
            raise ValueError(
                f"{where} returned {t.dtype} on {t.device} for {name!r}, expected {spec.dtype} on {spec.device}"
            )
        out.append(t.reshape(-1))
    return out


def one_buffer(parts: Sequence[Tensor]) -> Tensor | None:
    """The ``(P,)`` tensor that 1-D ``parts`` are consecutive pieces of, if they are (else None).

    Lets a solver treat a matvec result that is already views of one buffer (e.g. a dict made by
    :func:`unflatten`) as flat, without copying it.
    """
    if len(parts) == 1:
        return parts[0] if parts[0].is_contiguous() else None
    filled = [t for t in parts if t.numel()]  # an empty piece occupies no bytes anywhere
    if not filled:
        return None
    first = filled[0]
    storage, start = first.untyped_storage(), first.storage_offset()
    offset = start
    for t in filled:
        if (
            not t.is_contiguous()
            or t.untyped_storage().data_ptr() != storage.data_ptr()
            or t.storage_offset() != offset
        ):
            return None
        offset += t.numel()
    total = offset - start
    flat = torch.empty(0, dtype=first.dtype, device=first.device)
    return flat.set_(storage, start, (total,), (1,))
