"""Flat parameter space: a module's parameters as views of one buffer; zero-copy dict <-> flat."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from bissl.ops.flat import flat_spec, flat_view, flatten, flatten_module_parameters_, unflatten


def _small_cnn() -> nn.Module:
    # Conv + BatchNorm (tiny tensors) + a tied pair of Linear weights.
    lin = nn.Linear(8, 8)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        lin,
        nn.ReLU(),
        nn.Linear(8, 8),
    )
    net[7].weight = lin.weight  # tied
    return net.double()


def test_module_parameters_become_views_of_one_buffer():
    net = _small_cnn()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    before = net(x)
    params_before = list(net.parameters())

    buffer, spec = flatten_module_parameters_(net)

    assert list(net.parameters()) == params_before  # same Parameter objects (optimizers keep working)
    assert buffer.dim() == 1 and buffer.numel() == sum(p.numel() for p in net.parameters())
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)
    item = buffer.element_size()
    for (name, p), off in zip(net.named_parameters(), spec.offsets):
        assert p.data_ptr() == buffer.data_ptr() + off * item, name
    # Tied weights stay tied: listed once, one slot in the buffer.
    assert sum(1 for n in spec.names if n.endswith("weight") and n[0] in "57") == 1
    assert net[7].weight is net[5].weight


def test_dict_and_flat_convert_without_copies():
    net = _small_cnn()
    buffer, spec = flatten_module_parameters_(net)
    params = dict(net.named_parameters())

    flat = flat_view(params, spec)
    assert flat.data_ptr() == buffer.data_ptr() and flat.shape == buffer.shape and not flat.requires_grad
    views = unflatten(buffer, spec)
    assert all(views[k].data_ptr() == params[k].data_ptr() for k in spec.names)
    detached = {k: v.detach() for k, v in params.items()}
    assert flatten(detached, spec).data_ptr() == buffer.data_ptr()
    # Writes through the flat view are the parameters' values.
    flat.mul_(0).add_(2.0)
    assert all(bool((p == 2.0).all()) for p in net.parameters())


def test_training_through_the_flat_buffer():
    net = _small_cnn()
    buffer, _ = flatten_module_parameters_(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    snapshot = buffer.clone()
    net(x).square().mean().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    opt.step()
    torch.testing.assert_close(buffer, snapshot - 0.1 * grads)


def test_flat_view_rejects_tensors_that_are_not_one_buffer():
    params = {"a": torch.randn(3), "b": torch.randn(2, 2)}
    with pytest.raises(ValueError, match="not views of one flat buffer"):
        flat_view(params)
    buf = torch.randn(10)
    swapped = {"b": buf[4:8].view(2, 2), "a": buf[:3]}
    with pytest.raises(ValueError, match="offset"):
        flat_view(swapped)
    with pytest.raises(ValueError, match="not contiguous"):
        flat_view({"a": buf[:9].view(3, 3).t()})


def test_flatten_module_parameters_validates():
    with pytest.raises(ValueError, match="no parameters"):
        flatten_module_parameters_(nn.ReLU())
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="single dtype/device"):
        flatten_module_parameters_(mixed)


def test_flat_spec_of_flattened_module_matches_named_parameters():
    net = _small_cnn()
    _, spec = flatten_module_parameters_(net)
    assert spec == flat_spec(dict(net.named_parameters()))
