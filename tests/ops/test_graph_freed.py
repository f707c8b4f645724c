"""Every HVP path frees its graph when the caller lets go of it.

A custom ``autograd.Function`` that saves a *view* of one of its outputs (rather than the output
itself) forms a reference cycle through the view's ``grad_fn`` that neither autograd nor Python's
garbage collector breaks: every linearisation's whole graph then stays alive (it cost ~170 MB per
hypergradient on the benchmark ViT through ``layer_norm``'s double backward before it was fixed).
Each rerouted op is run here on every HVP path, and a weak reference to the activation it reads
must die once the operator is dropped.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from bissl.hypergrad import implicit_hypergrad
from bissl.ops import hvp, linearize_hvp

F64 = torch.float64

#: op name -> (parameter shapes beyond the input projection, ``f(h, params) -> activation``);
#: ``h`` is ``(4, 6)`` or, for the image ops, ``(4, 2, 3, 3)``.
OPS: dict[str, tuple[dict[str, tuple[int, ...]], Callable[[Tensor, dict], Tensor]]] = {
    "linear": ({"w": (5, 6), "b": (5,)}, lambda h, p: F.linear(h, p["w"], p["b"])),
    "layer_norm": ({"w": (6,), "b": (6,)}, lambda h, p: F.layer_norm(h, (6,), p["w"], p["b"])),
    "gelu": ({}, lambda h, p: F.gelu(h)),
    "tanh": ({}, lambda h, p: torch.tanh(h)),
    "relu": ({}, lambda h, p: F.relu(h)),
    "silu": ({}, lambda h, p: F.silu(h)),
    "softmax": ({}, lambda h, p: torch.softmax(h, -1)),
    "conv2d": ({"w": (3, 2, 3, 3)}, lambda h, p: F.conv2d(h, p["w"], padding=1)),
    "batch_norm": (
        {"w": (2,), "b": (2,)},
        lambda h, p: F.batch_norm(h, None, None, p["w"], p["b"], training=True),
    ),
}
IMAGE_OPS = {"conv2d", "batch_norm"}


def _problem(op: str):
    """``(loss_fn, params, alive)``: ``alive()`` lists the activations of the last loss call still
    in memory."""
    shapes, f = OPS[op]
    g = torch.Generator().manual_seed(0)
    image = op in IMAGE_OPS
    x = torch.randn((4, 2, 3, 3) if image else (4, 6), generator=g, dtype=F64)
    params = {"proj": torch.randn((2, 2) if image else (6, 6), generator=g, dtype=F64)}
    params.update({k: torch.randn(s, generator=g, dtype=F64) for k, s in shapes.items()})
    refs: list[weakref.ref] = []

    def loss_fn(p: dict[str, Tensor]) -> Tensor:
        # The op's input depends on the parameters, so the op sits inside the differentiated graph.
        h = torch.einsum("nchw,dc->ndhw", x, p["proj"]) if image else x @ p["proj"]
        a = torch.tanh(h)
        out = f(a, p)
        refs.clear()
        refs.extend(weakref.ref(t) for t in (h, a, out))
        # ``a`` also feeds a second branch (a residual, as in a transformer block): autograd then
        # sums two gradients into it, adding in place into the op's input gradient — what turned
        # layer_norm's saved view of that gradient into a cycle.
        return (out * out).sum() + out.sum() + (a * a * a).sum()

    def alive() -> list[int]:
        gc.collect()
        return [i for i, r in enumerate(refs) if r() is not None]

    return loss_fn, params, alive


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("need_grad", [True, False], ids=["grad", "graph_only"])
def test_linearized_operator_frees_its_graph(op, need_grad):
    loss_fn, params, alive = _problem(op)
    H = linearize_hvp(loss_fn, params, need_grad=need_grad, fast_activations=True)
    H({k: torch.ones_like(t) for k, t in params.items()})
    assert alive(), "the test must see the activations alive while the operator holds its graph"
    del H
    assert alive() == [], f"{op}: the linearised graph outlived its operator (reference cycle)"


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("mode", ["revrev", "fwdrev", "autograd"])
def test_one_hvp_frees_its_graph(op, mode):
    loss_fn, params, alive = _problem(op)
    hvp(loss_fn, params, {k: torch.ones_like(t) for k, t in params.items()}, mode=mode)
    assert alive() == [], f"{op}/{mode}: an HVP's graph outlived the call (reference cycle)"


@pytest.mark.parametrize("solver", ["cg", "cg_layerwise"])
def test_hypergradient_frees_its_graphs(solver):
    loss_fn, params, alive = _problem("layer_norm")
    upper = lambda p: sum((t * t).sum() for t in p.values())  # noqa: E731
    implicit_hypergrad(loss_fn, upper, params, lam=1.0, damping=100.0, iters=3, solver=solver)
    assert alive() == []
