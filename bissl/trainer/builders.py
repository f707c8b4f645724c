"""Models, optimizers, schedules and augmentations built from a :class:`~bissl.config.Config`.

One place for each construction so that every phase (and a resumed phase) builds the same objects
in the same order.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import Tensor, nn

from bissl.config import Config, ConfigError
from bissl.data import DatasetSplits
from bissl.data.text import TextData
from bissl.distributed.sharding import shard_of
from bissl.distributed.trainable import DataParallel
from bissl.models import build_backbone
from bissl.optim import cosine_with_warmup
from bissl.tasks.augment import TwoViewAugment, ViewConfig, augment_view, resolve_preset
from bissl.tasks.downstream import build_head
from bissl.tasks.pretext import build_pretext


@dataclass
class PipelineData:
    """The tensors every phase draws from (kept on the CPU; batches move to the device).

    Image runs (``task: vision``):

    Attributes:
        pretext_x: ``(N_p, C, H, W)`` normalised pretext images (labels unused).
        pretext_mean, pretext_std: their normalisation statistics (``[0, 1]`` pixel scale).
        train_x, train_y, val_x, val_y, test_x, test_y: downstream splits, ``(N, C, H, W)``, ``(N,)``.
        mean, std: downstream normalisation statistics.
        num_classes, in_channels, image_size: of the downstream set (the pretext set must match
            ``in_channels``; its images are resized to ``image_size`` by the loader config).

    Text runs (``task: text``, built by :meth:`from_text`): ``pretext_x`` is ``(N_p, seq_len)``
    int64 token rows, ``train_x``/``val_x``/``test_x`` are ``(N, max_length)`` int64 right-padded
    with ``pad_id``; ``vocab_size``, ``pad_id``, ``max_len`` (the longest sequence the backbone
    must accept) and ``tokenizer`` are set, the image fields are empty.
    """

    pretext_x: Tensor
    pretext_mean: tuple[float, ...]
    pretext_std: tuple[float, ...]
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    in_channels: int
    image_size: int
    task: str = "vision"
    vocab_size: int = 0
    pad_id: int = 0
    max_len: int = 0
    tokenizer: Any = None

    @classmethod
    def from_splits(cls, down: DatasetSplits, pretext: DatasetSplits | None = None) -> PipelineData:
        """Downstream splits, and the pretext images: the downstream set's own ``unlabelled``
        images when it has them, else the pretext set's train split (default: the downstream
        train split)."""
        if pretext is not None and down.unlabelled is not None:
            raise ValueError(f"dataset {down.name!r} brings its own pretext images; leave data.pretext_name unset")
        src = pretext if pretext is not None else down
        if src.in_channels != down.in_channels:
            raise ValueError(
                f"the pretext data has {src.in_channels} channels, the downstream data "
                f"{down.in_channels}; one backbone cannot take both"
            )
        train_x, train_y = down.train.tensors[:2]
        val_x, val_y = down.val.tensors[:2]
        test_x, test_y = down.test.tensors[:2]
        pretext_x = down.unlabelled if down.unlabelled is not None else src.train.tensors[0]
        return cls(
            pretext_x=pretext_x,
            pretext_mean=tuple(src.mean),
            pretext_std=tuple(src.std),
            train_x=train_x,
            train_y=train_y,
            val_x=val_x,
            val_y=val_y,
            test_x=test_x,
            test_y=test_y,
            mean=tuple(down.mean),
            std=tuple(down.std),
            num_classes=down.num_classes,
            in_channels=down.in_channels,
            image_size=down.image_size,
        )

    def to_dtype(self, dtype: torch.dtype) -> PipelineData:
        """The same data with floating-point tensors (images) in ``dtype`` (token ids stay int64)."""
        if dtype == torch.float32:
            return self
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in fields.items():
            if isinstance(value, Tensor) and value.is_floating_point():
                fields[name] = value.to(dtype)
        return PipelineData(**fields)

    @classmethod
    def from_text(cls, text: TextData) -> PipelineData:
        """Token tensors of a text experiment (:func:`bissl.data.text.load_text_data`)."""
        return cls(
            pretext_x=text.pretext_x,
            pretext_mean=(),
            pretext_std=(),
            train_x=text.train_x,
            train_y=text.train_y,
            val_x=text.val_x,
            val_y=text.val_y,
            test_x=text.test_x,
            test_y=text.test_y,
            mean=(),
            std=(),
            num_classes=text.num_classes,
            in_channels=0,
            image_size=0,
            task="text",
            vocab_size=text.vocab_size,
            pad_id=text.pad_id,
            max_len=max(text.pretext_x.shape[1], text.train_x.shape[1]),
            tokenizer=text.tokenizer,
        )


def _check_task(cfg: Config, data: PipelineData) -> None:
    if cfg.task != data.task:
        raise ConfigError(f"'task' is {cfg.task!r} but the loaded data is {data.task!r}")
    if cfg.task == "text" and cfg.model.backbone != "gpt":
        raise ConfigError(f"'model.backbone' is {cfg.model.backbone!r}; text runs need 'gpt'")
    if cfg.task == "vision" and cfg.model.backbone == "gpt":
        raise ConfigError("'model.backbone' 'gpt' takes token ids; set 'task: text'")


def build_backbone_from(cfg: Config, data: PipelineData, device: torch.device) -> nn.Module:
    """The configured backbone on ``device`` (channels_last when configured; images only)."""
    _check_task(cfg, data)
    try:
        if data.task == "text":
            # Sizes come from the data (tokenizer, sequence lengths); the rest from model.options.
            fixed = {"vocab_size": data.vocab_size, "max_len": data.max_len, "pad_id": data.pad_id}
            clash = sorted(set(fixed) & set(cfg.model.options))
            if clash:
                raise ValueError(f"options {clash} are set from the data/tokenizer; remove them")
            model = build_backbone(cfg.model.backbone, **fixed, **cfg.model.options)
        else:
            model = build_backbone(cfg.model.backbone, in_channels=data.in_channels, **cfg.model.options)
    except ValueError as err:
        raise ConfigError(f"'model': {err}") from None
    model = _sync_bn(cfg, model).to(device)
    if cfg.model.channels_last and data.task == "vision":
        # Module.to takes memory_format at run time; torch's overloads do not list it.
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def _sync_bn(cfg: Config, module: nn.Module) -> nn.Module:
    """``model.sync_bn`` with several ranks: BatchNorm layers normalise with global-batch
    statistics (:class:`bissl.distributed.syncbn.SyncBatchNorm`; same state-dict keys)."""
    if cfg.run.nproc > 1 and cfg.model.sync_bn:
        from bissl.distributed.syncbn import convert_sync_batchnorm

        return convert_sync_batchnorm(module)
    return module


def build_head_from(cfg: Config, backbone: nn.Module, data: PipelineData, device: torch.device) -> nn.Module:
    """A fresh downstream head (``finetune.head``) for ``backbone``'s features on ``device``."""
    head = build_head(cast(int, backbone.out_dim), data.num_classes, cfg.finetune.head)
    return _sync_bn(cfg, head).to(device)


