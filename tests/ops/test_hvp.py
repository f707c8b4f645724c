"""HVPs in every mode against the dense Hessian and finite differences (float64)."""

from __future__ import annotations

import pytest
import torch

from bissl.ops import flat_spec, flatten, hvp, hvp_batched, linearize_hvp, unflatten
from bissl.ops.hvp import HVP_MODES
from bissl.testing import cnn_problem, dense_hessian, mlp_problem

PROBLEMS = {"mlp": mlp_problem, "cnn_bn": cnn_problem, "cnn_gn": lambda: cnn_problem(norm="group")}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _random_like(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("mode", HVP_MODES)
def test_hvp_matches_dense_hessian(problem, mode):
    prob = PROBLEMS[problem]()
    v = _random_like(prob.params)
    H = dense_hessian(prob.lower_loss, prob.params)
    expected = H @ flatten(v)
    got = flatten(hvp(prob.lower_loss, prob.params, v, mode=mode))
    assert _rel(got, expected) <= 1e-10


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("mode", HVP_MODES)
def test_linearized_hvp_matches_dense_hessian_over_many_matvecs(problem, mode):
    prob = PROBLEMS[problem]()
    H = dense_hessian(prob.lower_loss, prob.params)
    op = linearize_hvp(prob.lower_loss, prob.params, mode=mode)
    for seed in range(3):  # reuse: the same linearization serves several matvecs
        v = flatten(_random_like(prob.params, seed))
        assert _rel(op(v), H @ v) <= 1e-10
    assert op.num_matvecs == 3


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_hvp_matches_central_finite_differences(problem):
    prob = PROBLEMS[problem]()
    spec = flat_spec(prob.params)
    theta = flatten(prob.params)
    v = flatten(_random_like(prob.params))
    v = v / v.norm()

    def grad_at(t):
        from bissl.hypergrad import upper_gradient

        return upper_gradient(prob.lower_loss, unflatten(t, spec))[1]

    eps = 1e-5
    with torch.no_grad():
        from bissl.ops import batchnorm_stats_frozen

        with batchnorm_stats_frozen():
            fd = (grad_at(theta + eps * v) - grad_at(theta - eps * v)) / (2 * eps)
    got = flatten(hvp(prob.lower_loss, prob.params, unflatten(v, spec)))
    assert _rel(got, fd) <= 1e-7


@pytest.mark.parametrize("mode", HVP_MODES)
def test_hvp_batched_equals_loop(mode):
    prob = cnn_problem()
    vs = [_random_like(prob.params, s) for s in range(3)]
    stacked = {k: torch.stack([v[k] for v in vs]) for k in prob.params}
    batched = hvp_batched(prob.lower_loss, prob.params, stacked, mode=mode)
    for i, v in enumerate(vs):
        one = hvp(prob.lower_loss, prob.params, v, mode="fwdrev")
        for k in one:
            torch.testing.assert_close(batched[k][i], one[k], rtol=1e-10, atol=1e-12)


def test_fast_conv_double_backward_matches_stock_autograd():
    prob = cnn_problem(width=4, size=7)
    v = flatten(_random_like(prob.params))
    fast = linearize_hvp(prob.lower_loss, prob.params, mode="revrev", fast_conv=True)(v)
    stock = linearize_hvp(prob.lower_loss, prob.params, mode="revrev", fast_conv=False)(v)
    assert _rel(fast, stock) <= 1e-12


def test_closure_over_trainable_modules_keeps_their_grads_clean():
    """Loss closures capture a projector/head with requires_grad params: no op may write .grad."""
    prob = cnn_problem()
    v = _random_like(prob.params)
    for mode in HVP_MODES:
        hvp(prob.lower_loss, prob.params, v, mode=mode)
        linearize_hvp(prob.lower_loss, prob.params, mode=mode)(flatten(v))
    for module in prob.modules.values():
        assert all(p.requires_grad and p.grad is None for p in module.parameters())


def test_hvp_rejects_bad_inputs():
    prob = mlp_problem()
    v = _random_like(prob.params)
    with pytest.raises(ValueError, match="unknown HVP mode"):
        hvp(prob.lower_loss, prob.params, v, mode="fwd")
    bad = dict(v)
    bad[next(iter(bad))] = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        hvp(prob.lower_loss, prob.params, bad)
    with pytest.raises(ValueError, match="keys"):
        hvp(prob.lower_loss, prob.params, dict(list(v.items())[1:]))
    with pytest.raises(ValueError, match="scalar"):
        linearize_hvp(lambda p: p[next(iter(p))] * 2, prob.params)
    with pytest.raises(ValueError, match="flat vector"):
        linearize_hvp(prob.lower_loss, prob.params)(torch.ones(3, dtype=torch.float64))


def test_unused_parameter_has_zero_hessian_rows():
    params = {"a": torch.randn(3, dtype=torch.float64), "unused": torch.randn(2, dtype=torch.float64)}
    loss = lambda p: (p["a"] ** 3).sum()  # noqa: E731
    v = {"a": torch.ones(3, dtype=torch.float64), "unused": torch.ones(2, dtype=torch.float64)}
    for mode in HVP_MODES:
        out = hvp(loss, params, v, mode=mode)
        torch.testing.assert_close(out["a"], 6 * params["a"])
        torch.testing.assert_close(out["unused"], torch.zeros(2, dtype=torch.float64))
        lin = linearize_hvp(loss, params, mode=mode).matvec_dict(v)
        torch.testing.assert_close(lin["unused"], torch.zeros(2, dtype=torch.float64))


def _central_difference_hvp(loss_fn, params, v, eps=1e-5):
    from bissl.hypergrad import upper_gradient

    spec = flat_spec(params)
    theta, d = flatten(params), flatten(v)
    scale = d.norm()
    grad = lambda t: upper_gradient(loss_fn, unflatten(t, spec))[1]  # noqa: E731
    return scale * (grad(theta + eps * d / scale) - grad(theta - eps * d / scale)) / (2 * eps)


def test_transformer_hvp_every_mode_and_the_fast_gelu_layernorm_path():
    """LayerNorm, GELU, softmax attention: every HVP mode and the linearised operator with and
    without the closed-form gelu/layer_norm second derivatives agree, and match central differences."""
    from bissl.testing import transformer_problem

    prob = transformer_problem(batch=3, seq=6, vocab=7, dim=8, layers=1, dtype=torch.float64)
    v = _random_like(prob.params)
    fd = _central_difference_hvp(prob.lower_loss, prob.params, v)
    results = {mode: flatten(hvp(prob.lower_loss, prob.params, v, mode=mode)) for mode in HVP_MODES}
    for fast in (True, False):
        results[f"linearized-fast={fast}"] = linearize_hvp(prob.lower_loss, prob.params, fast_gelu_layernorm=fast)(
            flatten(v)
        )
    ref = results["autograd"]
    assert _rel(ref, fd) <= 1e-7
    for name, got in results.items():
        assert _rel(got, ref) <= 1e-11, name


def test_need_grad_false_skips_gradient_values_but_not_the_hessian():
    prob = cnn_problem()
    v = flatten(_random_like(prob.params))
    full = linearize_hvp(prob.lower_loss, prob.params)
    lean = linearize_hvp(prob.lower_loss, prob.params, need_grad=False)
    assert full.grad is not None and lean.grad is None
    assert _rel(lean(v), full(v)) <= 1e-13
    assert _rel(lean(v), linearize_hvp(prob.lower_loss, prob.params, fast_conv=False)(v)) <= 1e-12


def test_graph_only_weight_gradients_do_not_leak_into_a_loss_that_takes_gradients():
    """A loss may call autograd itself (here: the norm of a conv weight gradient scales it); only
    the HVP's own create_graph backward skips weight-gradient values."""
    prob = cnn_problem()
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)

    def loss_fn(p):
        inner = torch.nn.functional.conv2d(x, p["net.0.weight"], padding=1).tanh().sum()
        (g_w,) = torch.autograd.grad(inner, p["net.0.weight"], create_graph=True)
        return prob.lower_loss(p) * g_w.detach().norm()

    v = flatten(_random_like(prob.params))
    lean = linearize_hvp(loss_fn, prob.params, need_grad=False)(v)
    stock = linearize_hvp(loss_fn, prob.params, fast_conv=False)(v)
    assert _rel(lean, stock) <= 1e-12


def test_fwdrev_refuses_saved_tensor_hooks():
    """Activation checkpointing recomputes inside the backward: forward-over-reverse refuses it
    (as torch.func does) and names the mode that works; revrev handles it."""
    from torch.utils.checkpoint import checkpoint

    prob = mlp_problem()
    loss_fn = lambda p: checkpoint(prob.lower_loss, p, use_reentrant=False)  # noqa: E731
    v = _random_like(prob.params)
    with pytest.raises(RuntimeError, match="revrev"):
        hvp(loss_fn, prob.params, v, mode="fwdrev")
    expected = hvp(prob.lower_loss, prob.params, v, mode="revrev")
    got = linearize_hvp(loss_fn, prob.params).matvec_dict(v)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-10, atol=1e-12)
