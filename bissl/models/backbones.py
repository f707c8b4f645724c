"""``build_backbone(name, in_channels=..., **kwargs)``: every backbone by name."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from bissl.models.resnet import resnet18, resnet50
from bissl.models.small_cnn import SmallCNN

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "small_cnn": SmallCNN,
}
#: Names accepted by :func:`build_backbone`.
BACKBONES: tuple[str, ...] = tuple(sorted(_BUILDERS))


def build_backbone(name: str, *, in_channels: int, **kwargs: Any) -> nn.Module:
    """Build a feature extractor ``(B, C, H, W) -> (B, out_dim)`` with attribute ``out_dim``.

    Args:
        name: ``"small_cnn"`` (kwargs: ``width``), ``"resnet18"`` or ``"resnet50"`` (kwargs:
            ``small_input``, ``zero_init_residual``).
        in_channels: ``C`` of the input images.

    Raises:
        ValueError: unknown name (the message lists valid names) or a keyword the backbone does
            not take.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    builder = _BUILDERS[name]
    accepted = set(inspect.signature(builder).parameters) - {"in_channels"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"backbone {name!r} got unknown options {unknown}; it accepts {sorted(accepted)}"
        )
    return builder(in_channels=in_channels, **kwargs)
