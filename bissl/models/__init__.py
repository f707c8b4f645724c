"""Backbones: feature extractors ``(B, C, H, W) -> (B, out_dim)`` (images) or token ids
``(B, T) -> (B, out_dim)`` (:class:`GPT`), each with attribute ``out_dim``."""

from __future__ import annotations

from bissl.models.backbones import BACKBONES, TEXT_BACKBONES, build_backbone
from bissl.models.gpt import GPT
from bissl.models.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50
from bissl.models.small_cnn import SmallCNN

__all__ = [
    "BACKBONES",
    "GPT",
    "TEXT_BACKBONES",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "SmallCNN",
    "build_backbone",
    "resnet18",
    "resnet50",
]
