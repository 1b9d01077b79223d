"""wvdata: a data layer for training image models on large, noisy, web-crawled collections.

Public functions (each CLI command is a thin layer over one of them):
`build`, `info`, `open_dataset`; later stages add `view`, `loader`, `dedup`, ...
"""
from __future__ import annotations

from .build import build
from .dataset import Dataset, open_dataset
from .info import info

__all__ = ["build", "info", "open_dataset", "Dataset"]
__version__ = "0.1.0"
