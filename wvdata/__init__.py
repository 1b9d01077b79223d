"""wvdata: a data layer for training image models on large, noisy, web-crawled collections.

Public functions (each CLI command is a thin layer over one of them): `build`, `info`,
`open_dataset`, `view`, `dedup`, `loader` here; `wvdata.verify.verify`, `wvdata.embed.embed`,
`wvdata.curriculum.curriculum` and `wvdata.aum.aum` in their modules. `loader` loads lazily, so
building and curating never import torch.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from .build import build
from .dataset import Dataset, open_dataset
from .dedup import dedup
from .info import info
from .views import view

__all__ = ["build", "info", "open_dataset", "Dataset", "view", "loader", "dedup"]
__version__ = "0.1.0"

_LAZY = {"loader": "stream"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'wvdata' has no attribute {name!r}")
