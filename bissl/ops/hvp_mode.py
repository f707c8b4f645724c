"""Automatic choice of the HVP mode: the first candidate that actually runs on this loss.

Which modes work depends on the ops inside the loss, not on the model class:

* ``fwdrev`` needs a forward-mode AD rule for every op (``torch.func.jvp``) and no saved-tensor
  hooks (``torch.func`` rejects them). Explicit "math" attention has both; on torch 2.13 the
  fused CPU attention kernel behind ``F.scaled_dot_product_attention``
  (``_scaled_dot_product_flash_attention_for_cpu``) has no forward-AD rule.
* ``revrev`` / ``autograd`` need a double backward. The fused CPU attention kernel has none either
  (``derivative for ..._backward is not implemented``), so no mode can pass through it. A custom
  ``autograd.Function`` with a differentiable backward but no ``jvp`` (the GPT's ``"recompute"``
  attention) blocks ``fwdrev`` while ``revrev`` and ``autograd`` work.

The probe detects a *missing* derivative (PyTorch raises), not a wrong one: e.g. activation
checkpointing inside ``functional_call`` runs without error but recomputes with the module's own
parameters, so its double backward drops terms (tests/text/test_hvp_mode.py compares every mode
chosen for the GPT's attention paths with finite differences).

So the probe runs the candidate exactly as the hypergradient will: :func:`bissl.ops.linearize_hvp`
with that mode, then one matvec, on the real loss and parameters. A candidate that raises is
skipped; the first that returns a product is chosen. The answer is cached per
``(loss code, the modules the loss closes over, parameter names/shapes/dtypes/devices)``: a trainer
that builds a fresh closure for every upper step probes once.

Measured cost (``docs/text.md``): on the text demo's GPT on CPU, a 5-matvec solve with the
linearised ``revrev`` takes less time than with ``fwdrev`` (which re-runs forward and backward
every matvec); pass ``candidates`` in the order you prefer.
"""

from __future__ import annotations

import inspect
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any, cast

import torch
from torch import nn

from bissl.ops.hvp import HVP_MODES, HVPMode, linearize_hvp
from bissl.typing import LossFn, ParamsLike

DEFAULT_CANDIDATES: tuple[str, ...] = ("fwdrev", "revrev", "autograd")
_CACHE_SIZE = 64
_cache: OrderedDict[Hashable, str] = OrderedDict()


class HVPModeError(RuntimeError):
    """No candidate HVP mode runs on the given loss (the message has each candidate's error)."""


def _closure_modules(fn: Any, depth: int = 2) -> list[nn.Module]:
    """``nn.Module`` objects captured by ``fn``'s closure (and by closures it captures)."""
    found: list[nn.Module] = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, nn.Module):
            found.append(value)
        elif callable(value) and depth > 0:
            found += _closure_modules(value, depth - 1)
    bound = getattr(fn, "__self__", None)
    if isinstance(bound, nn.Module):
        found.append(bound)
    return found


def _weak(fn: Any) -> Any:
    """A weak reference to ``fn``; an object equal to nothing when ``fn`` takes no weak reference
    (the choice is then never reused)."""
    try:
        return weakref.WeakMethod(fn) if inspect.ismethod(fn) else weakref.ref(fn)
    except TypeError:
        return object()


def hvp_cache_key(loss_fn: LossFn, params: ParamsLike) -> Hashable:
    """The default cache key of :func:`select_hvp_mode`.

    ``(code object, modules captured by the closure, parameter signature)``: a trainer's fresh
    closure per step over the same modules hits the cache. A loss that captures no module (e.g. a
    module-level function reading globals) is keyed by the function object itself instead, since
    its code alone says nothing about the model. Modules and functions enter by weak reference:
    keys match only while they name the same live objects, so a new model never inherits a choice
    made for a dead one.
    """
    code = getattr(loss_fn, "__code__", None) or type(loss_fn)
    modules = tuple(weakref.ref(m) for m in _closure_modules(loss_fn))
    owner: tuple = modules if modules else (_weak(loss_fn),)
    signature = tuple((k, tuple(p.shape), p.dtype, p.device) for k, p in params.items())
    return code, owner, signature


def clear_hvp_mode_cache() -> None:
    """Forget every cached choice (e.g. after changing a model's attention implementation)."""
    _cache.clear()


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (``torch.OutOfMemoryError``, or a ``RuntimeError``
    whose message says "out of memory", as CPU allocators and older CUDA paths raise)."""
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(err, oom_type):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def probe_hvp_mode(loss_fn: LossFn, params: ParamsLike, mode: str) -> None:
    """Run ``mode`` once as the hypergradient would (linearize, one matvec); raise if it fails.

    Raises:
        Exception: whatever the autograd machinery raised (e.g. ``NotImplementedError`` for a
            missing forward-AD rule, ``RuntimeError`` for a missing double backward).
    """
    op = linearize_hvp(loss_fn, params, mode=cast(HVPMode, mode))  # which checks the name
    # A deterministic direction with no zero entries touches every parameter. Non-finite values
    # are not a reason to reject a mode (a missing derivative raises); the solver reports them.
    op(torch.ones(op.spec.numel, dtype=op.spec.dtype, device=op.spec.device))


def select_hvp_mode(
    loss_fn: LossFn,
    params: ParamsLike,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    *,
    cache_key: Hashable | None = None,
) -> str:
    """The first mode in ``candidates`` whose HVP runs on ``loss_fn`` at ``params``.

    Args:
        loss_fn: the lower loss ``loss_fn(params) -> ()`` tensor, as given to
            :func:`bissl.hypergrad.implicit_hypergrad`.
        params: the point (only used for probing; not modified).
        candidates: modes in order of preference (default ``fwdrev``, ``revrev``, ``autograd``).
        cache_key: overrides :func:`hvp_cache_key`.

    Returns:
        The chosen mode name.

    Raises:
        ValueError: empty or unknown candidates.
        HVPModeError: no candidate works (the message lists each failure).
        torch.OutOfMemoryError / RuntimeError: a probe ran out of memory. That is re-raised as is,
            never read as "mode unsupported": falling through to a slower mode (or reporting that
            none works) would hide that the batch is too large.
    """
    candidates = tuple(candidates)
    if not candidates:
        raise ValueError("select_hvp_mode: candidates must not be empty")
    unknown = [c for c in candidates if c not in HVP_MODES]
    if unknown:
        raise ValueError(f"select_hvp_mode: unknown modes {unknown}; valid: {HVP_MODES}")
    key = (cache_key if cache_key is not None else hvp_cache_key(loss_fn, params), candidates)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    failures = []
    for mode in candidates:
        try:
            probe_hvp_mode(loss_fn, params, mode)
        except (RuntimeError, NotImplementedError) as err:
            if is_out_of_memory(err):
                raise  # the mode works, the batch does not fit: the next mode would hide that
            text = str(err).strip()
            first_line = text.splitlines()[0] if text else type(err).__name__
            failures.append(f"{mode}: {type(err).__name__}: {first_line}")
            continue
        _cache[key] = mode
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
        return mode
    raise HVPModeError(
        "no HVP mode works on this lower loss (" + "; ".join(failures) + "). A fused attention "
        "kernel (GPT attention 'sdpa') has no second derivative on this PyTorch; use attention "
        "'math' or 'sdpa_math'"
    )
