"""Enumerate a raw crawl into input rows, whatever its layout (webvision, folder, manifest).

Rows that cannot even be attempted (malformed filelist lines, bad labels, duplicate paths,
paths escaping the source) come back as error rows, so every listed input is accounted for.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")
LAYOUTS = ("webvision", "folder", "manifest")
_SPLIT_DIRS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class InputRow:
    split: str
    src_path: str  # as listed, printable (undecodable bytes escaped)
    path: str  # filesystem path to open
    label: int
    source: str
    query: str = ""
    query_text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    meta_error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    key: str = ""


@dataclass
class ErrorRow:
    split: str
    src_path: str
    reason: str
    detail: str = ""


@dataclass
class Inputs:
    layout: str
    classes: list[str]
    rows: list[InputRow]
    errors: list[ErrorRow]
    class_descriptions: list[str] = field(default_factory=list)


def printable(name: str) -> str:
    """A file name as valid UTF-8 text: undecodable bytes shown as \\xNN escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def make_key(split: str, src_path: str) -> str:
    """Stable, dot-free, tar-safe key: split, a readable slug of the path, a 64-bit hash."""
    stem = src_path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    parent = src_path.rsplit("/", 2)[-2] if src_path.count("/") >= 1 else ""
    slug = _KEY_UNSAFE.sub("_", f"{parent}_{stem}" if parent else stem).strip("_")[-40:]
    digest = hashlib.sha1(f"{split}/{src_path}".encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{split}_{slug}_{digest}" if slug else f"{split}_{digest}"


def detect_layout(src: str | os.PathLike) -> str:
    p = Path(src)
    if p.is_file():
        return "manifest"
    if not p.is_dir():
        raise FileNotFoundError(f"source {src} does not exist")
    info = p / "info"
    if (info / "synsets.txt").is_file() or any(info.glob("train_filelist*.txt")):
        return "webvision"
    return "folder"


def _resolve_inside(root: Path, rel: str) -> str | None:
    """Absolute path of `rel` under `root`, or None when it escapes `root`."""
    if os.path.isabs(rel):
        return None
    full = os.path.normpath(os.path.join(root, rel))
    if full != str(root) and not full.startswith(str(root) + os.sep):
        return None
    return full


def _parse_label(text: str, num_classes: int | None) -> tuple[int | None, str]:
    try:
        label = int(text)
    except ValueError:
        return None, f"label {text!r} is not an integer"
    if label < 0 or (num_classes is not None and label >= num_classes):
        return None, f"label {label} out of range [0, {num_classes})"
    return label, ""


def _finish(inputs: Inputs) -> Inputs:
    """Reject paths listed twice and give every row a unique key."""
    seen: set[str] = set()
    keys: set[str] = set()
    rows = []
    for row in inputs.rows:
        if row.path in seen:
            inputs.errors.append(ErrorRow(row.split, row.src_path, "duplicate path",
                                          "listed more than once; the first listing is kept"))
            continue
        seen.add(row.path)
        key = make_key(row.split, row.src_path)
        n = 1
        while key in keys:  # 64-bit hash collision: practically never, handled anyway
            n += 1
            key = f"{make_key(row.split, row.src_path)}-{n}"
        keys.add(key)
        row.key = key
        rows.append(row)
    inputs.rows = rows
    return inputs


# ---------------------------------------------------------------- webvision


def _read_lines(path: Path) -> list[str]:
    return path.read_bytes().decode("utf-8", "backslashreplace").splitlines()


def _pick_root(src: Path, candidates: list[str], first_rel: str | None) -> Path:
    for name in candidates:
        root = src / name if name else src
        if first_rel is not None and (root / first_rel).exists():
            return root
    for name in candidates:
        if name and (src / name).is_dir():
            return src / name
    return src


class _MetaCache:
    """Meta JSON files (one per query) loaded once; a broken file is remembered as broken."""

    def __init__(self, src: Path):
        self.src = src
        self.cache: dict[str, list | str] = {}

    def record(self, rel: str, index: int) -> tuple[dict, str]:
        if rel not in self.cache:
            path = _resolve_inside(self.src / "meta", rel) or ""
            if not os.path.isfile(path):
                path = _resolve_inside(self.src, rel) or ""
            try:
                with open(path, "rb") as f:
                    data = json.loads(f.read().decode("utf-8", "replace"))
                self.cache[rel] = data if isinstance(data, list) else f"{rel} is not a JSON array"
            except FileNotFoundError:
                self.cache[rel] = f"meta file {rel} missing"
            except (OSError, ValueError) as e:
                self.cache[rel] = f"meta file {rel} unreadable: {type(e).__name__}"
        data = self.cache[rel]
        if isinstance(data, str):
            return {}, data
        if not 1 <= index <= len(data) or not isinstance(data[index - 1], dict):
            return {}, f"meta record {index} not in {rel}"
        return data[index - 1], ""


def _scan_webvision(src: Path, splits: tuple[str, ...]) -> Inputs:
    info = src / "info"
    classes, descriptions = [], []
    for line in _read_lines(info / "synsets.txt"):
        if line.strip():
            name, _, desc = line.strip().partition(" ")
            classes.append(name)
            descriptions.append(desc)
    queries: dict[tuple[str, int], str] = {}
    for source in ("google", "flickr"):
        qfile = info / f"queries_{source}.txt"
        if qfile.is_file():
            for line in _read_lines(qfile):
                qid, _, text = line.strip().partition(" ")
                if qid.isdigit():
                    queries[(source, int(qid))] = text
    inputs = Inputs("webvision", classes, [], [], descriptions)
    meta = _MetaCache(src)
    if "train" in splits:
        per_source = [s for s in ("google", "flickr") if (info / f"train_filelist_{s}.txt").is_file()]
        for tag in per_source or ["all"]:
            flist = info / f"train_filelist_{tag}.txt"
            if not flist.is_file():
                continue
            mfile = info / f"train_meta_list_{tag}.txt"
            metas = _read_lines(mfile) if mfile.is_file() else []
            lines = _read_lines(flist)
            first = next((ln.split()[0] for ln in lines if ln.split()), None)
            root = _pick_root(src, ["", "train_images_256", "train_images"], first)
            for i, line in enumerate(lines):
                _webvision_line(inputs, "train", line, f"{flist.name}:{i + 1}", root, src,
                                metas[i] if i < len(metas) else None, meta, queries)
    for split in ("val", "test"):
        flist = info / f"{split}_filelist.txt"
        if split not in splits or not flist.is_file():
            continue
        lines = _read_lines(flist)
        first = next((ln.split()[0] for ln in lines if ln.split()), None)
        root = _pick_root(src, [f"{split}_images_256", f"{split}_images", ""], first)
        for i, line in enumerate(lines):
            _webvision_line(inputs, split, line, f"{flist.name}:{i + 1}", root, src, None, meta, queries)
    return inputs


def _webvision_line(inputs: Inputs, split: str, line: str, where: str, root: Path, src: Path,
                    meta_line: str | None, meta: _MetaCache, queries: dict) -> None:
    if not line.strip():
        return
    fields = line.split()
    want = 1 if split == "test" else 2
    if len(fields) not in (want, 2) or (split != "test" and len(fields) != 2):
        inputs.errors.append(ErrorRow(split, line.strip(), "malformed filelist line",
                                      f"{where}: expected 'path label', got {line.strip()!r}"))
        return
    rel = fields[0]
    if split == "test" and len(fields) == 1:
        label, why = -1, ""
    else:
        label, why = _parse_label(fields[1], len(inputs.classes))
    if label is None:
        reason = "label out of range" if "out of range" in why else "bad label"
        inputs.errors.append(ErrorRow(split, rel, reason, f"{where}: {why}"))
        return
    full = _resolve_inside(root, rel)
    if full is None:
        inputs.errors.append(ErrorRow(split, rel, "path escapes source", f"{where}: {rel}"))
        return
    parts = rel.split("/")
    source = parts[0] if split == "train" and len(parts) >= 3 else "webvision"
    query = parts[1] if split == "train" and len(parts) >= 3 else ""
    qnum = int(query[1:]) if query[1:].isdigit() else -1
    row = InputRow(split, rel, full, label, source, query, queries.get((source, qnum), ""))
    if meta_line is not None:
        mf = meta_line.split()
        if len(mf) != 2 or not mf[1].isdigit():
            row.meta_error = f"malformed meta line {meta_line.strip()!r}"
        else:
            row.meta, row.meta_error = meta.record(mf[0], int(mf[1]))
    inputs.rows.append(row)


# ---------------------------------------------------------------- folder


def _scan_folder(src: Path, splits: tuple[str, ...]) -> Inputs:
    top = sorted(os.listdir(src))
    top_dirs = [d for d in top if (src / d).is_dir()]
    by_split = bool(top_dirs) and all(d.lower() in _SPLIT_DIRS for d in top_dirs)
    split_roots = ([(_SPLIT_DIRS[d.lower()], src / d) for d in top_dirs] if by_split
                   else [("train", src)])
    class_names = sorted({printable(c) for _, root in split_roots for c in os.listdir(root)
                          if (root / c).is_dir()})
    index = {c: i for i, c in enumerate(class_names)}
    inputs = Inputs("folder", class_names, [], [])
    if by_split:  # loose files next to the split folders belong to no split or class
        for name in top:
            if not (src / name).is_dir() and "train" in splits:
                inputs.errors.append(ErrorRow("train", printable(name), "not in a class folder",
                                              f"{printable(name)} is outside the split folders"))
    for split, root in split_roots:
        if split not in splits:
            continue
        for name in sorted(os.listdir(root)):
            if not (root / name).is_dir():
                rel = printable(str((root / name).relative_to(src)))
                inputs.errors.append(ErrorRow(split, rel, "not in a class folder", rel))
                continue
            for dirpath, dirnames, filenames in os.walk(root / name):
                dirnames.sort()
                for fname in sorted(filenames):
                    full = os.path.join(dirpath, fname)
                    rel = printable(os.path.relpath(full, src))
                    inputs.rows.append(InputRow(split, rel, full, index[printable(name)], "folder"))
    return inputs


# ---------------------------------------------------------------- manifest


def _scan_manifest(path: Path, splits: tuple[str, ...]) -> Inputs:
    import polars as pl

    suffix = path.suffix.lower()
    if suffix == ".csv":
        df = pl.read_csv(path, infer_schema=False)
    elif suffix in (".jsonl", ".ndjson"):
        df = pl.read_ndjson(path, infer_schema_length=None)
    elif suffix == ".parquet":
        df = pl.read_parquet(path)
    else:
        raise ValueError(f"manifest {path} must be .csv, .jsonl or .parquet")
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"manifest {path} lacks column(s) {sorted(missing)}; it needs path and label")
    root = path.parent.resolve()
    records = df.to_dicts()
    for rec in records:  # a float label column (pandas writes one when a label is missing)
        lab = rec.get("label")
        if isinstance(lab, float):
            rec["label"] = None if lab != lab else int(lab) if lab.is_integer() else lab
    names: dict[int, str] = {}
    for rec in records:
        lab, _ = _parse_label(str(rec.get("label")), None)
        if lab is not None and rec.get("class_name") not in (None, ""):
            names.setdefault(lab, str(rec["class_name"]))
    labels = [lab for rec in records if (lab := _parse_label(str(rec.get("label")), None)[0]) is not None]
    num_classes = max(labels) + 1 if labels else 0
    classes = [names.get(i, str(i)) for i in range(num_classes)]
    inputs = Inputs("manifest", classes, [], [])
    for i, rec in enumerate(records):
        split = _SPLIT_DIRS.get(str(rec.get("split") or "train").lower())
        rel = str(rec.get("path") or "")
        where = f"{path.name} row {i + 1}"
        if split is None:
            inputs.errors.append(ErrorRow("train", rel, "bad split", f"{where}: split {rec.get('split')!r}"))
            continue
        if split not in splits:
            continue
        if not rel:
            inputs.errors.append(ErrorRow(split, rel, "malformed manifest row", f"{where}: empty path"))
            continue
        raw_label = rec.get("label")
        label, why = (-1, "") if split == "test" and raw_label in (None, "", -1, "-1") \
            else _parse_label(str(raw_label), num_classes)
        if label is None:
            reason = "label out of range" if "out of range" in why else "bad label"
            inputs.errors.append(ErrorRow(split, rel, reason, f"{where}: {why}"))
            continue
        full = rel if os.path.isabs(rel) else _resolve_inside(root, rel)
        if full is None:
            inputs.errors.append(ErrorRow(split, rel, "path escapes source", f"{where}: {rel}"))
            continue
        extra = {k: v for k, v in rec.items() if k not in ("path", "label", "split")}
        inputs.rows.append(InputRow(split, rel, os.path.normpath(full), label,
                                    str(rec.get("source") or "manifest"), extra=extra))
    return inputs


def scan(src: str | os.PathLike, layout: str = "auto", splits: tuple[str, ...] = SPLITS) -> Inputs:
    """Enumerate the inputs of a raw crawl in a fixed, deterministic order."""
    layout = detect_layout(src) if layout == "auto" else layout
    p = Path(src).resolve()
    scanners = {"webvision": _scan_webvision, "folder": _scan_folder, "manifest": _scan_manifest}
    if layout not in scanners:
        raise ValueError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}")
    return _finish(scanners[layout](p, tuple(splits)))
