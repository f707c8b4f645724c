"""ZeRO-3 parameter access outside an engine's forward: gather to read, gather to modify.

Under ZeRO-3 a parameter's storage holds only this rank's partition between forwards. Code that
needs whole tensors (the hypergradient's functional calls, the injection of a precomputed
gradient, BYOL's EMA target update) wraps itself in one of these contexts. Both are no-ops when no
parameter is partitioned (ZeRO 0-2, plain torch), so callers need no branch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import nn


def is_partitioned(p: nn.Parameter) -> bool:
    """Whether ZeRO-3 partitioned ``p`` (DeepSpeed tags such parameters with ``ds_id``)."""
    return hasattr(p, "ds_id")


def gathered(params: Iterable[nn.Parameter]) -> contextlib.AbstractContextManager[None]:
    """Context in which ZeRO-3-partitioned ``params`` hold their full values, read-only (changes
    are discarded on exit)."""
    params = list(params)
    if not any(is_partitioned(p) for p in params):
        return contextlib.nullcontext()
    import deepspeed  # only reachable when DeepSpeed partitioned these parameters

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@contextlib.contextmanager
def modifiable(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Context in which ``params`` may be changed in place, identically on every rank: under
    ZeRO-3 they are gathered and rank 0's values are re-partitioned on exit."""
    params = list(params)
    if not any(is_partitioned(p) for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield


def full_state_dict(module: nn.Module) -> dict:
    """``module.state_dict()`` with whole tensors (gathered under ZeRO-3), cloned: safe to keep
    after the parameters are partitioned again. Every rank must call it (the gather is collective)."""
    with gathered(module.parameters()):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
