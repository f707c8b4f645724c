"""A small GPT (decoder-only transformer) backbone for text BiSSL.

Why our own module rather than ``transformers``' GPT-2 built from a config: the lower level of
BiSSL calls the backbone through ``torch.func.functional_call`` and differentiates it twice (HVPs),
so the attention path must be one we choose and can test for forward-mode and double-backward
support (:mod:`bissl.ops.hvp_mode`); the model must also pool to ``(B, D)`` features for the
downstream head, take no download and no extra dependency, and stay small enough for a CPU demo.
GPT-2's layout is kept (learned positions, pre-LayerNorm blocks, GELU MLP, final LayerNorm,
N(0, 0.02) initialisation with residual projections scaled by ``1/sqrt(2·depth)``); dropout is left
out so that the pretext loss is a deterministic function of θ (an HVP of a randomly masked loss is
not a fixed linear map).

Padding and pooling. Downstream texts are **right**-padded with ``pad_id``. Attention is causal,
so a real token never attends to the pads that follow it: its hidden state is exactly the one of
the unpadded text (no key-padding mask needed, and the same attention path serves pretext and
downstream). The pooled feature is the mean of the final hidden states over the non-pad
positions (masked mean), which uses every token's state rather than only the last one; this is
the documented choice for ``forward(tokens)``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

Attention = Literal["math", "recompute", "sdpa", "sdpa_math"]
ATTENTIONS: tuple[str, ...] = ("math", "recompute", "sdpa", "sdpa_math")


def _causal_probs(q: Tensor, k: Tensor) -> Tensor:
    """``softmax(q kᵀ/√Dh)`` with future positions masked: ``(B, H, T, T)``."""
    t = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    # A large negative constant instead of -inf keeps infinities out of the second-order terms.
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(scores.masked_fill(future, torch.finfo(scores.dtype).min), dim=-1)


class RecomputeAttention(torch.autograd.Function):
    """Causal attention that saves only ``q, k, v`` and recomputes the probabilities in backward.

    Memory per head is ``O(T·Dh)`` instead of the ``O(T²)`` probabilities that autograd keeps for
    the explicit form. The backward is written in plain, differentiable torch ops, so a double
    backward works (``revrev``/``autograd`` HVPs); there is no forward-mode rule (no ``jvp``), so a
    ``fwdrev`` HVP cannot pass through it: the case :func:`bissl.ops.select_hvp_mode` falls back on.
    """

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _causal_probs(q, k) @ v

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = ctx.saved_tensors
        p = _causal_probs(q, k)
        grad_v = p.transpose(-2, -1) @ grad
        grad_p = grad @ v.transpose(-2, -1)
        # Softmax backward: dS = P ∘ (dP − rowsum(dP ∘ P)); masked entries have P = 0.
        grad_s = p * (grad_p - (grad_p * p).sum(dim=-1, keepdim=True))
        scale = 1.0 / math.sqrt(q.shape[-1])
        return grad_s @ k * scale, grad_s.transpose(-2, -1) @ q * scale, grad_v


def causal_attention(q: Tensor, k: Tensor, v: Tensor, impl: str = "math") -> Tensor:
    """Causal scaled dot-product attention.

    Args:
        q, k, v: ``(B, H, T, Dh)``.
        impl: ``"math"``: explicit ``softmax(q kᵀ/√Dh + causal mask) v`` from plain torch ops
            (forward AD and double backward both work: every HVP mode); ``"sdpa"``:
            ``F.scaled_dot_product_attention`` with whatever fused kernel PyTorch picks (fastest;
            on torch 2.13 the CPU flash kernel has neither a forward-AD rule nor a double
            backward, so no HVP can pass through it); ``"sdpa_math"``: the same call restricted to
            PyTorch's math backend (composite ops: every HVP mode); ``"recompute"``:
            :class:`RecomputeAttention` (less memory; double backward but no forward AD).

    Returns:
        ``(B, H, T, Dh)``.
    """
    if impl == "math":
        return _causal_probs(q, k) @ v
    if impl == "recompute":
        return RecomputeAttention.apply(q, k, v)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if impl == "sdpa_math":
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {ATTENTIONS}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention ``(B, T, D) -> (B, T, D)``."""

    def __init__(self, dim: int, heads: int, attention: str) -> None:
        super().__init__()
        self.heads, self.attention = heads, attention
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = causal_attention(q, k, v, self.attention)  # (B, H, T, Dh)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, attention: str) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, attention)
        self.ln2 = nn.LayerNorm(dim)
        # tanh-approximate GELU as in GPT-2; not in place (forward-mode AD).
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token ids -> pooled features (or per-position hidden states).

    Args:
        vocab_size: size of the token vocabulary (ids in ``[0, vocab_size)``).
        max_len: longest sequence accepted (learned position embeddings).
        pad_id: the padding id (excluded from the pooled mean).
        dim: model width ``D`` (``out_dim``); must be divisible by ``heads``.
        depth: transformer blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        attention: ``"math"`` (default), ``"recompute"``, ``"sdpa"`` or ``"sdpa_math"`` (see
            :func:`causal_attention`). Which HVP modes work depends on it;
            :func:`bissl.ops.hvp_mode.select_hvp_mode` finds out by itself.

    Activation checkpointing (``torch.utils.checkpoint``) is deliberately not offered: its
    recomputation runs after ``functional_call`` has restored the module's own parameters, so a
    double backward through it loses the second-order terms with respect to the θ passed in
    (measured: a 21% wrong HVP on a tiny GPT, with no error raised).

    Shapes:
        ``forward(tokens)``: ``(B, T) int64 -> (B, D)``, the mean of the final hidden states over
        positions whose id is not ``pad_id`` (texts are right-padded; see the module docstring).
        ``forward(tokens, return_sequence=True)``: ``(B, T) -> (B, T, D)``.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        pad_id: int = 0,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        attention: str = "math",
    ) -> None:
        super().__init__()
        if vocab_size < 2 or max_len < 1:
            raise ValueError(f"GPT: need vocab_size >= 2 and max_len >= 1, got {vocab_size}, {max_len}")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"GPT: pad_id {pad_id} is outside the vocabulary [0, {vocab_size})")
        if dim <= 0 or depth <= 0 or heads <= 0 or mlp_ratio <= 0:
            raise ValueError(
                f"GPT: dim, depth, heads, mlp_ratio must be positive, got {dim}, {depth}, {heads}, {mlp_ratio}"
            )
        if dim % heads:
            raise ValueError(f"GPT: dim {dim} is not divisible by heads {heads}")
        if attention not in ATTENTIONS:
            raise ValueError(f"GPT: unknown attention {attention!r}; choose one of {ATTENTIONS}")
        self.vocab_size, self.max_len, self.pad_id = vocab_size, max_len, pad_id
        self.attention = attention
        self.out_dim = dim
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, attention) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        # GPT-2: residual-branch outputs scaled down so the residual stream's variance does not
        # grow with depth.
        # (By name: in each block attn.proj comes before mlp.2, the order the draws always had.)
        for name, weight in self.blocks.named_parameters():
            if name.endswith((".attn.proj.weight", ".mlp.2.weight")):
                nn.init.normal_(weight, mean=0.0, std=0.02 / math.sqrt(2 * depth))

    def _check(self, tokens: Tensor) -> None:
        if tokens.dim() != 2 or tokens.dtype != torch.int64:
            raise ValueError(f"GPT: expected (B, T) int64 token ids, got {tuple(tokens.shape)} {tokens.dtype}")
        if not 1 <= tokens.shape[1] <= self.max_len:
            raise ValueError(f"GPT: sequence length {tokens.shape[1]} is outside [1, {self.max_len}]")

    def hidden_states(self, tokens: Tensor) -> Tensor:
        """``(B, T)`` ids -> ``(B, T, D)`` final (LayerNormed) hidden states."""
        self._check(tokens)
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, tokens: Tensor, return_sequence: bool = False) -> Tensor:
        h = self.hidden_states(tokens)
        if return_sequence:
            return h
        keep = (tokens != self.pad_id).to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        # clamp: an all-padding row pools to zeros instead of NaN.
        return (h * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)
