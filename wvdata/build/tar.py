"""Deterministic WebDataset tar writing and the DALI `.idx` (wds2idx v1.2) text format.

Tar members get fixed mtime/uid/gid/mode so the same input gives byte-identical shards. A tar
is a sequence of 512-byte-aligned members whose headers hold no offsets, so a shard can be
written as fragments made independently (one per chunk of images, in any process) and joined
in order: `TarFragment` makes one, `tar_end` closes the joined stream exactly as `tarfile` does.
"""
from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

IDX_VERSION = "v1.2"
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_ENCODING = "utf-8"  # what tarfile.open uses on Linux, with surrogateescape


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

    def shifted(self, base: int) -> Member:
        """The same member in a stream where this one's fragment starts at `base`."""
        return Member(self.ext, self.offset + base, self.size, self.name, self.header_offset + base)


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, _ENCODING, "surrogateescape")


class TarFragment:
    """Tar members (no end-of-archive blocks) in memory, with each member's offsets within it."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0

    def write(self, key: str, parts: Sequence[tuple[str, bytes]]) -> list[Member]:
        members = []
        for ext, data in parts:
            name = f"{key}.{ext}"
            header = _header(name, len(data))
            pad = -len(data) % _BLOCK
            start = self.size
            self._parts += [header, data, b"\0" * pad] if pad else [header, data]
            self.size += len(header) + len(data) + pad
            members.append(Member(ext, start + len(header), len(data), name, start))
        return members

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


def tar_end(size: int) -> bytes:
    """What closes a tar whose members take `size` bytes: two zero blocks, then zeros up to a
    whole record (tarfile's 20 blocks), as `tarfile.TarFile.close` writes."""
    end = 2 * _BLOCK
    return b"\0" * (end + (-(size + end) % _RECORD))


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
