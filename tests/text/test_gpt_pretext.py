"""The next-token pretext: loss against a hand computation, padding ignored, head untied."""

from __future__ import annotations

import math

import pytest
import torch

from bissl.models.gpt import GPT
from bissl.tasks.pretext import build_pretext
from bissl.tasks.pretext.gpt import GPTPretext, next_token_loss


def test_next_token_loss_by_hand():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 6, dtype=torch.float64)
    tokens = torch.tensor([[2, 5, 1, 3], [4, 0, 0, 0]])
    terms = []
    for b in range(2):
        for t in range(3):
            target = int(tokens[b, t + 1])
            if target == 0:
                continue
            row = logits[b, t].tolist()
            terms.append(math.log(sum(math.exp(z) for z in row)) - row[target])
    want = sum(terms) / len(terms)
    assert len(terms) == 3
    assert next_token_loss(logits, tokens, ignore_id=0).item() == pytest.approx(want, rel=1e-12)
    all_terms = [
        math.log(sum(math.exp(z) for z in logits[b, t].tolist())) - logits[b, t, int(tokens[b, t + 1])].item()
        for b in range(2)
        for t in range(3)
    ]
    assert next_token_loss(logits, tokens).item() == pytest.approx(sum(all_terms) / 6, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        next_token_loss(logits[:, :1], tokens[:, :1])


def test_pretext_module():
    torch.manual_seed(0)
    net = GPT(20, 8, dim=8, depth=1, heads=2).double()
    pre = build_pretext("gpt", backbone=net, feat_dim=8, vocab_size=20, pad_id=0).double()
    assert isinstance(pre, GPTPretext)
    x = torch.randint(1, 20, (3, 8))
    loss = pre.loss(net, x)
    want = next_token_loss(pre.lm_head(net(x, return_sequence=True)), x, 0)
    assert loss.item() == want.item()
    # At initialisation the predictions are near uniform: loss close to log V.
    assert abs(loss.item() - math.log(20)) < 0.05
    # ψ_P is the LM head only, not tied to the token embedding.
    assert [p.shape for p in pre.online_parameters()] == [(20, 8)]
    assert pre.lm_head.weight.data_ptr() != net.tok_emb.weight.data_ptr()
    assert pre.update_target(net) is None and pre.reset_target(net) is None
    with pytest.raises(ValueError, match="unknown options"):
        build_pretext("gpt", backbone=net, feat_dim=8, vocab_size=20, temperature=0.5)
