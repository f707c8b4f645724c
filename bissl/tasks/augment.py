"""Batched image augmentations on tensors, and the BYOL-style two-view pipeline.

Every op takes ``(B, C, H, W)`` float images with pixels on the ``[0, 1]`` scale (1 or 3 channels,
any size), draws one independent random setting **per sample** from an explicit
``torch.Generator`` (the same generator state gives the same output) and keeps pixels in
``[0, 1]``. Random numbers are drawn on the generator's device (CPU by default) and moved to the
images' device, so a CPU generator makes CUDA augmentation reproducible too. Ops whose probability
is 0 draw nothing and return their input.

:class:`TwoViewAugment` produces the asymmetric pair used by BYOL and the BiSSL reference:
crop -> flip -> colour jitter (0.4, 0.4, 0.2, 0.1) w.p. 0.8 -> grayscale w.p. 0.2 -> Gaussian blur
(w.p. 1.0 in view 1, 0.1 in view 2) -> solarize (w.p. 0 in view 1, 0.2 in view 2). Presets:

* ``"byol"``: the published setting (crop scale (0.08, 1), blur sigma (0.1, 2) px, flip 0.5), for
  images of 32 px and more; the blur kernel is about 10% of the image side (23 px at 224, 9 at 96).
* ``"tiny"``: for images of at most 16 px such as the 8x8 digits. A (0.08, 1) crop of an 8x8 image
  keeps ~2x2 pixels, which erases the digit, so crops use scale (0.6, 1) and aspect (0.8, 1.25):
  sub-pixel zooms and shifts of up to ~1.7 px. Blur uses a 3-tap kernel with sigma (0.1, 0.6)
  (at most [0.17, 0.67, 0.17]). Flips are **off**: a mirrored digit is not a digit of the same
  class (2/5, 3, 7, 9 change shape), so flip invariance would teach the encoder a symmetry that the
  downstream task does not have. Colour jitter keeps only brightness and contrast on 1 channel.

Colour-jitter factors are applied in a fixed order (brightness, contrast, saturation, hue) rather
than in a random order per image: the order matters little and a fixed order keeps the op batched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from bissl.data import DatasetSplits

# ITU-R 601 luma weights: the usual RGB -> gray conversion.
_LUMA = (0.299, 0.587, 0.114)


def _check_images(x: Tensor, op: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{op}: expected images (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: expected floating-point images on [0, 1], got {x.dtype}")


def _rand(n: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """``(n,)`` uniform [0, 1) numbers from ``generator``, on ``like``'s device and dtype."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(n, generator=generator, device=device).to(device=like.device, dtype=like.dtype)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, like: Tensor) -> Tensor:
    return low + (high - low) * _rand(n, generator, like)


def _per_sample(mask: Tensor) -> Tensor:
    """``(B,)`` -> ``(B, 1, 1, 1)`` for broadcasting against images."""
    return mask.view(-1, 1, 1, 1)


