"""Tests for bissl.tasks.augment: determinism, invariants, and each op against an exact answer."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

from bissl.tasks.augment import (
    PRESETS,
    TwoViewAugment,
    ViewConfig,
    blur_kernel_size,
    color_jitter,
    gaussian_blur,
    horizontal_flip,
    hsv_to_rgb,
    random_grayscale,
    random_resized_crop,
    rgb_to_hsv,
    solarize,
)

IDENTITY_VIEW = ViewConfig(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip_p=0.0,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
    solarize_p=0.0,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b: int, c: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, s, s, generator=_gen(seed))


@pytest.mark.parametrize("channels, size, preset", [(1, 8, "tiny"), (3, 8, "tiny"), (3, 32, "byol"), (1, 24, "byol")])
def test_two_views_deterministic_shapes_and_range(channels, size, preset):
    x = _images(16, channels, size)
    aug = TwoViewAugment(preset)
    a1, a2 = aug(x, _gen(7))
    b1, b2 = aug(x, _gen(7))
    c1, _ = aug(x, _gen(8))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, c1) and not torch.equal(a1, a2)
    for v in (a1, a2):
        assert v.shape == x.shape and v.dtype == x.dtype
        assert v.min() >= 0.0 and v.max() <= 1.0


def test_output_size_override():
    v1, v2 = TwoViewAugment("byol", size=20)(_images(4, 3, 32), _gen(0))
    assert v1.shape == v2.shape == (4, 3, 20, 20)


def test_preset_choice_and_settings():
    aug = TwoViewAugment("auto")
    assert aug.views(8) == PRESETS["tiny"] and aug.views(96) == PRESETS["byol"]
    byol1, byol2 = PRESETS["byol"]
    assert (byol1.blur_p, byol2.blur_p, byol1.solarize_p, byol2.solarize_p) == (1.0, 0.1, 0.0, 0.2)
    assert byol1.jitter == (0.4, 0.4, 0.2, 0.1) and byol1.jitter_p == 0.8 and byol1.grayscale_p == 0.2
    tiny1, _ = PRESETS["tiny"]
    assert tiny1.flip_p == 0.0 and tiny1.crop_scale == (0.6, 1.0)
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        TwoViewAugment("strong")


def test_normalisation_round_trip():
    mean, std = (0.3, 0.5, 0.2), (0.25, 0.2, 0.3)
    raw = _images(3, 3, 10)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    aug = TwoViewAugment(mean=mean, std=std, view1=IDENTITY_VIEW, view2=IDENTITY_VIEW)
    v1, v2 = aug((raw - m) / s, _gen(0))
    assert torch.allclose(v1, (raw - m) / s, atol=1e-5) and torch.allclose(v2, v1)
    with pytest.raises(ValueError, match="both mean and std"):
        TwoViewAugment(mean=mean)


def test_full_scale_crop_is_identity():
    x = _images(4, 3, 9)
    out = random_resized_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=_gen(0))
    assert torch.allclose(out, x, atol=1e-6)


def test_crop_geometry_on_a_ramp():
    # Bilinear sampling reproduces a linear ramp exactly between the outer pixel centres, so a crop
    # of half the side must halve its slope and stay inside the input's range. (The outermost
    # output pixels may sample beyond the first/last pixel centre, where the border is replicated.)
    size = 16
    ramp = torch.arange(size, dtype=torch.float64) / size
    x = ramp.view(1, 1, 1, size).expand(8, 1, size, size).contiguous()
    out = random_resized_crop(x, scale=(0.25, 0.25), ratio=(1.0, 1.0), generator=_gen(3))
    steps = out.diff(dim=-1)[..., 1:-1]
    assert torch.allclose(steps, torch.full_like(steps, 0.5 / size), atol=1e-12)
    assert out.min() >= x.min() and out.max() <= x.max()
    # The crop positions differ between images (random offsets).
    assert len({round(v, 9) for v in out[:, 0, 0, 0].tolist()}) > 1


def test_flip():
    x = _images(6, 1, 5)
    assert torch.equal(horizontal_flip(x, 1.0, generator=_gen(0)), x.flip(-1))
    assert torch.equal(horizontal_flip(x, 0.0, generator=_gen(0)), x)
    mixed = horizontal_flip(x, 0.5, generator=_gen(1))
    flipped = [torch.equal(mixed[i], x[i].flip(-1)) for i in range(6)]
    kept = [torch.equal(mixed[i], x[i]) for i in range(6)]
    assert all(f or k for f, k in zip(flipped, kept))


def test_hsv_matches_colorsys_and_round_trips():
    x = _images(2, 3, 4, seed=5).double()
    x[0, :, 0, 0] = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)  # gray: hue 0
    hsv = rgb_to_hsv(x)
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    expect = torch.tensor([colorsys.rgb_to_hsv(*p) for p in pixels], dtype=torch.float64)
    assert torch.allclose(hsv.permute(0, 2, 3, 1).reshape(-1, 3), expect, atol=1e-12)
    assert torch.allclose(hsv_to_rgb(hsv), x, atol=1e-12)


def test_color_jitter_single_factors():
    x = _images(5, 3, 6, seed=2).double() * 0.5  # no clipping at brightness <= 2x
    bright = color_jitter(x, 0.5, 0.0, 0.0, 0.0, p=1.0, generator=_gen(0))
    ratio = bright / x
    per_image = ratio.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=1e-12)
    assert ((per_image[:, 0] >= 0.5) & (per_image[:, 0] <= 1.5)).all()
    # Saturation blends each pixel with its luma: luma is kept, the chroma scales by one factor
    # per image (pixels in [0.4, 0.6] and factors in [0.5, 1.5] never clip).
    mid = 0.4 + 0.2 * _images(5, 3, 6, seed=3).double()
    sat = color_jitter(mid, 0.0, 0.0, 0.5, 0.0, p=1.0, generator=_gen(1))

    def luma(t):
        return (0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]).unsqueeze(1)

    assert torch.allclose(luma(sat), luma(mid), atol=1e-12)
    f = ((sat - luma(mid)) / (mid - luma(mid))).flatten(1)
    assert torch.allclose(f, f[:, :1].expand_as(f), atol=1e-9)
    assert ((f[:, 0] >= 0.5) & (f[:, 0] <= 1.5)).all() and not torch.allclose(f[:, 0], torch.ones(5, dtype=f.dtype))
    # Hue rotation keeps HSV saturation and value.
    hue = color_jitter(x, 0.0, 0.0, 0.0, 0.3, p=1.0, generator=_gen(2))
    assert torch.allclose(rgb_to_hsv(hue)[:, 1:], rgb_to_hsv(x)[:, 1:], atol=1e-9)
    assert not torch.allclose(hue, x)
    # p=0 draws nothing and returns the input; 1 channel skips saturation/hue without error.
    assert color_jitter(x, p=0.0, generator=_gen(0)) is x
    gray = color_jitter(_images(4, 1, 8), p=1.0, generator=_gen(0))
    assert gray.shape == (4, 1, 8, 8) and gray.min() >= 0 and gray.max() <= 1


def test_contrast_blends_towards_mean_luma():
    x = _images(4, 1, 6, seed=4).double()
    out = color_jitter(x, 0.0, 0.5, 0.0, 0.0, p=1.0, generator=_gen(0))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    # out - mean = f (x - mean) with one f per image (no clipping for f <= 1.5 around the mean).
    f = ((out - mean) / (x - mean)).flatten(1)
    unclipped = (out > 0).flatten(1) & (out < 1).flatten(1)
    for i in range(4):
        vals = f[i][unclipped[i]]
        assert torch.allclose(vals, vals[:1].expand_as(vals), atol=1e-9)


def test_grayscale():
    x = _images(3, 3, 5)
    g = random_grayscale(x, 1.0, generator=_gen(0))
    expect = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        assert torch.allclose(g[:, c], expect)
    one = _images(3, 1, 5)
    assert random_grayscale(one, 1.0, generator=_gen(0)) is one


def test_blur_kernel_sizes():
    assert [blur_kernel_size(s) for s in (8, 32, 96, 224)] == [3, 3, 9, 23]


@pytest.mark.parametrize("size, sigma, k", [(8, 0.7, 3), (12, 1.5, 5), (20, 1.2, None)])
def test_gaussian_blur_matches_scipy(size, sigma, k):
    from scipy import ndimage

    x = _images(2, 3, size, seed=1).double()
    out = gaussian_blur(x, 1.0, sigma=(sigma, sigma), kernel_size=k, generator=_gen(0))
    k = blur_kernel_size(size) if k is None else k
    offs = np.arange(k) - k // 2
    taps = np.exp(-(offs**2) / (2 * sigma**2))
    kernel2d = np.outer(taps, taps) / taps.sum() ** 2
    # torch's "reflect" padding (edge pixel not repeated) is scipy's "mirror" mode.
    expect = np.stack([[ndimage.correlate(img, kernel2d, mode="mirror") for img in imgs] for imgs in x.numpy()])
    assert np.allclose(out.numpy(), expect, atol=1e-12)


def test_gaussian_blur_keeps_constants_and_probability():
    x = torch.full((4, 1, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(x, 1.0, generator=_gen(0)), x)
    y = _images(4, 1, 8)
    assert gaussian_blur(y, 0.0, generator=_gen(0)) is y


def test_solarize():
    x = _images(3, 3, 6)
    out = solarize(x, 1.0, generator=_gen(0))
    assert torch.equal(out, torch.where(x >= 0.5, 1 - x, x))
    assert torch.equal(solarize(x, 0.0, generator=_gen(0)), x)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        random_resized_crop(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="scale"):
        random_resized_crop(torch.rand(1, 1, 8, 8), scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="kernel_size"):
        gaussian_blur(torch.rand(1, 1, 8, 8), 1.0, kernel_size=4)
    with pytest.raises(ValueError, match="hue"):
        color_jitter(torch.rand(1, 3, 8, 8), hue=0.7)
