"""BYOL pretext task: online projector + predictor, EMA target network (Grill et al., 2020).

The online backbone stays outside this module (the trainer passes ``encode``, a function of the
lower-level parameters theta); the target backbone and projector are deep copies owned here, with
``requires_grad=False``. The EMA moves them toward the online weights only when the trainer calls
:meth:`BYOL.update_target` (after lower-level optimizer steps, never inside an HVP).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bissl.tasks.pretext.heads import mlp_head
from bissl.tasks.pretext.simclr import Encoder

ParamsOrModule = Mapping[str, Tensor] | nn.Module


def byol_loss(p: Tensor, t: Tensor) -> Tensor:
    """Mean of ``2 - 2 cos(p_i, t_i)`` over rows; lies in ``[0, 4]``.

    Args:
        p: ``(N, D)`` online predictions; t: ``(N, D)`` targets (treated as constants by callers).
    """
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(
            f"byol_loss: expected two (N, D) tensors of equal shape, got {tuple(p.shape)} and {tuple(t.shape)}"
        )
    cos = (F.normalize(p, dim=1) * F.normalize(t, dim=1)).sum(dim=1)
    return (2.0 - 2.0 * cos).mean()


def _as_dict(source: ParamsOrModule, what: str) -> dict[str, Tensor]:
    if isinstance(source, nn.Module):
        return dict(source.named_parameters())
    if isinstance(source, Mapping):
        return dict(source)
    raise TypeError(f"{what}: expected an nn.Module or a name -> Tensor mapping, got {type(source).__name__}")


class BYOL(nn.Module):
    """BYOL heads, target network and symmetric loss.

    Args:
        backbone: the online backbone; deep-copied to build the target backbone.
        feat_dim: backbone output features.
        proj_dims: projector widths (Linear-BN-ReLU per hidden width + bias-free Linear).
        pred_hidden: predictor hidden width; the predictor has the projector's depth and maps
            ``proj_dims[-1] -> proj_dims[-1]``.
        momentum: EMA coefficient ``m`` of :meth:`update_target`
            (``target <- m target + (1-m) online``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        proj_dims: Sequence[int] = (256, 256, 256),
        pred_hidden: int = 256,
        momentum: float = 0.9995,
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BYOL: momentum must lie in [0, 1], got {momentum}")
        proj_dims = tuple(int(d) for d in proj_dims)
        self.projector = mlp_head(feat_dim, proj_dims)
        self.predictor = mlp_head(proj_dims[-1], (pred_hidden,) * (len(proj_dims) - 1) + (proj_dims[-1],))
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_parameters():
            p.requires_grad_(False)
        self.momentum = float(momentum)

    def target_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the target backbone and target projector (never trained by gradients)."""
        yield from self.target_backbone.parameters()
        yield from self.target_projector.parameters()

    def online_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable pretext-head parameters (projector and predictor)."""
        yield from self.projector.parameters()
        yield from self.predictor.parameters()

    def loss(self, encode: Encoder, v1: Tensor, v2: Tensor) -> Tensor:
        """Symmetric BYOL loss: mean over both directions of ``2 - 2 cos(q(z(v_a)), z'(v_b))``.

        The online side is ``predictor(projector(encode(v)))``; the target side is
        ``target_projector(target_backbone(v))`` under ``no_grad``. Both views go through each
        network in one batched call. The value lies in ``[0, 4]``.

        Args:
            encode: images ``(2B, C, H, W)`` -> online backbone features ``(2B, feat_dim)``.
            v1, v2: ``(B, C, H, W)`` augmented views.
        """
        if v1.shape != v2.shape:
            raise ValueError(f"BYOL.loss: views differ in shape: {tuple(v1.shape)} vs {tuple(v2.shape)}")
        b = v1.shape[0]
        x = torch.cat((v1, v2), dim=0)
        q = self.predictor(self.projector(encode(x)))
        with torch.no_grad():
            t = self.target_projector(self.target_backbone(x)).detach()
        # View 1's prediction chases view 2's target and vice versa.
        t_swapped = torch.cat((t[b:], t[:b]), dim=0)
        return byol_loss(q, t_swapped)

    @torch.no_grad()
    def update_target(self, backbone_params: ParamsOrModule, momentum: float | None = None) -> None:
        """EMA step ``target <- m * target + (1 - m) * online`` on backbone and projector weights.

        Args:
            backbone_params: the online backbone, or its parameters by name (e.g. the trainer's
                theta dict). Extra names that are target *buffers* are ignored; buffers are not
                averaged (the target keeps its own BatchNorm statistics).
            momentum: ``m``; default the constructor's.

        Raises:
            ValueError: a target parameter is missing from ``backbone_params``, a name is unknown,
                or ``m`` is outside ``[0, 1]``.
        """
        m = self.momentum if momentum is None else float(momentum)
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"BYOL.update_target: momentum must lie in [0, 1], got {m}")
        online = _as_dict(backbone_params, "BYOL.update_target")
        target = dict(self.target_backbone.named_parameters())
        missing = sorted(set(target) - set(online))
        unknown = sorted(set(online) - set(target) - {n for n, _ in self.target_backbone.named_buffers()})
        if missing or unknown:
            raise ValueError(
                f"BYOL.update_target: backbone names do not match the target; missing "
                f"{missing[:5]}, unknown {unknown[:5]}"
            )
        t_list: list[Tensor] = [*target.values(), *self.target_projector.parameters()]
        o_list = [online[n].detach() for n in target] + [p.detach() for p in self.projector.parameters()]
        # lerp: t + (1 - m) (o - t) == m t + (1 - m) o, one fused pass per tensor list.
        torch._foreach_lerp_(t_list, o_list, 1.0 - m)

    @torch.no_grad()
    def reset_target(self, backbone: ParamsOrModule) -> None:
        """Copy the online backbone (parameters, and buffers when a module is given) and projector
        into the target network, as at the start of the BiSSL stage."""
        if isinstance(backbone, nn.Module):
            self.target_backbone.load_state_dict(backbone.state_dict())
        else:
            online = _as_dict(backbone, "BYOL.reset_target")
            target = dict(self.target_backbone.named_parameters())
            missing = sorted(set(target) - set(online))
            if missing:
                raise ValueError(f"BYOL.reset_target: parameters {missing[:5]} are missing")
            for name, t in target.items():
                t.copy_(online[name])
        self.target_projector.load_state_dict(self.projector.state_dict())
