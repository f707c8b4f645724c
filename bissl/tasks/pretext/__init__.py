"""Pretext (self-supervised) tasks: ``build_pretext(name, backbone=..., feat_dim=...)``.

Every pretext module exposes ``loss(encode, *views) -> scalar`` (``encode`` maps images to
backbone features, e.g. ``lambda x: torch.func.functional_call(backbone, theta, (x,))``; SimCLR
and BYOL take two views, GPT one batch of token rows and calls ``encode(tokens,
return_sequence=True)``),
``update_target(backbone_params, momentum=None)`` and ``reset_target(backbone)`` (no-ops for
SimCLR) and ``online_parameters()`` (the trainable head parameters).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from bissl.tasks.pretext.byol import BYOL, byol_loss
from bissl.tasks.pretext.gpt import GPTPretext, next_token_loss
from bissl.tasks.pretext.heads import mlp_head
from bissl.tasks.pretext.simclr import SimCLR, nt_xent, nt_xent_across_ranks

_CLASSES: dict[str, type[nn.Module]] = {"byol": BYOL, "gpt": GPTPretext, "simclr": SimCLR}
#: Names accepted by :func:`build_pretext`.
PRETEXTS: tuple[str, ...] = tuple(sorted(_CLASSES))


def build_pretext(name: str, *, backbone: nn.Module, feat_dim: int, **kwargs: Any) -> nn.Module:
    """Build a pretext task by name.

    Args:
        name: ``"simclr"`` (kwargs: ``proj_dims``, ``temperature``, ``gather_negatives``),
            ``"byol"`` (kwargs:
            ``proj_dims``, ``pred_hidden``, ``momentum``) or ``"gpt"`` (kwargs: ``vocab_size``,
            ``pad_id``).
        backbone: the online backbone (BYOL copies it into its target; SimCLR and GPT ignore it).
        feat_dim: backbone output features (``backbone.out_dim``).

    Raises:
        ValueError: unknown name (the message lists valid names) or an option the task lacks.
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown pretext task {name!r}; valid names: {', '.join(PRETEXTS)}")
    accepted = set(inspect.signature(_CLASSES[name]).parameters) - {"backbone", "feat_dim"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"pretext {name!r} got unknown options {unknown}; it accepts {sorted(accepted)}")
    if name == "byol":
        return BYOL(backbone, feat_dim, **kwargs)
    if name == "gpt":
        return GPTPretext(feat_dim, **kwargs)
    return SimCLR(feat_dim, **kwargs)


__all__ = [
    "BYOL",
    "PRETEXTS",
    "GPTPretext",
    "SimCLR",
    "build_pretext",
    "byol_loss",
    "mlp_head",
    "next_token_loss",
    "nt_xent",
    "nt_xent_across_ranks",
]