def shard(batch: tuple[Tensor, ...], dp: DataParallel) -> tuple[Tensor, ...]:
    """This rank's contiguous shard of every tensor of a global batch (the batch itself on one
    process): rank ``r`` of ``N`` keeps rows ``[r·B/N, (r+1)·B/N)``."""
    if dp.world == 1:
        return tuple(batch)
    return shard_of(batch, dp.rank, dp.world)


def build_pretext_from(cfg: Config, backbone: nn.Module, device: torch.device) -> nn.Module:
    """The pretext head/loss module (SimCLR projector, BYOL projector + predictor + target, or
    the GPT language-model head)."""
    p = cfg.pretext
    if p.method == "gpt":
        module = build_pretext(
            "gpt",
            backbone=backbone,
            feat_dim=cast(int, backbone.out_dim),
            vocab_size=backbone.vocab_size,
            pad_id=backbone.pad_id,
        )
        return module.to(device)
    kwargs: dict[str, Any] = {"proj_dims": tuple(p.projector_dims)}
    if p.method == "simclr":
        kwargs.update(temperature=p.temperature, gather_negatives=p.gather_negatives)
    else:
        # "same-shape predictor": its hidden width is the projector's.
        kwargs.update(pred_hidden=p.projector_dims[0], momentum=p.byol_ema)
    module = build_pretext(p.method, backbone=backbone, feat_dim=cast(int, backbone.out_dim), **kwargs)
    return _sync_bn(cfg, module).to(device)


