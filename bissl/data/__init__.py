"""Offline labelled image datasets (``load_dataset``) and their split container."""

from __future__ import annotations

from bissl.data.datasets import DATASETS, TASK_OPTIONS, load_dataset
from bissl.data.splits import (
    DatasetSplits,
    channel_stats,
    kfold_assignment,
    per_class_subset,
    resize_images,
    stratified_split,
)

__all__ = [
    "DATASETS",
    "TASK_OPTIONS",
    "DatasetSplits",
    "channel_stats",
    "kfold_assignment",
    "load_dataset",
    "per_class_subset",
    "resize_images",
    "stratified_split",
]
