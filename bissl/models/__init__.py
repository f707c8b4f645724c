"""Backbones: feature extractors ``(B, C, H, W) -> (B, out_dim)`` with attribute ``out_dim``."""

from __future__ import annotations

from bissl.models.backbones import BACKBONES, build_backbone
from bissl.models.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50
from bissl.models.small_cnn import SmallCNN

__all__ = [
    "BACKBONES",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "SmallCNN",
    "build_backbone",
    "resnet18",
    "resnet50",
]