def to_grayscale(x: Tensor) -> Tensor:
    """Luma of ``(B, 3, H, W)`` RGB images as ``(B, 1, H, W)``; 1-channel images returned as is."""
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise ValueError(f"to_grayscale: expected 1 or 3 channels, got {x.shape[1]}")
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """``(B, 3, H, W)`` RGB on [0, 1] -> HSV with hue in [0, 1) (hue 0 where the pixel is gray)."""
    r, g, b = x.unbind(dim=1)
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    delta = maxc - minc
    sat = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, torch.remainder(hue / 6.0, 1.0), torch.zeros_like(hue))
    return torch.stack((hue, sat, maxc), dim=1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv`: ``(B, 3, H, W)`` HSV (hue in [0, 1)) -> RGB on [0, 1]."""
    hue, sat, val = x.unbind(dim=1)
    h6 = torch.remainder(hue, 1.0) * 6.0
    sector = torch.floor(h6)
    frac = h6 - sector
    sector = sector.long().clamp_(0, 5).unsqueeze(1)
    p = val * (1.0 - sat)
    q = val * (1.0 - sat * frac)
    t = val * (1.0 - sat * (1.0 - frac))
    # Channel value for each of the six hue sectors (0: red..yellow, ..., 5: magenta..red).
    r = torch.stack((val, q, p, p, t, val), dim=1).gather(1, sector)
    g = torch.stack((t, val, val, q, p, p), dim=1).gather(1, sector)
    b = torch.stack((p, p, t, val, val, q), dim=1).gather(1, sector)
    return torch.cat((r, g, b), dim=1)


def random_resized_crop(
    x: Tensor,
    size: int | None = None,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Crop a random box per image and resize it to ``size x size`` (bilinear).

    The box covers a fraction ``U(scale)`` of the image area with aspect ratio (w/h) log-uniform
    in ``ratio``; its position is uniform. Boxes are continuous (sub-pixel), so even an 8x8 image
    gets small translations; a box that would exceed the image is clipped to it (which changes its
    aspect a little). Sampling is bilinear with border replication and no antialiasing, so crops
    should not be *shrunk* by much (``size`` near the input size or larger).

    Shapes:
        ``(B, C, H, W) -> (B, C, size, size)``; ``size`` defaults to ``H``.
    """
    _check_images(x, "random_resized_crop")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"random_resized_crop: scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"random_resized_crop: ratio must satisfy 0 < lo <= hi, got {ratio}")
    bsz, chans, height, width = x.shape
    size = height if size is None else size
    area = _uniform(bsz, scale[0], scale[1], generator, x) * (height * width)
    aspect = torch.exp(_uniform(bsz, math.log(ratio[0]), math.log(ratio[1]), generator, x))
    crop_w = torch.sqrt(area * aspect).clamp(max=width)
    crop_h = torch.sqrt(area / aspect).clamp(max=height)
    left = _rand(bsz, generator, x) * (width - crop_w)
    top = _rand(bsz, generator, x) * (height - crop_h)
    # affine_grid works in [-1, 1] coordinates (align_corners=False: -1 and 1 are the outer pixel
    # edges): scale by the box's relative size, translate to the box centre.
    theta = torch.zeros(bsz, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = crop_w / width
    theta[:, 0, 2] = 2.0 * (left + crop_w / 2) / width - 1.0
    theta[:, 1, 1] = crop_h / height
    theta[:, 1, 2] = 2.0 * (top + crop_h / 2) / height - 1.0
    grid = F.affine_grid(theta, [bsz, chans, size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)


def horizontal_flip(x: Tensor, p: float = 0.5, *, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each image left-right with probability ``p``."""
    _check_images(x, "horizontal_flip")
    if p <= 0.0:
        return x
    mask = _rand(x.shape[0], generator, x) < p
    return torch.where(_per_sample(mask), x.flip(-1), x)


def color_jitter(
    x: Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    p: float = 0.8,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random brightness, contrast, saturation and hue changes, each image w.p. ``p``.

    Factors per image: brightness and contrast ``U(1 - s, 1 + s)`` (floored at 0), saturation the
    same, hue shift ``U(-hue, hue)`` of a full turn (``hue <= 0.5``). Brightness scales the pixels;
    contrast blends with the image's mean luma; saturation blends with the pixel's luma; hue rotates
    in HSV space. Saturation and hue need colour and are skipped for 1-channel images.
    """
    _check_images(x, "color_jitter")
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"color_jitter: hue must lie in [0, 0.5], got {hue}")
    if min(brightness, contrast, saturation) < 0.0:
        raise ValueError(f"color_jitter: strengths must be >= 0, got {(brightness, contrast, saturation)}")
    if p <= 0.0:
        return x
    bsz = x.shape[0]
    apply = _rand(bsz, generator, x) < p
    colour = x.shape[1] == 3
    out = x
    if brightness > 0:
        f = _uniform(bsz, 1.0 - brightness, 1.0 + brightness, generator, x).clamp(min=0.0)
        out = (out * _per_sample(f)).clamp(0.0, 1.0)
    if contrast > 0:
        f = _per_sample(_uniform(bsz, 1.0 - contrast, 1.0 + contrast, generator, x).clamp(min=0.0))
        mean = to_grayscale(out).mean(dim=(1, 2, 3), keepdim=True)
        out = (f * out + (1.0 - f) * mean).clamp(0.0, 1.0)
    if colour and saturation > 0:
        f = _per_sample(_uniform(bsz, 1.0 - saturation, 1.0 + saturation, generator, x).clamp(min=0.0))
        out = (f * out + (1.0 - f) * to_grayscale(out)).clamp(0.0, 1.0)
    if colour and hue > 0:
        shift = _uniform(bsz, -hue, hue, generator, x).view(-1, 1, 1)
        hsv = rgb_to_hsv(out)
        hsv = torch.stack((torch.remainder(hsv[:, 0] + shift, 1.0), hsv[:, 1], hsv[:, 2]), dim=1)
        out = hsv_to_rgb(hsv).clamp(0.0, 1.0)
    return torch.where(_per_sample(apply), out, x)


def random_grayscale(x: Tensor, p: float = 0.2, *, generator: torch.Generator | None = None) -> Tensor:
    """Replace RGB images by their luma (kept 3-channel) w.p. ``p``; 1-channel images unchanged."""
    _check_images(x, "random_grayscale")
    if p <= 0.0 or x.shape[1] == 1:
        return x
    mask = _rand(x.shape[0], generator, x) < p
    return torch.where(_per_sample(mask), to_grayscale(x).expand_as(x), x)


def blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian kernel size of about 10% of the image side, at least 3 (23 at 224, 9 at 96)."""
    return max(3, 2 * int(0.05 * image_size) + 1)


def gaussian_blur(
    x: Tensor,
    p: float = 0.5,
    *,
    sigma: tuple[float, float] = (0.1, 2.0),
    kernel_size: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Separable Gaussian blur with ``sigma ~ U(sigma)`` pixels, each image w.p. ``p``.

    Args:
        kernel_size: odd tap count; default :func:`blur_kernel_size` of the smaller image side.
            Borders are reflected (replicated when the image is too small to reflect).
    """
    _check_images(x, "gaussian_blur")
    if not 0.0 < sigma[0] <= sigma[1]:
        raise ValueError(f"gaussian_blur: sigma must satisfy 0 < lo <= hi, got {sigma}")
    if p <= 0.0:
        return x
    bsz, chans, height, width = x.shape
    k = blur_kernel_size(min(height, width)) if kernel_size is None else kernel_size
    if k < 1 or k % 2 == 0:
        raise ValueError(f"gaussian_blur: kernel_size must be a positive odd int, got {k}")
    apply = _rand(bsz, generator, x) < p
    sig = _uniform(bsz, sigma[0], sigma[1], generator, x)
    offsets = torch.arange(k, dtype=x.dtype, device=x.device) - (k // 2)
    taps = torch.exp(-(offsets[None, :] ** 2) / (2.0 * sig[:, None] ** 2))
    taps = taps / taps.sum(dim=1, keepdim=True)  # (B, k)
    taps = taps.repeat_interleave(chans, dim=0)  # (B*C, k): one per channel
    pad = k // 2
    mode = "reflect" if pad < min(height, width) else "replicate"
    # Depthwise conv over B*C "channels" so every image gets its own kernel in one call.
    flat = x.reshape(1, bsz * chans, height, width)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode=mode), taps.view(-1, 1, 1, k), groups=bsz * chans)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode=mode), taps.view(-1, 1, k, 1), groups=bsz * chans)
    return torch.where(_per_sample(apply), flat.view_as(x).clamp(0.0, 1.0), x)


def solarize(x: Tensor, p: float = 0.2, *, threshold: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Invert pixels ``>= threshold`` (``v -> 1 - v``), each image w.p. ``p``."""
    _check_images(x, "solarize")
    if p <= 0.0:
        return x
    mask = _per_sample(_rand(x.shape[0], generator, x) < p)
    return torch.where(mask & (x >= threshold), 1.0 - x, x)


@dataclass(frozen=True)
class ViewConfig:
    """Settings of one augmented view (probabilities per image; sizes in pixels)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int | None = None
    solarize_p: float = 0.0


def augment_view(
    x: Tensor, cfg: ViewConfig, *, size: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """One view's pipeline (crop, flip, jitter, grayscale, blur, solarize) on ``[0, 1]`` images."""
    x = random_resized_crop(x, size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, generator=generator)
    x = horizontal_flip(x, cfg.flip_p, generator=generator)
    x = color_jitter(x, *cfg.jitter, p=cfg.jitter_p, generator=generator)
    x = random_grayscale(x, cfg.grayscale_p, generator=generator)
    x = gaussian_blur(x, cfg.blur_p, sigma=cfg.blur_sigma, kernel_size=cfg.blur_kernel, generator=generator)
    return solarize(x, cfg.solarize_p, generator=generator)


_BYOL_VIEW1 = ViewConfig(blur_p=1.0, solarize_p=0.0)
_TINY_VIEW1 = ViewConfig(
    crop_scale=(0.6, 1.0),
    crop_ratio=(0.8, 1.25),
    flip_p=0.0,
    blur_p=1.0,
    blur_sigma=(0.1, 0.6),
    blur_kernel=3,
    solarize_p=0.0,
)
#: (view 1, view 2) settings per preset; view 2 differs only in blur and solarize probability.
PRESETS: dict[str, tuple[ViewConfig, ViewConfig]] = {
    "byol": (_BYOL_VIEW1, replace(_BYOL_VIEW1, blur_p=0.1, solarize_p=0.2)),
    "tiny": (_TINY_VIEW1, replace(_TINY_VIEW1, blur_p=0.1, solarize_p=0.2)),
}
#: Images with side <= this use the "tiny" preset when the preset is "auto".
TINY_MAX_SIZE = 16


def resolve_preset(preset: str, image_size: int) -> str:
    """``"auto"`` -> ``"tiny"`` for images of at most 16 px, else ``"byol"``; others unchanged."""
    if preset == "auto":
        return "tiny" if image_size <= TINY_MAX_SIZE else "byol"
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; valid: auto, {', '.join(sorted(PRESETS))}")
    return preset


class TwoViewAugment:
    """BYOL-style asymmetric pair of augmented views of a batch.

    Args:
        preset: ``"byol"``, ``"tiny"`` or ``"auto"`` (by image size, decided per call).
        size: output side; default the input's.
        mean, std: per-channel normalisation of the input (as in ``DatasetSplits``). When given,
            inputs are de-normalised to ``[0, 1]`` (and clipped there), augmented, and normalised
            again; when None, inputs must already be ``[0, 1]`` pixels.
        view1, view2: override the preset's :class:`ViewConfig` of either view.

    Call: ``aug(x, generator) -> (v1, v2)``; ``x`` is ``(B, C, H, W)``, each view
    ``(B, C, size, size)``.
    """

    def __init__(
        self,
        preset: str = "auto",
        *,
        size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        view1: ViewConfig | None = None,
        view2: ViewConfig | None = None,
    ) -> None:
        resolve_preset(preset, 1)  # validate the name now
        if (mean is None) != (std is None):
            raise ValueError("TwoViewAugment: give both mean and std, or neither")
        if std is not None and min(std) <= 0:
            raise ValueError(f"TwoViewAugment: std must be positive, got {tuple(std)}")
        self.preset = preset
        self.size = size
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)
        self.view1 = view1
        self.view2 = view2

    @classmethod
    def for_dataset(cls, data: DatasetSplits, preset: str = "auto", **kwargs) -> TwoViewAugment:
        """Augmenter for a :class:`bissl.data.DatasetSplits` (uses its mean/std)."""
        return cls(preset, mean=data.mean, std=data.std, **kwargs)

    def views(self, image_size: int) -> tuple[ViewConfig, ViewConfig]:
        """The two view configurations used for images of side ``image_size``."""
        v1, v2 = PRESETS[resolve_preset(self.preset, image_size)]
        return (self.view1 or v1, self.view2 or v2)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        _check_images(x, "TwoViewAugment")
        if self.mean is not None:
            if len(self.mean) != x.shape[1]:
                raise ValueError(f"TwoViewAugment: {len(self.mean)} channel means for {x.shape[1]} channels")
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x * std + mean).clamp(0.0, 1.0)
        cfg1, cfg2 = self.views(min(x.shape[-2:]))
        v1 = augment_view(x, cfg1, size=self.size, generator=generator)
        v2 = augment_view(x, cfg2, size=self.size, generator=generator)
        if self.mean is not None:
            v1, v2 = (v1 - mean) / std, (v2 - mean) / std
        return v1, v2
