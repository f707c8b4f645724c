"""Learning-rate schedules (picklable, so schedulers resume from ``state_dict``)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineFactor:
    """LR multiplier at step ``s``: linear warm-up, then cosine decay to ``final_factor``.

    * ``s < warmup_steps``: ``(s + 1) / warmup_steps`` (the first step already moves; step
      ``warmup_steps - 1`` reaches the base rate);
    * ``warmup_steps <= s <= total_steps``: ``final + (1 - final) * (1 + cos(pi * t)) / 2`` with
      ``t = (s - warmup_steps) / (total_steps - warmup_steps)``;
    * ``s > total_steps``: ``final_factor``.

    A class rather than a lambda: ``LambdaLR.state_dict`` stores callable objects' attributes,
    and the object pickles.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, final_factor: float = 0.0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must lie in [0, total_steps={total_steps}], got {warmup_steps}")
        if not 0.0 <= final_factor <= 1.0:
            raise ValueError(f"final_factor must lie in [0, 1], got {final_factor}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.final_factor = float(final_factor)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps == 0:
            return self.final_factor if step > self.total_steps else 1.0
        t = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.final_factor + (1.0 - self.final_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    final_factor: float = 0.0,
) -> LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine from base lr to ``final_factor x`` base.

    Call ``scheduler.step()`` once after each ``optimizer.step()``; ``total_steps`` counts those.
    BiSSL's pretraining uses ``final_factor=0.001``. ``scheduler.state_dict()`` /
    ``load_state_dict`` resume it exactly.

    Raises:
        ValueError: ``total_steps < 1``, ``warmup_steps`` outside ``[0, total_steps]``, or
            ``final_factor`` outside ``[0, 1]``.
    """
    return LambdaLR(optimizer, WarmupCosineFactor(total_steps, warmup_steps, final_factor))
