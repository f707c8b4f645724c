"""Optimizers and learning-rate schedules used by the BiSSL pipeline."""

from __future__ import annotations

from bissl.optim.lars import LARS, lars_trust
from bissl.optim.schedules import WarmupCosineFactor, cosine_with_warmup

__all__ = ["LARS", "WarmupCosineFactor", "cosine_with_warmup", "lars_trust"]
