"""Small bilevel problems shared by the tests and the benchmarks (one definition, two users).

Each builder returns a :class:`BilevelProblem`: a lower (pretext-like) loss and an upper
(downstream-like) loss of the same backbone parameter dict, with live modules (a projector, a head)
captured by the closures, as in BiSSL.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from bissl.typing import LossFn, Params


@dataclass
class BilevelProblem:
    """A lower loss, an upper loss and the backbone point they share.

    Attributes:
        backbone: the module whose parameters form ``params`` (None when a ``bissl bench`` factory
            gave only the losses and the parameters).
        params: ``{name: Tensor}`` detached copy of the backbone parameters.
        lower_loss: ``L_P(θ)``, contrastive (NT-Xent) on two views through a projector.
        upper_loss: ``L_D(θ)``, cross-entropy through a linear head.
        modules: the captured trainable modules (projector, head).
    """

    backbone: nn.Module | None
    params: Params
    lower_loss: LossFn
    upper_loss: LossFn
    modules: dict[str, nn.Module]


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """SimCLR's NT-Xent over ``2B`` samples (both directions). ``z1, z2``: ``(B, D)``."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    n = z1.shape[0]
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def _problem(
    backbone: nn.Module,
    feat: int,
    x1: Tensor,
    x2: Tensor,
    y: Tensor,
    classes: int,
    proj_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> BilevelProblem:
    backbone = backbone.to(dtype=dtype, device=device)
    x1, x2, y = x1.to(device), x2.to(device), y.to(device)
    projector = nn.Sequential(nn.Linear(feat, proj_dim), nn.ReLU(), nn.Linear(proj_dim, proj_dim)).to(
        dtype=dtype, device=device
    )
    head = nn.Linear(feat, classes).to(dtype=dtype, device=device)
    buffers = dict(backbone.named_buffers())

    def encode(params: Params, x: Tensor) -> Tensor:
        return functional_call(backbone, {**params, **buffers}, (x,))

    def lower_loss(params: Params) -> Tensor:
        return nt_xent_loss(projector(encode(params, x1)), projector(encode(params, x2)))

    def upper_loss(params: Params) -> Tensor:
        return F.cross_entropy(head(encode(params, x1)), y)

    params = {k: p.detach().clone() for k, p in backbone.named_parameters()}
    return BilevelProblem(backbone, params, lower_loss, upper_loss, {"projector": projector, "head": head})


def mlp_problem(
    *, batch: int = 8, dim: int = 5, hidden: int = 6, dtype: torch.dtype = torch.float64, seed: int = 0
) -> BilevelProblem:
    """A tiny tanh MLP backbone (a few dozen parameters): dense Hessians are cheap."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
    x = torch.randn(batch, dim, generator=g, dtype=dtype)
    x2 = x + 0.1 * torch.randn(batch, dim, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (batch,), generator=g)
    return _problem(backbone, hidden, x, x2, y, 3, 4, dtype)


class SmallConvNet(nn.Module):
    """conv-BN-ReLU ×2 + global average pool: exercises conv double backward and BatchNorm."""

    def __init__(self, channels: int = 1, width: int = 4, norm: str = "batch"):
        super().__init__()

        def norm_layer(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(1, c)

        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            norm_layer(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            norm_layer(2 * width),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.out_dim = 2 * width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def cnn_problem(
    *,
    batch: int = 6,
    size: int = 6,
    width: int = 3,
    norm: str = "batch",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> BilevelProblem:
    """A tiny conv net with BatchNorm (train mode) on ``size×size`` images."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = SmallConvNet(1, width, norm)
    x = torch.randn(batch, 1, size, size, generator=g, dtype=dtype)
    x2 = x.flip(-1) + 0.1 * torch.randn(batch, 1, size, size, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (batch,), generator=g)
    return _problem(backbone, backbone.out_dim, x, x2, y, 3, 4, dtype)


def module_problem(
    backbone: nn.Module,
    *,
    feat: int,
    batch: int,
    image: tuple[int, ...],
    classes: int = 10,
    proj_dim: int = 128,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> BilevelProblem:
    """A problem around any image backbone (e.g. a ResNet-18 for benchmarks), on ``device``.

    Data and weights are drawn in float32 and cast, so the float64 problem is the float32 one
    evaluated exactly: the benchmarks measure each float32 route's error against it.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(batch, *image, generator=g)
    x2 = x.flip(-1) + 0.1 * torch.randn(batch, *image, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    return _problem(backbone, feat, x.to(dtype), x2.to(dtype), y, classes, proj_dim, dtype, device)


def dense_hessian(loss_fn: LossFn, params: Params) -> Tensor:
    """``(P, P)`` Hessian of ``loss_fn`` at ``params`` in dict order (tiny models only).

    Built column by column with ``torch.autograd.functional.hessian`` (no vmap): on torch 2.13,
    ``torch.func.hessian``/``jacrev(jacrev)`` return a wrong, asymmetric Hessian through train-mode
    ``batch_norm`` (measured: 3–24% relative error on :func:`cnn_problem`), so they are no oracle.
    """
    from bissl.ops.batchnorm import batchnorm_stats_frozen
    from bissl.ops.flat import flat_spec, flatten, unflatten

    spec = flat_spec(params)

    def flat_loss(theta: Tensor) -> Tensor:
        return loss_fn(unflatten(theta, spec))

    with batchnorm_stats_frozen():
        return torch.autograd.functional.hessian(flat_loss, flatten(params).detach(), vectorize=False)


class TinyTransformer(nn.Module):
    """A pre-norm causal transformer encoder with explicit attention (every HVP mode works).

    ``(B, T)`` token ids -> ``(B, T, dim)`` features. Attention is written with ``matmul`` and
    ``softmax`` rather than fused SDPA kernels, which lack forward-mode AD rules.
    """

    def __init__(self, vocab: int = 64, dim: int = 64, heads: int = 4, layers: int = 2, seq: int = 32):
        super().__init__()
        self.heads, self.out_dim = heads, dim
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, dim))
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(dim),
                    "qkv": nn.Linear(dim, 3 * dim),
                    "proj": nn.Linear(dim, dim),
                    "ln2": nn.LayerNorm(dim),
                    "fc1": nn.Linear(dim, 4 * dim),
                    "fc2": nn.Linear(4 * dim, dim),
                }
            )
            for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor) -> Tensor:
        b, t = tokens.shape
        h = self.embed(tokens) + self.pos[:t]
        mask = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)
        for blk in cast("Iterable[nn.ModuleDict]", self.blocks):
            q, k, v = blk["qkv"](blk["ln1"](h)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            att = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
            att = att.masked_fill(mask, float("-inf")).softmax(-1)
            h = h + blk["proj"]((att @ v).transpose(1, 2).reshape(b, t, -1))
            h = h + blk["fc2"](F.gelu(blk["fc1"](blk["ln2"](h))))
        return self.ln_f(h)


def transformer_problem(
    *,
    batch: int = 8,
    seq: int = 32,
    vocab: int = 64,
    dim: int = 64,
    layers: int = 2,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> BilevelProblem:
    """GPT-style bilevel problem: next-token loss (lower) and sequence classification (upper)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = TinyTransformer(vocab, dim, 4, layers, seq).to(dtype)
    lm_head = nn.Linear(dim, vocab).to(dtype)
    head = nn.Linear(dim, 2).to(dtype)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    y = torch.randint(0, 2, (batch,), generator=g)

    def lower_loss(params: Params) -> Tensor:
        h = functional_call(backbone, params, (tokens[:, :-1],))
        return F.cross_entropy(lm_head(h).reshape(-1, vocab), tokens[:, 1:].reshape(-1))

    def upper_loss(params: Params) -> Tensor:
        return F.cross_entropy(head(functional_call(backbone, params, (tokens,)).mean(1)), y)

    params = {k: p.detach().clone() for k, p in backbone.named_parameters()}
    return BilevelProblem(backbone, params, lower_loss, upper_loss, {"lm_head": lm_head, "head": head})


def reference_cnn(width: int = 32) -> nn.Module:
    """The ~1 M-parameter conv-BN-ReLU CNN of the CPU measurements in ``docs/method.md`` §5."""
    chans = [3, width, 2 * width, 4 * width, 4 * width, 8 * width]
    strides = [1, 2, 2, 1, 2]
    layers: list[nn.Module] = []
    for c_in, c_out, s in zip(chans[:-1], chans[1:], strides):
        layers += [nn.Conv2d(c_in, c_out, 3, s, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.out_dim = chans[-1]  # type: ignore[assignment]  # torch types module attributes as Tensor | Module
    return net


def named_problem(name: str, *, batch: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> BilevelProblem:
    """Benchmark problems by name: ``"reference_cnn"`` (32×32), ``"resnet18"`` (32×32, small-input
    stem), ``"transformer"`` (sequence 32). Deterministic: the same arguments give the same problem."""
    torch.manual_seed(seed)  # the backbone is built before module_problem seeds its data
    if name == "reference_cnn":
        net = reference_cnn(48)
        return module_problem(net, feat=cast(int, net.out_dim), batch=batch, image=(3, 32, 32), dtype=dtype, seed=seed)
    if name == "resnet18":
        from bissl.models import build_backbone

        net = build_backbone("resnet18", in_channels=3, small_input=True)
        return module_problem(net, feat=cast(int, net.out_dim), batch=batch, image=(3, 32, 32), dtype=dtype, seed=seed)
    if name == "transformer":
        return transformer_problem(batch=batch, dtype=dtype, seed=seed)
    raise ValueError(f"unknown problem {name!r}; choose reference_cnn, resnet18 or transformer")
