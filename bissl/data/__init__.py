"""Offline labelled image datasets (``load_dataset``) and their split container."""

from __future__ import annotations

from bissl.data.datasets import DATASETS, load_dataset
from bissl.data.splits import DatasetSplits, channel_stats, resize_images, stratified_split

__all__ = [
    "DATASETS",
    "DatasetSplits",
    "channel_stats",
    "load_dataset",
    "resize_images",
    "stratified_split",
]
