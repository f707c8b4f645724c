"""Downstream classification: heads, loss, accuracy and evaluation over a dataset."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

Backbone = nn.Module | Callable[[Tensor], Tensor]


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
        raise ValueError(f"build_head: in_dim and num_classes must be positive, got {in_dim}, {num_classes}")
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
            f"accuracy: expected (B, K) logits and (B,) labels, got {tuple(logits.shape)} and {tuple(y.shape)}"
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


def predict(
    backbone: Backbone,
    head: Backbone,
    x: Tensor,
    y: Tensor,
    batch_size: int = 256,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-example cross-entropy and predicted class of ``head(backbone(x))``.

    Runs under ``no_grad`` with every module in eval mode (BatchNorm uses running statistics),
    restoring each module's train/eval flag afterwards. Inputs are moved to the head's device.

    Args:
        backbone: an ``nn.Module`` or any function inputs -> features (e.g. a ``functional_call``
            closure; put modules it closes over in eval mode yourself).
        head: classifier ``(B, F) -> (B, K)`` (a module, or a function like ``backbone``).
        x, y: inputs ``(N, ...)`` and labels ``(N,)``.
        batch_size: examples per forward.
        device: where to compute (default: the head module's device).

    Returns:
        ``(loss, pred)``: float64 ``(N,)`` losses and int64 ``(N,)`` predictions, on the CPU.
    """
    if batch_size <= 0:
        raise ValueError(f"predict: batch_size must be positive, got {batch_size}")
    if device is None:
        if not isinstance(head, nn.Module):
            raise ValueError("predict: give device= when head is not a module")
        device = next(head.parameters()).device
    losses, preds = [], []
    with torch.no_grad(), eval_mode(backbone, head):
        for i in range(0, len(y), batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            logits = head(backbone(xb))
            losses.append(F.cross_entropy(logits, yb, reduction="none").double().cpu())
            preds.append(logits.argmax(dim=1).cpu())
    empty = torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
    return (torch.cat(losses), torch.cat(preds)) if losses else empty


def evaluate(backbone: Backbone, head: nn.Module, dataset: Dataset, batch_size: int = 256) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy of ``head(backbone(x))`` over ``dataset``
    (see :func:`predict`).

    Args:
        backbone, head: as :func:`predict`.
        dataset: a ``TensorDataset`` or any dataset yielding ``(x, y)`` pairs.

    Returns:
        ``{"loss": mean cross-entropy, "acc": top-1 accuracy in [0, 1]}``.
    """
    if isinstance(dataset, TensorDataset):
        xs, ys = dataset.tensors[:2]
    else:
        # A map-style dataset has len() and [i], which torch's Dataset type does not declare.
        pairs = cast(Sequence[tuple[Tensor, Tensor]], dataset)
        xs, ys = (torch.stack(t) for t in zip(*pairs)) if len(pairs) else (torch.zeros(0), torch.zeros(0))
    if len(ys) == 0:
        raise ValueError("evaluate: the dataset is empty")
    loss, pred = predict(backbone, head, xs, ys, batch_size)
    return {"loss": float(loss.mean()), "acc": float((pred == ys.cpu()).double().mean())}
