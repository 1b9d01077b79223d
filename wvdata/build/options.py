"""The build options, declared once: `build()` takes them, the CLI derives its flags from them,
and dataset.json records them (a resume must use the same ones)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .._args import non_negative_int, parse_list, parse_size, positive_int
from .image import ImageOptions, option
from .layouts import LAYOUTS, SPLITS

DEFAULT_SHARD_BYTES = 256 * 1024 * 1024
SAMPLE_OVERHEAD = 1536  # tar headers + .cls + .json bytes per sample, for planning shard sizes


@dataclass(frozen=True)
class BuildOptions(ImageOptions):
    """Everything that decides a build's output bytes (with the input itself)."""

    layout: str = field(default="auto", metadata=option("crawl layout", choices=("auto",) + LAYOUTS))
    splits: tuple[str, ...] = field(default=SPLITS, metadata=option("comma-separated splits to build",
                                                                      parse_list))
    shard_size: int = field(default=DEFAULT_SHARD_BYTES, metadata=option(
        "target shard size in bytes (e.g. 256MB), planned from input sizes", parse_size))
    shard_samples: int | None = field(default=None, metadata=option("samples per shard instead", positive_int,
                                                                      metavar="N"))
    seed: int = field(default=0, metadata=option("seed of the shuffled shard assignment", non_negative_int))
    root: str | None = field(default=None, metadata=option(
        "manifest layout: every listed path must resolve inside this directory (absolute paths are "
        "otherwise allowed)", metavar="DIR"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "splits", tuple(self.splits))
        unknown = [s for s in self.splits if s not in SPLITS]
        if unknown:  # a typo would otherwise build an empty dataset
            raise ValueError(f"unknown split(s) {unknown}; choose from {list(SPLITS)}")

    @classmethod
    def of(cls, options: BuildOptions | None = None, **kwargs: Any) -> BuildOptions:
        """`options` with `kwargs` replaced; an unknown name is an error that lists the known ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown build option(s) {unknown}; known: {sorted(names)}")
        base = asdict(options) if options is not None else {}
        return cls(**{**base, **kwargs})

    def image(self) -> ImageOptions:
        """The part a worker needs for each image."""
        return ImageOptions(**{f.name: getattr(self, f.name) for f in fields(ImageOptions)})

    def recorded(self) -> dict[str, Any]:
        """As stored in dataset.json's `build` (splits are recorded per split instead)."""
        return {k: v for k, v in asdict(self).items() if k != "splits"}
