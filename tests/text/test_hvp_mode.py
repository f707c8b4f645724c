"""Automatic HVP-mode choice on a tiny GPT: the chosen mode per attention path, and its HVP
against central finite differences of the gradient (float64)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from bissl.models.gpt import GPT
from bissl.ops import flatten, linearize_hvp
from bissl.ops import hvp_mode as hm
from bissl.ops.hvp_mode import HVPModeError, clear_hvp_mode_cache, select_hvp_mode
from bissl.tasks.pretext.gpt import GPTPretext


def _problem(**kw):
    torch.manual_seed(0)
    net = GPT(23, 6, dim=8, depth=1, heads=2, **kw).double()
    pretext = GPTPretext(8, 23).double()
    tokens = torch.randint(1, 23, (3, 6))
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}

    # Built like the trainer's lower loss: a closure over the modules, θ passed functionally.
    def make_loss():
        def lower_loss(params):
            def encode(*args, **kwargs):
                return functional_call(net, params, args, kwargs)

            return pretext.loss(encode, tokens)

        return lower_loss

    return make_loss, theta


def _grad_flat(loss_fn, theta):
    leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    grads = torch.autograd.grad(loss_fn(leaves), list(leaves.values()))
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize(
    "kw, expected",
    [
        ({"attention": "math"}, "fwdrev"),
        ({"attention": "sdpa_math"}, "fwdrev"),
        # A custom autograd.Function with a differentiable backward and no jvp.
        ({"attention": "recompute"}, "revrev"),
    ],
)
def test_selected_mode_matches_finite_differences(kw, expected):
    clear_hvp_mode_cache()
    make_loss, theta = _problem(**kw)
    loss_fn = make_loss()
    mode = select_hvp_mode(loss_fn, theta)
    assert mode == expected
    op = linearize_hvp(loss_fn, theta, mode=mode)
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(op.spec.numel, generator=gen, dtype=torch.float64)
    v /= torch.linalg.norm(v)  # unit step: the O(eps²) truncation error stays ~1e-10
    hv = op(v)
    eps = 1e-5
    grads = {}
    for sign in (1, -1):
        flat = flatten(theta, op.spec) + sign * eps * v
        sizes = [p.numel() for p in theta.values()]
        point = {k: chunk.view_as(p) for (k, p), chunk in zip(theta.items(), flat.split(sizes))}
        grads[sign] = _grad_flat(loss_fn, point)
    fd = (grads[1] - grads[-1]) / (2 * eps)
    assert torch.linalg.norm(hv - fd) <= 1e-7 * torch.linalg.norm(fd)


def test_fused_sdpa_has_no_hvp_and_says_why():
    clear_hvp_mode_cache()
    make_loss, theta = _problem(attention="sdpa")
    with pytest.raises(
        HVPModeError,
        match=r"fwdrev: NotImplementedError.*forward AD.*revrev: "
        r"RuntimeError.*autograd: RuntimeError.*'math'",
    ):
        select_hvp_mode(make_loss(), theta)


def test_candidates_order_and_validation():
    clear_hvp_mode_cache()
    make_loss, theta = _problem()
    assert select_hvp_mode(make_loss(), theta, candidates=("revrev", "fwdrev")) == "revrev"
    assert select_hvp_mode(make_loss(), theta, candidates=("autograd",)) == "autograd"
    with pytest.raises(ValueError, match="unknown modes"):
        select_hvp_mode(make_loss(), theta, candidates=("jvp",))
    with pytest.raises(ValueError, match="must not be empty"):
        select_hvp_mode(make_loss(), theta, candidates=())


def test_cached_per_model_not_per_closure(monkeypatch):
    clear_hvp_mode_cache()
    calls = []
    real = hm.probe_hvp_mode
    monkeypatch.setattr(hm, "probe_hvp_mode", lambda f, p, m: calls.append(m) or real(f, p, m))
    make_loss, theta = _problem()
    for _ in range(3):  # a fresh closure per upper step, as the trainer builds it
        assert select_hvp_mode(make_loss(), theta) == "fwdrev"
    assert calls == ["fwdrev"]
    # Another model (a new module object) is probed again, even with the same code and shapes.
    make_other, theta_other = _problem(attention="recompute")
    assert select_hvp_mode(make_other(), theta_other) == "revrev"
    assert calls == ["fwdrev", "fwdrev", "revrev"]


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"
            " -- out of memory"
        ),
    ],
    ids=["OutOfMemoryError", "RuntimeError-message"],
)
def test_out_of_memory_is_reraised_not_read_as_unsupported(monkeypatch, error):
    """Running out of memory says nothing about whether a mode is supported: falling through to
    the next candidate would hide it (the old behaviour chose 'revrev' here)."""
    clear_hvp_mode_cache()
    calls = []

    def probe(f, p, mode, fail=error):
        calls.append(mode)
        if mode == "fwdrev":
            raise fail

    monkeypatch.setattr(hm, "probe_hvp_mode", probe)
    make_loss, theta = _problem()
    with pytest.raises(type(error), match="out of memory"):
        select_hvp_mode(make_loss(), theta)
    assert calls == ["fwdrev"]
    # A missing derivative still moves on to the next candidate.
    calls.clear()
    clear_hvp_mode_cache()
    missing = RuntimeError("derivative for foo is not implemented")
    monkeypatch.setattr(hm, "probe_hvp_mode", lambda f, p, m: probe(f, p, m, missing))
    assert select_hvp_mode(make_loss(), theta) == "revrev"
