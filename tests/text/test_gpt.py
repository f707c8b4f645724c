"""The GPT backbone: shapes, causal masking, padding invariance, pooling, attention paths agree."""

from __future__ import annotations

import pytest
import torch

from bissl.models import build_backbone
from bissl.models.gpt import GPT, causal_attention

V, T = 37, 10


def _gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(V, T, pad_id=0, dim=16, depth=2, heads=4, **kw).double()


def test_shapes_and_registry():
    net = build_backbone("gpt", vocab_size=V, max_len=T, dim=16, depth=2, heads=4)
    x = torch.randint(1, V, (3, 7))
    assert net.out_dim == 16
    assert net(x).shape == (3, 16)
    assert net(x, return_sequence=True).shape == (3, 7, 16)
    with pytest.raises(ValueError, match="takes token ids, not images"):
        build_backbone("gpt", in_channels=3, vocab_size=V, max_len=T)
    with pytest.raises(ValueError, match="needs in_channels"):
        build_backbone("small_cnn")


def test_input_and_option_errors():
    net = _gpt()
    with pytest.raises(ValueError, match="int64 token ids"):
        net(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"sequence length 11 is outside \[1, 10\]"):
        net(torch.ones(2, 11, dtype=torch.int64))
    with pytest.raises(ValueError, match="not divisible by heads"):
        GPT(V, T, dim=10, heads=4)
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        GPT(V, T, attention="flash")
    with pytest.raises(ValueError, match="pad_id 40 is outside"):
        GPT(V, T, pad_id=40)


@pytest.mark.parametrize("attention", ["math", "recompute", "sdpa", "sdpa_math"])
def test_causal_masking(attention):
    net = _gpt(attention=attention)
    x = torch.randint(1, V, (2, T))
    y = x.clone()
    y[:, 6] = (x[:, 6] % (V - 1)) + 1  # change position 6 only
    assert not torch.equal(x, y)
    hx, hy = net(x, return_sequence=True), net(y, return_sequence=True)
    assert torch.equal(hx[:, :6], hy[:, :6])  # earlier positions cannot see the change
    assert (hx[:, 6:] - hy[:, 6:]).abs().amax() > 1e-6


def test_padding_invariance_and_masked_mean():
    net = _gpt()
    text = torch.tensor([[5, 9, 3, 8]])
    alone = net(text)
    padded = torch.tensor([[5, 9, 3, 8, 0, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(net(padded), alone, rtol=0, atol=1e-12)
    # In a batch with a longer text, and after changing the padding id's embedding.
    batch = torch.tensor([[5, 9, 3, 8, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        net.tok_emb.weight[0] += 3.0
    pooled = net(batch)
    torch.testing.assert_close(pooled[0:1], alone, rtol=0, atol=1e-12)
    h = net(batch, return_sequence=True)
    torch.testing.assert_close(pooled[1], h[1].mean(dim=0), rtol=0, atol=1e-12)
    torch.testing.assert_close(pooled[0], h[0, :4].mean(dim=0), rtol=0, atol=1e-12)
    all_pad = torch.zeros(1, 3, dtype=torch.int64)
    assert torch.equal(net(all_pad), torch.zeros(1, 16, dtype=torch.float64))


def test_attention_paths_agree():
    x = torch.randint(1, V, (3, T))
    ref = _gpt(attention="math")
    for kw in ({"attention": "sdpa"}, {"attention": "sdpa_math"}, {"attention": "recompute"}):
        other = _gpt(**kw)
        other.load_state_dict(ref.state_dict())
        torch.testing.assert_close(other(x, return_sequence=True), ref(x, return_sequence=True), rtol=1e-10, atol=1e-12)
        g_ref = torch.autograd.grad(ref(x).square().sum(), list(ref.parameters()))
        g_other = torch.autograd.grad(other(x).square().sum(), list(other.parameters()))
        for a, b in zip(g_ref, g_other):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_math_attention_matches_formula():
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    out = causal_attention(q, k, v, "math")
    for t in range(5):
        w = torch.softmax((q[:, :, t : t + 1] @ k[:, :, : t + 1].transpose(-2, -1)) / 2.0, dim=-1)
        torch.testing.assert_close(out[:, :, t : t + 1], w @ v[:, :, : t + 1], rtol=1e-12, atol=1e-12)
