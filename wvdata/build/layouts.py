"""Enumerate a raw crawl into input rows, whatever its layout (webvision, folder, manifest).

Rows that cannot even be attempted (malformed filelist lines, bad labels, duplicate paths,
paths escaping the source) come back as error rows, so every listed input is accounted for.
A crawl at an fsspec URL (s3://bucket/crawl) is read through `_url.UrlPath`; its rows' paths
are URLs, and their sizes come from one listing.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._store import normalized_inside
from ..dataset import is_url
from ._url import UrlPath, check_source

SPLITS = ("train", "val", "test")
LAYOUTS = ("webvision", "folder", "manifest")
_SPLIT_DIRS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_LAST_FIELD = re.compile(r"^(.*?\S)\s+(\S+)$")  # (everything before the last field, the last field)


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
    size: int = -1  # bytes, when the listing told (URL crawls); else the build stats the file


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


def _source_path(src: str | os.PathLike) -> Path | UrlPath:
    return UrlPath(str(src)) if is_url(str(src)) else Path(src)


def detect_layout(src: str | os.PathLike) -> str:
    p = _source_path(src)
    if isinstance(p, UrlPath):
        if check_source(p) == "file":
            return "manifest"
    elif p.is_file():
        return "manifest"
    elif not p.is_dir():
        raise FileNotFoundError(f"source {src} does not exist")
    info = p / "info"
    if (info / "synsets.txt").is_file() or any(info.glob("train_filelist*.txt")):
        return "webvision"
    return "folder"


def _resolve_inside(root: Path | UrlPath, rel: str) -> str | None:
    """Absolute path (or URL) of `rel` under `root`, or None when it escapes `root`."""
    if isinstance(root, UrlPath):
        return None if rel.startswith("/") or "://" in rel else normalized_inside(f"{root}/{rel}", str(root))
    if os.path.isabs(rel):
        return None
    full = os.path.normpath(os.path.join(root, rel))
    if full != str(root) and not full.startswith(str(root) + os.sep):
        return None
    return full


def _parse_label(text: str, num_classes: int | None) -> tuple[int | None, str]:
    """An integer label from text; integer-valued decimals ("3.0") count, as in every format."""
    try:
        label = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value.is_integer():
            return None, f"label {text!r} is not an integer"
        label = int(value)
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


def _is_file(path: str) -> bool:
    return bool(path) and _source_path(path).is_file()


class _MetaCache:
    """Meta JSON files (one per query) loaded once; a broken file is remembered as broken."""

    def __init__(self, src: Path | UrlPath):
        self.src = src
        self.cache: dict[str, list | str] = {}

    def record(self, rel: str, index: int) -> tuple[dict, str]:
        if rel not in self.cache:
            path = _resolve_inside(self.src / "meta", rel) or ""
            if not _is_file(path):
                path = _resolve_inside(self.src, rel) or ""
            try:
                if not path:
                    raise FileNotFoundError(rel)
                data = json.loads(_source_path(path).read_bytes().decode("utf-8", "replace"))
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


def _scan_webvision(src: Path | UrlPath, splits: tuple[str, ...]) -> Inputs:
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
            first = next((m[1] for ln in lines if (m := _LAST_FIELD.match(ln.strip()))), None)
            root = _pick_root(src, ["", "train_images_256", "train_images"], first)
            for i, line in enumerate(lines):
                _webvision_line(inputs, "train", line, f"{flist.name}:{i + 1}", root, src,
                                metas[i] if i < len(metas) else None, meta, queries)
    for split in ("val", "test"):
        flist = info / f"{split}_filelist.txt"
        if split not in splits or not flist.is_file():
            continue
        lines = _read_lines(flist)
        first = next((ln.strip() for ln in lines if ln.strip()), None)
        if first and split != "test":
            first = m[1] if (m := _LAST_FIELD.match(first)) else first
        root = _pick_root(src, [f"{split}_images_256", f"{split}_images", ""], first)
        for i, line in enumerate(lines):
            _webvision_line(inputs, split, line, f"{flist.name}:{i + 1}", root, src, None, meta, queries)
    return inputs


def _webvision_line(inputs: Inputs, split: str, line: str, where: str, root: Path | UrlPath, src: Path | UrlPath,
                    meta_line: str | None, meta: _MetaCache, queries: dict) -> None:
    """One filelist line: `path label` (the label is the last field, the path may hold spaces)
    in train and val; in the test filelist, which has no labels, the whole line is the path."""
    text = line.strip()
    if not text:
        return
    m = _LAST_FIELD.match(text)
    if split == "test":
        rel, label_text = text, None
        if m and _parse_label(m[2], None)[0] is not None and not os.path.splitext(m[2])[1]:
            rel, label_text = m[1], m[2]  # a test list that carries labels anyway
    else:
        rel, label_text = (m[1], m[2]) if m else ("", "")
        if not rel:
            inputs.errors.append(ErrorRow(split, text, "malformed filelist line",
                                          f"{where}: expected 'path label', got {text!r}"))
            return
    if label_text is None:
        label, why = -1, ""
    else:
        label, why = _parse_label(label_text, len(inputs.classes))
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
    if meta_line is not None:  # `path index`: the index is the last field, the path may hold spaces
        mf = _LAST_FIELD.match(meta_line.strip())
        if not mf or not mf[2].isdigit():
            row.meta_error = f"malformed meta line {meta_line.strip()!r}"
        else:
            row.meta, row.meta_error = meta.record(mf[1], int(mf[2]))
    inputs.rows.append(row)


# ---------------------------------------------------------------- folder


def _inside(real_root: str, path: str) -> bool:
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _scan_folder(src: Path, splits: tuple[str, ...]) -> Inputs:
    """`SRC/<class>/...` or `SRC/<split>/<class>/...`. A class or sub-directory that is a link
    leading outside SRC is one `path escapes source` row (nothing outside SRC is listed); a
    link to a directory inside SRC is not followed (its target is scanned where it lies)."""
    real_src = os.path.realpath(src)
    top = sorted(os.listdir(src))
    top_dirs = [d for d in top if (src / d).is_dir()]
    by_split = bool(top_dirs) and all(d.lower() in _SPLIT_DIRS for d in top_dirs)
    split_roots = ([(_SPLIT_DIRS[d.lower()], src / d) for d in top_dirs] if by_split
                   else [("train", src)])
    inputs = Inputs("folder", [], [], [])

    def escapes(split: str, path: str) -> bool:
        if _inside(real_src, path):
            return False
        rel = printable(os.path.relpath(path, src))
        if split in splits:
            inputs.errors.append(ErrorRow(split, rel, "path escapes source", f"{rel} -> {os.path.realpath(path)}"))
        return True

    class_dirs: list[tuple[str, Path, str]] = []  # (split, root, class dir name), every split: one class list
    for split, root in split_roots:
        if escapes(split, str(root)):
            continue
        for name in sorted(os.listdir(root)):
            if not (root / name).is_dir():
                if split in splits:
                    rel = printable(str((root / name).relative_to(src)))
                    inputs.errors.append(ErrorRow(split, rel, "not in a class folder", rel))
            elif not escapes(split, str(root / name)):
                class_dirs.append((split, root, name))
    if by_split:  # loose files next to the split folders belong to no split or class
        for name in top:
            if not (src / name).is_dir() and "train" in splits:
                inputs.errors.append(ErrorRow("train", printable(name), "not in a class folder",
                                              f"{printable(name)} is outside the split folders"))
    inputs.classes = sorted({printable(name) for _, _, name in class_dirs})
    index = {c: i for i, c in enumerate(inputs.classes)}
    for split, root, name in class_dirs:
        if split not in splits:
            continue
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            for d in dirnames:  # os.walk does not follow these: account for them
                if os.path.islink(os.path.join(dirpath, d)) and not escapes(split, os.path.join(dirpath, d)):
                    rel = printable(os.path.relpath(os.path.join(dirpath, d), src))
                    inputs.errors.append(ErrorRow(split, rel, "not a file", f"{rel}: a link to a directory "
                                                  "inside the source, not followed"))
            for fname in sorted(filenames):
                full = os.path.join(dirpath, fname)
                rel = printable(os.path.relpath(full, src))
                inputs.rows.append(InputRow(split, rel, full, index[printable(name)], "folder"))
    return inputs


def _scan_folder_url(src: UrlPath, splits: tuple[str, ...]) -> Inputs:
    """The folder layout of a crawl in a bucket, from one listing: the same rules as on disk
    (a bucket has no links, so nothing can escape it)."""
    files = src.find()
    top_dirs = sorted({k.split("/", 1)[0] for k in files if "/" in k})
    by_split = bool(top_dirs) and all(d.lower() in _SPLIT_DIRS for d in top_dirs)
    inputs = Inputs("folder", [], [], [])
    class_files: dict[tuple[str, str], list[str]] = {}
    for key in sorted(files):
        parts = key.split("/")
        split, parts = (_SPLIT_DIRS[parts[0].lower()], parts[1:]) if by_split and len(parts) > 1 else \
            ("train", parts)
        if by_split and len(parts) == len(key.split("/")):  # a loose file next to the split folders
            if "train" in splits:
                inputs.errors.append(ErrorRow("train", key, "not in a class folder",
                                              f"{key} is outside the split folders"))
            continue
        if len(parts) == 1:
            if split in splits:
                inputs.errors.append(ErrorRow(split, key, "not in a class folder", key))
            continue
        class_files.setdefault((split, parts[0]), []).append(key)
    inputs.classes = sorted({name for _, name in class_files})
    index = {c: i for i, c in enumerate(inputs.classes)}
    for (split, name), keys in sorted(class_files.items()):
        if split in splits:
            inputs.rows += [InputRow(split, k, str(src / k), index[name], "folder", size=files[k]) for k in keys]
    return inputs


# ---------------------------------------------------------------- manifest


def _read_manifest(path: Path | UrlPath) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """(records, [(line number, why)] of unparseable JSONL lines); an empty or unparseable
    file is a one-line ValueError."""
    import polars as pl

    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson", ".parquet"):
        raise ValueError(f"manifest {path} must be .csv, .jsonl or .parquet")
    if (path.size() if isinstance(path, UrlPath) else path.stat().st_size) == 0:
        raise ValueError(f"manifest {path} is empty")
    bad: list[tuple[int, str]] = []
    try:
        data = io.BytesIO(path.read_bytes()) if isinstance(path, UrlPath) else path
        if suffix == ".csv":
            df = pl.read_csv(data, infer_schema=False)
        elif suffix == ".parquet":
            df = pl.read_parquet(data)
        else:  # line by line: one broken line is one error row, not a failed build
            records = []
            text = path.read_bytes().decode("utf-8", "replace")
            for i, line in enumerate(text.splitlines()):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    bad.append((i + 1, f"not JSON: {e}"))
                    continue
                if isinstance(rec, dict):
                    records.append(rec)
                else:
                    bad.append((i + 1, f"a JSON {type(rec).__name__}, not an object"))
    except (pl.exceptions.PolarsError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"manifest {path} is not a readable {suffix[1:]} file: {first}") from None
    if suffix in (".csv", ".parquet"):
        records = df.to_dicts()
    if not records and not bad:
        raise ValueError(f"manifest {path} has no rows")
    columns = set().union(*(r.keys() for r in records)) if records else set()
    missing = {"path", "label"} - columns
    if missing and records:
        raise ValueError(f"manifest {path} lacks column(s) {sorted(missing)}; it needs path and label")
    return records, bad


def _scan_manifest(path: Path | UrlPath, splits: tuple[str, ...], root_dir: str | None = None) -> Inputs:
    """CSV / JSONL / Parquet with `path`, `label`, optional `split`, `class_name`; relative paths
    are relative to the manifest and may not leave its folder; absolute paths are allowed (a
    manifest is the user's own document) unless `root_dir` is given: then every path must
    resolve inside it. A path may be a URL (s3://...); in a manifest at a URL, paths are keys
    relative to its folder, or URLs."""
    records, bad = _read_manifest(path)
    root = path.parent.resolve()
    url_root = root_dir if root_dir and is_url(root_dir) else None
    real_root = os.path.realpath(root_dir) if root_dir and not url_root else None
    if real_root and not os.path.isdir(root_dir):
        raise FileNotFoundError(f"--root {root_dir} is not a directory")
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
    inputs = Inputs("manifest", classes, [], [ErrorRow("train", f"{path.name}:{line}", "malformed manifest row",
                                                        f"{path.name} line {line}: {why}") for line, why in bad])
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
        if "\0" in rel:
            inputs.errors.append(ErrorRow(split, rel.replace("\0", "\\0"), "malformed manifest row",
                                          f"{where}: the path holds a NUL byte"))
            continue
        if is_url(rel):
            full = rel
        else:
            full = rel if os.path.isabs(rel) and not isinstance(root, UrlPath) else _resolve_inside(root, rel)
        outside = False
        if full is not None and url_root:
            full = normalized_inside(full, url_root) if is_url(full) else None
            outside = full is None
        elif full is not None and real_root and (is_url(full) or not _inside(real_root, full)):
            full, outside = None, True
        if full is None:
            inputs.errors.append(ErrorRow(split, rel, "path escapes source",
                                          f"{where}: {rel}" + (f" is not inside --root {root_dir}" if outside else "")))
            continue
        extra = {k: v for k, v in rec.items() if k not in ("path", "label", "split")}
        inputs.rows.append(InputRow(split, rel, full if is_url(full) else os.path.normpath(full), label,
                                    str(rec.get("source") or "manifest"), extra=extra))
    return inputs


def scan(src: str | os.PathLike, layout: str = "auto", splits: tuple[str, ...] = SPLITS,
         root: str | None = None) -> Inputs:
    """Enumerate the inputs of a raw crawl in a fixed, deterministic order.

    root: manifest layout only, every listed path must resolve inside this directory.
    """
    layout = detect_layout(src) if layout == "auto" else layout
    p = _source_path(src).resolve()
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}")
    if root and layout != "manifest":
        raise ValueError("--root applies to the manifest layout (a folder or webvision crawl is its own root)")
    if layout == "manifest":
        return _finish(_scan_manifest(p, tuple(splits), root))
    if isinstance(p, UrlPath):
        check_source(p)
        if layout == "folder":
            return _finish(_scan_folder_url(p, tuple(splits)))
        inputs = _scan_webvision(p, tuple(splits))
        sizes = p.find()  # one listing instead of a request per image
        for row in inputs.rows:
            row.size = sizes.get(row.path[len(str(p)) + 1:], 0)
        return _finish(inputs)
    return _finish((_scan_webvision if layout == "webvision" else _scan_folder)(p, tuple(splits)))
