"""LARS: SGD with momentum and a layer-wise adaptive learning rate (You et al., 2017).

The update used in SimCLR/BYOL practice (and by the BiSSL reference for pretext training and the
lower level), per parameter tensor ``w`` with gradient ``g``:

    d     = g + wd * w                                  (weight decay folded into the direction)
    trust = eta * ||w|| / ||d||   (1 when either norm is 0)
    buf   = momentum * buf + trust * d
    w     = w - lr * buf

With ``exclude_bias_and_norm=True`` (default) tensors with ``ndim <= 1`` — biases and BatchNorm /
LayerNorm affine parameters — skip both weight decay and the trust ratio (plain SGD with momentum),
as SimCLR and BYOL do. The rule is per tensor shape, so it works for any parameter list; a param
group can override the flag. The learning rate sits outside the momentum buffer, so changing it
(warm-up, cosine) rescales the whole step at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


def lars_trust(w_norm: Tensor, d_norm: Tensor, eta: float) -> Tensor:
    """LARS' trust ratio ``eta·‖w‖/‖d‖`` of one tensor, 1 when either norm is 0 (0-dim tensors in,
    0-dim tensor out; no host sync). The one definition, shared by :class:`LARS` and the
    partition-aware LARS of multi-rank runs (:mod:`bissl.distributed.trainable`)."""
    return torch.where((w_norm > 0) & (d_norm > 0), eta * w_norm / d_norm, torch.ones_like(w_norm))


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (see module docstring for the exact update).

    Args:
        params: parameters or param groups.
        lr: base learning rate (BiSSL: 4.8 for pretraining, 1.0 for the lower level).
        momentum: heavy-ball momentum.
        weight_decay: L2 coefficient folded into the direction before the trust ratio.
        eta: trust coefficient.
        exclude_bias_and_norm: skip weight decay and adaptation for tensors with ``ndim <= 1``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        eta: float = 1e-3,
        exclude_bias_and_norm: bool = True,
    ) -> None:
        if lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must lie in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay}")
        if eta <= 0:
            raise ValueError(f"LARS: eta must be positive, got {eta}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            exclude_bias_and_norm=exclude_bias_and_norm,
        )
        super().__init__(params, defaults)

    @staticmethod
    def is_excluded(p: Tensor, group: dict) -> bool:
        """Whether ``p`` skips weight decay and the trust ratio in ``group``."""
        return bool(group["exclude_bias_and_norm"]) and p.ndim <= 1

    # torch declares step() as two overloads (closure -> float, none -> None); this single
    # signature covers both, which mypy cannot match against overloads.
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One LARS update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            wd, eta = group["weight_decay"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                d = p.grad
                if not self.is_excluded(p, group):
                    if wd != 0:
                        d = d.add(p, alpha=wd)
                    # Computed on device (no .item()): no host sync per tensor.
                    trust = lars_trust(torch.linalg.vector_norm(p), torch.linalg.vector_norm(d), eta)
                    d = d * trust
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.detach().clone()
                else:
                    buf.mul_(momentum).add_(d)
                p.add_(buf, alpha=-lr)
        return loss