def _view_override(base: ViewConfig, overrides: dict[str, Any], key: str) -> ViewConfig:
    names = {f.name for f in dataclasses.fields(ViewConfig)}
    for name in overrides:
        if name not in names:
            raise ConfigError(f"unknown key '{key}.{name}'; ViewConfig fields: {', '.join(sorted(names))}")
    fixed: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return replace(base, **fixed)


class TokenBatch:
    """The "views" of a text pretext batch: the token rows themselves, as a 1-tuple.

    Next-token prediction needs no augmentation; the generator argument keeps the call signature
    of :class:`TwoViewAugment` (``views = build_two_view(cfg, data)(x, generator)``).
    """

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor]:
        if x.dim() != 2 or x.dtype != torch.int64:
            raise ValueError(f"TokenBatch: expected (B, T) int64 token ids, got {tuple(x.shape)} {x.dtype}")
        return (x,)


def build_two_view(cfg: Config, data: PipelineData) -> TwoViewAugment | TokenBatch:
    """The pretext "views" of a batch: two augmented views of images (de/normalising around the
    augmentation), or for text the token batch itself (:class:`TokenBatch`)."""
    if data.task == "text":
        return TokenBatch()
    a = cfg.pretext.augment
    preset = resolve_preset(a.preset, data.image_size)
    aug = TwoViewAugment(preset, mean=data.pretext_mean, std=data.pretext_std)
    v1, v2 = aug.views(data.image_size)
    aug.view1 = _view_override(v1, a.view1, "pretext.augment.view1")
    aug.view2 = _view_override(v2, a.view2, "pretext.augment.view2")
    return aug


class CropFlip:
    """Single-view augmentation for downstream batches: the pretext preset's crop and flip only.

    Images are de-normalised to ``[0, 1]`` pixels, cropped and flipped, and normalised again.
    """

    def __init__(self, cfg: Config, data: PipelineData) -> None:
        aug = build_two_view(cfg, data)
        assert isinstance(aug, TwoViewAugment) and aug.view1 is not None  # image tasks: views set
        crop = aug.view1
        self.view = ViewConfig(
            crop_scale=crop.crop_scale,
            crop_ratio=crop.crop_ratio,
            flip_p=crop.flip_p,
            jitter_p=0.0,
            grayscale_p=0.0,
            blur_p=0.0,
            solarize_p=0.0,
        )
        self.mean, self.std = data.mean, data.std

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        pixels = (x * std + mean).clamp(0.0, 1.0)
        return (augment_view(pixels, self.view, generator=generator) - mean) / std


def build_downstream_augment(cfg: Config, data: PipelineData) -> CropFlip | None:
    """``None`` (no augmentation) or :class:`CropFlip`, per ``finetune.augment`` (images only)."""
    if cfg.finetune.augment == "none":
        return None
    if data.task == "text":
        raise ConfigError(f"'finetune.augment' is {cfg.finetune.augment!r}; text runs support 'none'")
    return CropFlip(cfg, data)


def cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, final_factor: float = 0.0
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine schedule with linear warm-up; warm-up is capped at ``total_steps`` (tiny budgets)."""
    total = max(1, total_steps)
    return cosine_with_warmup(optimizer, total, min(warmup_steps, total), final_factor)


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """Whole optimizer steps in ``epochs`` epochs (fractional epochs round up)."""
    return math.ceil(epochs * steps_per_epoch - 1e-9)
