"""The task options of ``cfg.data`` each loader takes: one place that maps the config's data keys
to :func:`bissl.data.load_dataset` (images) or :func:`bissl.data.text.load_text_data` (text), and
refuses keys that belong to the other kind of task (they would otherwise be silently unused)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

#: Keys that only image tasks read, and only text tasks.
IMAGE_ONLY = ("labels_per_class", "pretext_classes", "downstream_classes")
TEXT_ONLY = ("folds",)


class DataKeys(Protocol):
    """The part of :class:`bissl.config.DataConfig` read here (read-only)."""

    @property
    def labels_per_class(self) -> int | None: ...
    @property
    def pretext_classes(self) -> Sequence[int] | None: ...
    @property
    def downstream_classes(self) -> Sequence[int] | None: ...
    @property
    def folds(self) -> int | None: ...
    @property
    def fold(self) -> int: ...


def _refuse(d: DataKeys, keys: Sequence[str], kind: str) -> None:
    given = [f"data.{k}" for k in keys if getattr(d, k) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not used by "
            f"{kind} tasks; remove {'it' if len(given) == 1 else 'them'}"
        )


def image_task_options(d: DataKeys) -> dict[str, Any]:
    """Keyword arguments of :func:`bissl.data.load_dataset` beyond the split fractions.

    Raises:
        ValueError: a text-only key is set.
    """
    _refuse(d, TEXT_ONLY, "image")
    if d.fold != 0:
        raise ValueError(f"data.fold is {d.fold} but k-fold splits exist for text tasks only")
    return {k: getattr(d, k) for k in IMAGE_ONLY}


def text_task_options(d: DataKeys) -> dict[str, Any]:
    """Keyword arguments of :func:`bissl.data.text.load_text_data` beyond the split fractions.

    Raises:
        ValueError: an image-only key is set.
    """
    _refuse(d, IMAGE_ONLY, "text")
    return {"folds": d.folds, "fold": d.fold}
