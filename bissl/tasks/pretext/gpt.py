"""GPT pretext task: causal language modelling (next-token prediction) with its own LM head.

The LM head (``Linear(D, V)``, no bias) belongs to ψ_P. It is deliberately *not* tied to the
backbone's token embedding: in BiSSL θ is passed to the backbone functionally
(``functional_call(net, theta, ...)``) and the proximal term and the Hessian cover θ only, so a
tied head would silently read the module's own embedding instead of θ's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch.nn.functional as F
from torch import Tensor, nn

Encoder = Callable[..., Tensor]


def next_token_loss(logits: Tensor, tokens: Tensor, ignore_id: int | None = None) -> Tensor:
    """Mean cross-entropy of predicting ``tokens[:, t+1]`` from position ``t``.

    Args:
        logits: ``(B, T, V)`` scores at every position.
        tokens: ``(B, T)`` int64 ids of the same sequences.
        ignore_id: a target id excluded from the mean (the padding id), or ``None``.

    Returns:
        Scalar: the mean over the ``B·(T-1)`` (non-ignored) targets.
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"next_token_loss: expected (B, T, V) logits and (B, T) tokens, got "
            f"{tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    if tokens.shape[1] < 2:
        raise ValueError("next_token_loss: sequences need at least 2 tokens")
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])
    target = tokens[:, 1:].reshape(-1)
    return F.cross_entropy(pred, target, ignore_index=-100 if ignore_id is None else ignore_id)


class GPTPretext(nn.Module):
    """Next-token prediction head and loss; the backbone stays outside (``encode``).

    Args:
        feat_dim: backbone width ``D``.
        vocab_size: ``V``.
        pad_id: targets equal to it do not count (pretext rows carry no padding; this guards
            padded input).
    """

    def __init__(self, feat_dim: int, vocab_size: int, pad_id: int | None = 0) -> None:
        super().__init__()
        if feat_dim <= 0 or vocab_size < 2:
            raise ValueError(f"GPTPretext: need feat_dim > 0 and vocab_size >= 2, got {feat_dim}, {vocab_size}")
        self.lm_head = nn.Linear(feat_dim, vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)
        self.pad_id = pad_id

    def forward(self, h: Tensor) -> Tensor:
        """Hidden states ``(B, T, D)`` -> logits ``(B, T, V)``."""
        return self.lm_head(h)

    def loss(self, encode: Encoder, tokens: Tensor) -> Tensor:
        """Causal LM loss of a batch of token rows.

        Args:
            encode: the backbone call; ``encode(tokens, return_sequence=True)`` must give
                ``(B, T, D)`` hidden states (a :class:`bissl.models.GPT` or its functional call).
            tokens: ``(B, T)`` int64 ids (the single "view" of a text batch).
        """
        return next_token_loss(self.lm_head(encode(tokens, return_sequence=True)), tokens, self.pad_id)

    def online_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable pretext-head parameters (the LM head)."""
        return self.lm_head.parameters()

    def update_target(self, backbone_params=None, momentum: float | None = None) -> None:
        """No-op: no target network."""
        return

    def reset_target(self, backbone=None) -> None:
        """No-op: no target network."""
        return
