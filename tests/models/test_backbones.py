"""Tests for bissl.models: output shapes, parameter counts, BatchNorm type, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bissl.models import BACKBONES, BasicBlock, Bottleneck, build_backbone


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _small_cnn_count(c: int, w: int) -> int:
    """3x3 conv weights of the four blocks + (weight, bias) of each BatchNorm."""
    convs = 9 * (c * w + w * w + w * 2 * w + 2 * w * 2 * w)
    return convs + 2 * (w + w + 2 * w + 2 * w)


@pytest.mark.parametrize("in_channels, width, size", [(1, 32, 8), (3, 16, 32), (1, 48, 9)])
def test_small_cnn_shapes_and_count(in_channels, width, size):
    torch.manual_seed(0)
    m = build_backbone("small_cnn", in_channels=in_channels, width=width)
    out = m(torch.randn(5, in_channels, size, size))
    assert out.shape == (5, 2 * width) and m.out_dim == 2 * width
    assert _n_params(m) == _small_cnn_count(in_channels, width)
    assert 50_000 <= _n_params(build_backbone("small_cnn", in_channels=1)) <= 200_000


def test_resnet_param_counts():
    # Well-known totals: torchvision's resnet18 / resnet50 (11,689,512 / 25,557,032 parameters)
    # minus their 1000-way fc layers (513,000 / 2,049,000).
    assert _n_params(build_backbone("resnet18", in_channels=3)) == 11_689_512 - 513_000
    assert _n_params(build_backbone("resnet50", in_channels=3)) == 25_557_032 - 2_049_000
    # The small-input stem swaps the 7x7 conv (3*64*49 weights) for a 3x3 one (3*64*9).
    small = build_backbone("resnet18", in_channels=3, small_input=True)
    assert _n_params(small) == 11_176_512 - 3 * 64 * 49 + 3 * 64 * 9
    gray = build_backbone("resnet18", in_channels=1)
    assert _n_params(gray) == 11_176_512 - 2 * 64 * 49


def test_resnet_forward_shapes():
    torch.manual_seed(0)
    r18 = build_backbone("resnet18", in_channels=3, small_input=True)
    assert r18.out_dim == 512 and r18(torch.randn(2, 3, 16, 16)).shape == (2, 512)
    r50 = build_backbone("resnet50", in_channels=1)
    assert r50.out_dim == 2048
    with torch.no_grad():
        assert r50.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 2048)


def test_resnet_downsampling():
    # Standard stem: /4 then three stride-2 stages -> /32; small input: /8.
    feats = {}
    for small in (False, True):
        m = build_backbone("resnet18", in_channels=3, small_input=small)
        x = m.stem(torch.randn(2, 3, 32, 32))
        x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
        feats[small] = x.shape[-1]
    assert feats == {False: 1, True: 4}


def test_zero_init_residual_blocks_start_as_identity():
    torch.manual_seed(0)
    m = build_backbone("resnet18", in_channels=3, small_input=True, zero_init_residual=True).eval()
    block = m.layer1[0]
    assert isinstance(block, BasicBlock)
    x = torch.rand(2, 64, 6, 6)  # non-negative, as after a ReLU
    assert torch.allclose(block(x), x)
    m50 = build_backbone("resnet50", in_channels=3, zero_init_residual=True).eval()
    b50 = m50.layer2[1]
    assert isinstance(b50, Bottleneck)
    x = torch.rand(1, 512, 3, 3)
    assert torch.allclose(b50(x), x)


@pytest.mark.parametrize("name", BACKBONES)
def test_only_standard_batchnorm(name):
    m = build_backbone(name, in_channels=3)
    norms = [mod for mod in m.modules() if "Norm" in type(mod).__name__]
    assert norms and all(type(mod) is nn.BatchNorm2d for mod in norms)


def test_build_backbone_errors():
    with pytest.raises(ValueError) as err:
        build_backbone("vit_tiny", in_channels=3)
    for name in BACKBONES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="width"):
        build_backbone("resnet18", in_channels=3, width=4)
    with pytest.raises(ValueError, match="positive"):
        build_backbone("small_cnn", in_channels=0)
