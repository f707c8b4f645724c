"""Downstream classification: heads, loss, accuracy and evaluation over a dataset."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

Backbone = Union[nn.Module, Callable[[Tensor], Tensor]]


def build_head(in_dim: int, num_classes: int, kind: str = "linear", hidden: int = 512) -> nn.Module:
    """Classifier on backbone features.

    Args:
        in_dim: feature size (``backbone.out_dim``).
        num_classes: output logits.
        kind: ``"linear"`` (the BiSSL default) or ``"mlp"`` (Linear-ReLU-Linear, ``hidden`` units).

    Shapes:
        ``(B, in_dim) -> (B, num_classes)``.
    """
    if in_dim <= 0 or num_classes <= 0:
        raise ValueError(
            f"build_head: in_dim and num_classes must be positive, got {in_dim}, {num_classes}"
        )
    if kind == "linear":
        return nn.Linear(in_dim, num_classes)
    if kind == "mlp":
        if hidden <= 0:
            raise ValueError(f"build_head: hidden must be positive, got {hidden}")
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    raise ValueError(f"unknown head kind {kind!r}; valid kinds: linear, mlp")


def classification_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of ``(B, K)`` logits against ``(B,)`` int64 labels."""
    return F.cross_entropy(logits, y)


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in ``[0, 1]`` of ``(B, K)`` logits against ``(B,)`` labels."""
    if logits.ndim != 2 or y.shape != logits.shape[:1]:
        raise ValueError(
            f"accuracy: expected (B, K) logits and (B,) labels, got {tuple(logits.shape)} "
            f"and {tuple(y.shape)}"
        )
    if y.numel() == 0:
        raise ValueError("accuracy: empty batch")
    return (logits.argmax(dim=1) == y).double().mean().item()


def _modules(*objs: object) -> Iterator[nn.Module]:
    for obj in objs:
        if isinstance(obj, nn.Module):
            yield from obj.modules()


@contextlib.contextmanager
def eval_mode(*objs: object) -> Iterator[None]:
    """Put each ``nn.Module`` in ``objs`` (with submodules) in eval mode; restore flags after."""
    modules = list(_modules(*objs))
    flags = [m.training for m in modules]
    try:
        for m in modules:
            m.training = False
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


def evaluate(
    backbone: Backbone, head: nn.Module, dataset: Dataset, batch_size: int = 256
) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy of ``head(backbone(x))`` over ``dataset``.

    Runs under ``no_grad`` with every module in eval mode (BatchNorm uses running statistics),
    restoring each module's train/eval flag afterwards. Inputs are moved to the head's device.

    Args:
        backbone: an ``nn.Module`` or any function images -> features (e.g. a ``functional_call``
            closure; put modules it closes over in eval mode yourself).
        head: classifier ``(B, F) -> (B, K)``.
        dataset: yields ``(x, y)`` pairs (e.g. ``DatasetSplits.test``).

    Returns:
        ``{"loss": mean cross-entropy, "acc": top-1 accuracy in [0, 1]}``.
    """
    if batch_size <= 0:
        raise ValueError(f"evaluate: batch_size must be positive, got {batch_size}")
    device = next(head.parameters()).device
    if isinstance(dataset, TensorDataset):
        # Slicing the stored tensors avoids collating B single samples per batch.
        xs, ys = dataset.tensors[:2]
        batches = (
            (xs[i : i + batch_size], ys[i : i + batch_size]) for i in range(0, len(ys), batch_size)
        )
    else:
        batches = iter(DataLoader(dataset, batch_size=batch_size, shuffle=False))
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad(), eval_mode(backbone, head):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = head(backbone(x))
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == y).sum())
            count += y.numel()
    if count == 0:
        raise ValueError("evaluate: the dataset is empty")
    return {"loss": total_loss / count, "acc": correct / count}
