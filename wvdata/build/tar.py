"""Deterministic WebDataset tar writing and the DALI `.idx` (wds2idx v1.2) text format.

Tar members get fixed mtime/uid/gid/mode so the same input gives byte-identical shards.
"""
from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

IDX_VERSION = "v1.2"


@dataclass(frozen=True)
class Member:
    """One tar member of a sample: extension, data offset, data size, member name.

    As in wds2idx, `offset` is where the member's data starts (its header is right before).
    """

    ext: str
    offset: int
    size: int
    name: str
    header_offset: int = -1


class ShardWriter:
    """Write samples (key -> {ext: bytes}) to a tar and remember each member's offset."""

    def __init__(self, fileobj: BinaryIO):
        self._f = fileobj
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples: list[tuple[str, list[Member]]] = []

    def write(self, key: str, parts: Sequence[tuple[str, bytes]]) -> list[Member]:
        members = []
        for ext, data in parts:
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            header = self._f.tell()
            self._tar.addfile(info, io.BytesIO(data))
            data_offset = self._f.tell() - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            members.append(Member(ext, data_offset, len(data), name, header))
        self.samples.append((key, members))
        return members

    def close(self) -> None:
        self._tar.close()


def idx_line(members: Iterable[Member]) -> str:
    """One sample's line of a wds2idx v1.2 index: `ext offset size name` per member."""
    return " ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in members)


def format_idx(lines: Sequence[str]) -> str:
    """The whole index text for the given sample lines (in the order they are read)."""
    return f"{IDX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)


def parse_idx(text: str) -> list[list[Member]]:
    """Parse a wds2idx v1.2 index back into members per sample."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith(IDX_VERSION + " "):
        raise ValueError(f"not a {IDX_VERSION} DALI index (header {lines[:1]!r})")
    count = int(lines[0].split()[1])
    out = []
    for line in lines[1 : 1 + count]:
        fields = line.split()
        if len(fields) % 4:
            raise ValueError(f"malformed index line: {line!r}")
        out.append([Member(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                    for i in range(0, len(fields), 4)])
    if len(out) != count:
        raise ValueError(f"index announces {count} samples but lists {len(out)}")
    return out


def write_atomic(path: str, data: bytes | str) -> None:
    """Write a file under a temporary name, fsync, then rename it into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    mode = "w" if isinstance(data, str) else "wb"
    with open(tmp, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
