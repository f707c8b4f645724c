"""Tests for bissl.tasks.downstream: heads, loss, accuracy and evaluate()."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bissl.models import build_backbone
from bissl.tasks.downstream import accuracy, build_head, classification_loss, evaluate


def test_heads():
    lin = build_head(8, 3)
    assert isinstance(lin, nn.Linear) and lin(torch.randn(4, 8)).shape == (4, 3)
    mlp = build_head(8, 3, kind="mlp", hidden=5)
    assert mlp(torch.randn(4, 8)).shape == (4, 3)
    assert sum(p.numel() for p in mlp.parameters()) == 8 * 5 + 5 + 5 * 3 + 3
    with pytest.raises(ValueError, match="linear, mlp"):
        build_head(8, 3, kind="transformer")
    with pytest.raises(ValueError, match="positive"):
        build_head(0, 3)


def test_loss_and_accuracy_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.5, 0.5], [0.0, 0.0, 4.0]], dtype=torch.float64)
    y = torch.tensor([0, 2, 0, 1])
    assert accuracy(logits, y) == 0.5
    expect = sum(-(row[t] - math.log(sum(math.exp(v) for v in row.tolist()))) for row, t in zip(logits, y.tolist())) / 4
    assert classification_loss(logits, y).item() == pytest.approx(float(expect), rel=1e-12)
    with pytest.raises(ValueError, match="labels"):
        accuracy(logits, y[:2])


def test_evaluate_matches_full_batch_and_restores_modes():
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", in_channels=1, width=4)
    head = build_head(backbone.out_dim, 3)
    # Move BatchNorm running stats away from their init so eval mode actually matters.
    with torch.no_grad():
        backbone.train()(torch.randn(32, 1, 8, 8) * 3 + 1)
    x, y = torch.randn(23, 1, 8, 8), torch.randint(0, 3, (23,))
    backbone.train()
    head.eval()
    backbone.features[1].eval()  # mixed modes must come back as they were
    modes = [m.training for m in list(backbone.modules()) + list(head.modules())]
    stats = {k: b.clone() for k, b in backbone.named_buffers()}

    out = evaluate(backbone, head, TensorDataset(x, y), batch_size=5)

    assert [m.training for m in list(backbone.modules()) + list(head.modules())] == modes
    assert all(torch.equal(stats[k], b) for k, b in backbone.named_buffers())
    backbone.eval()
    with torch.no_grad():
        logits = head(backbone(x))
    assert out["acc"] == pytest.approx(accuracy(logits, y))
    assert out["loss"] == pytest.approx(classification_loss(logits, y).item(), rel=1e-5)
    # A plain function of images works as the backbone too; so does a non-tensor Dataset.
    pairs = [(x[i], y[i]) for i in range(23)]
    out_fn = evaluate(lambda imgs: backbone(imgs), head, pairs, batch_size=7)
    assert out_fn["acc"] == pytest.approx(out["acc"]) and out_fn["loss"] == pytest.approx(out["loss"], rel=1e-5)


def test_evaluate_errors():
    head = build_head(4, 2)
    with pytest.raises(ValueError, match="empty"):
        evaluate(nn.Identity(), head, TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(
            nn.Identity(),
            head,
            TensorDataset(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)),
            0,
        )
