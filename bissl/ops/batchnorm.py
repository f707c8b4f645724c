"""BatchNorm policy for Hessian-vector products.

Inside an HVP the loss is differentiated (twice, or forward-over-reverse), and often evaluated more
than once. Two things go wrong with train-mode BatchNorm there:

* ``torch.func`` transforms raise when BatchNorm updates its running statistics in place
  (a dual/batched value written into a plain buffer);
* the autograd path silently moves the running statistics on every evaluation, so a 5-iteration
  CG would update them five extra times per hypergradient (the BiSSL reference code does this).

Our semantics, applied by every HVP in :mod:`bissl.ops.hvp`: a BatchNorm layer in **train mode**
normalises with the **batch statistics** (exactly what the training forward pass differentiates),
and its buffers (``running_mean``, ``running_var``, ``num_batches_tracked``) are **left untouched**.
A layer in **eval mode** uses its running statistics as usual (they are constants of the loss).

Implementation: a ``TorchFunctionMode`` that calls ``F.batch_norm`` without running buffers when
it normalises with batch statistics, and skips the in-place ``add_`` BatchNorm modules apply to
their 0-dim integer ``num_batches_tracked`` counter. It works for modules called directly and
through ``torch.func.functional_call``, under ``torch.func`` transforms and plain autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from bissl.ops.batchnorm_double_backward import batch_norm_train

_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
#: Active FrozenBatchNormStats contexts; read by BatchNorm layers that do not go through F.batch_norm.
_frozen_depth = 0


def stats_frozen() -> bool:
    """Whether the policy is active: train-mode BatchNorm must leave its running buffers alone."""
    return _frozen_depth > 0


class FrozenBatchNormStats(TorchFunctionMode):
    """Context manager: train-mode BatchNorm uses batch statistics and never updates its buffers.

    Args:
        fast_double_backward: compute batch-statistics BatchNorm through
            :func:`bissl.ops.batchnorm_double_backward.batch_norm_train`, whose second derivative
            is cheaper (plain autograd only; not under ``torch.func`` transforms).
    """

    def __init__(self, fast_double_backward: bool = False):
        super().__init__()
        self.fast_double_backward = fast_double_backward

    def __enter__(self):
        global _frozen_depth
        entered = super().__enter__()
        _frozen_depth += 1
        return entered

    def __exit__(self, *exc):
        global _frozen_depth
        _frozen_depth -= 1
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = dict(zip(_BN_ARGS, args))
            bound.update(kwargs)
            uses_batch_stats = bound.get("training", False) or bound.get("running_mean") is None
            if uses_batch_stats:
                bound["running_mean"] = None
                bound["running_var"] = None
                bound["training"] = True
                if self.fast_double_backward and torch.is_grad_enabled():
                    return batch_norm_train(
                        bound["input"], bound.get("weight"), bound.get("bias"), bound.get("eps", 1e-5)
                    )
            return func(**bound)
        if (
            func is torch.Tensor.add_
            and isinstance(args[0], torch.Tensor)
            and args[0].ndim == 0
            and not args[0].is_floating_point()
            and not args[0].is_complex()
        ):
            # BatchNorm's `num_batches_tracked.add_(1)`: a counter of forward passes, not part of
            # the loss; counting HVP evaluations in it would change momentum=None averaging.
            return args[0]
        return func(*args, **kwargs)


def batchnorm_stats_frozen(fast_double_backward: bool = False) -> FrozenBatchNormStats:
    """Return the context manager that applies the HVP BatchNorm policy (see module docstring).

    Example:
        >>> with batchnorm_stats_frozen():
        ...     loss = loss_fn(params)   # train-mode BN: batch stats, buffers untouched
    """
    return FrozenBatchNormStats(fast_double_backward)
