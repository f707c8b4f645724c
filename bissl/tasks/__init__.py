"""Pretext and downstream tasks, and the augmentations that feed them."""

from __future__ import annotations

from bissl.tasks.augment import TwoViewAugment, ViewConfig
from bissl.tasks.downstream import accuracy, build_head, classification_loss, eval_mode, evaluate
from bissl.tasks.pretext import BYOL, PRETEXTS, SimCLR, build_pretext, nt_xent

__all__ = [
    "BYOL",
    "PRETEXTS",
    "SimCLR",
    "TwoViewAugment",
    "ViewConfig",
    "accuracy",
    "build_head",
    "build_pretext",
    "classification_loss",
    "eval_mode",
    "evaluate",
    "nt_xent",
]
