"""Named types shared across bissl (import-only module, no work at import)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

#: Parameters by name, the ``torch.func.functional_call`` convention: ``{"0.weight": Tensor, ...}``.
Params = dict[str, Tensor]
#: Read-only view of ``Params`` (what ops accept).
ParamsLike = Mapping[str, Tensor]
#: A scalar loss of parameters: ``loss_fn(params) -> Tensor`` of shape ``()``.
LossFn = Callable[[Params], Tensor]
#: A matrix-free linear operator on flat vectors: ``matvec(v: (P,)) -> (P,)``.
MatVec = Callable[[Tensor], Tensor]
#: A vector in any form the solvers take: a parameter dict, a tuple/list of tensors (one per
#: parameter) or a flat ``(P,)`` tensor.
Vector = Mapping[str, Tensor] | Sequence[Tensor] | Tensor
