"""``build_backbone(name, in_channels=..., **kwargs)``: every backbone by name.

Image backbones take ``in_channels``; the text backbone ``"gpt"`` takes ``vocab_size`` and
``max_len`` instead (``in_channels`` must then be left out).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from bissl.models.gpt import GPT
from bissl.models.resnet import resnet18, resnet50
from bissl.models.small_cnn import SmallCNN

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "gpt": GPT,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "small_cnn": SmallCNN,
}
#: Text backbones (token ids in) accepted by :func:`build_backbone`.
TEXT_BACKBONES: tuple[str, ...] = ("gpt",)
#: Image backbones accepted by :func:`build_backbone`.
BACKBONES: tuple[str, ...] = tuple(sorted(set(_BUILDERS) - set(TEXT_BACKBONES)))


def build_backbone(name: str, *, in_channels: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a feature extractor ``(B, C, H, W) -> (B, out_dim)`` with attribute ``out_dim``.

    Args:
        name: ``"small_cnn"`` (kwargs: ``width``), ``"resnet18"`` or ``"resnet50"`` (kwargs:
            ``small_input``, ``zero_init_residual``), or ``"gpt"`` (token ids ``(B, T) -> (B, D)``;
            kwargs: ``vocab_size``, ``max_len``, ``pad_id``, ``dim``, ``depth``, ``heads``,
            ``mlp_ratio``, ``attention``, ``checkpoint``; see :class:`bissl.models.GPT`).
        in_channels: ``C`` of the input images (image backbones only).

    Raises:
        ValueError: unknown name (the message lists valid names) or a keyword the backbone does
            not take.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(sorted(BACKBONES + TEXT_BACKBONES))}")
    builder = _BUILDERS[name]
    params = set(inspect.signature(builder).parameters)
    accepted = params - {"in_channels"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"backbone {name!r} got unknown options {unknown}; it accepts {sorted(accepted)}")
    if "in_channels" not in params:
        if in_channels is not None:
            raise ValueError(f"backbone {name!r} takes token ids, not images with in_channels")
        return builder(**kwargs)
    if in_channels is None:
        raise ValueError(f"backbone {name!r} needs in_channels")
    return builder(in_channels=in_channels, **kwargs)
