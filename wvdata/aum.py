"""`wvdata aum`: area under the margin per training sample, from one or more `--aum` runs.

The margin of a sample in an epoch is the logit of its label minus the largest other logit,
averaged over that epoch's visits (the trainer's `RUN/margins/epoch-NNN.parquet`). A sample's
AUM in a run is the mean of its margins over the recorded epochs (epochs before
`skip_epochs`, default 1, are ignored: the first epoch's margins say little); its AUM over
several runs is the mean over the runs that trained it on its own label. A wrong label keeps
a low or negative margin, so low AUM marks likely wrong labels (Pleiss et al., "Identifying
Mislabeled Data using the Area Under the Margin Ranking", 2020; the WebVision 2020 winner
dropped the 20% of training images with the lowest AUM for its next round).

Which samples are `flagged`:
- `drop_fraction=F`: the lowest F of the scored samples, globally or `per_class` (ties by key;
  the global rule flags exactly what `wvdata view --drop-aum F` drops).
- `threshold_percentile=P` (runs trained with `--aum-threshold-samples`): a run relabels
  N/(C+1) samples to a fake class C (`margins/threshold.parquet`: key, label, fake_label);
  being wrong by construction, their AUMs (margins w.r.t. the fake class) show what a wrong
  label looks like. A sample is flagged in a run when its AUM is below the P-th percentile of
  that run's threshold-sample AUMs, and flagged in the table only if flagged in every run that
  trained it on its own label (runs without threshold samples do not vote). A threshold
  sample gets no AUM from that run; train two runs with `--aum-threshold-part 0` and `1`
  (disjoint threshold sets) so every sample is judged by at least one.
- neither given: the threshold rule at the 99th percentile when every run has threshold
  samples (and `per_class` is off), else the lowest 20%.

Output `DATASET/annotations/aum.parquet`, one row per sample of the train split: key, label
(the dataset's), aum (null where n_epochs is 0), n_epochs (epochs with a margin w.r.t. the
sample's own label, summed over runs), flagged. A sample no run trained on its own label (a run
trained on a view, a threshold sample of every run) has n_epochs 0, a null aum and is never
flagged. Errors (one line each): a missing run or a run without margins; margin or threshold
keys that are not samples of the split, or labels that differ from the dataset's (a run of
another dataset); duplicate keys or non-finite margins in an epoch file. A run whose
config.json names another dataset path but whose keys and labels match is used, with a note.
All per-sample work is vectorised (numpy / polars): 16M samples x 30 epochs stream epoch by
epoch (see benchmarks/aum_bench.py).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from .dataset import Dataset, is_url, join, open_dataset, open_file
from .lock import dataset_lock

__all__ = ["aum", "compute_aum", "save", "write_table", "format_summary", "render_report", "AumResult",
           "DEFAULT_FRACTION", "DEFAULT_PERCENTILE", "add_cli"]

DEFAULT_FRACTION = 0.2
DEFAULT_PERCENTILE = 99.0
SPLIT = "train"
_EPOCH_FILE = re.compile(r"^epoch-(\d+)\.parquet$")
_SEEDS = (0xA0B, 0xB0A)  # of the two key hashes (join, check)


@dataclass
class AumResult:
    """The annotation table plus what the summary and the report show."""

    table: pl.DataFrame  # key, label, aum, n_epochs, flagged
    stats: dict[str, Any] = field(default_factory=dict)
    threshold_aum: np.ndarray = field(default_factory=lambda: np.zeros(0))  # threshold samples' AUMs, all runs


# ---------------------------------------------------------------- reading runs


def _listdir(path: str) -> list[str]:
    if is_url(path):
        import fsspec

        fs, _, (p,) = fsspec.get_fs_token_paths(path)
        return [os.path.basename(x.rstrip("/")) for x in fs.ls(p, detail=False)]
    return os.listdir(path.removeprefix("file://"))


def _read(path: str, columns: list[str]) -> pl.DataFrame:
    if not is_url(path):  # polars reads a local path itself (no copy of the file's bytes in memory)
        return pl.read_parquet(path.removeprefix("file://"), columns=columns)
    with open_file(path) as f:
        return pl.read_parquet(f, columns=columns)


def _epoch_files(run: str, skip_epochs: int) -> tuple[list[tuple[int, str]], int]:
    """(epoch, path) of the margins files used, and how many the run has."""
    try:
        names = _listdir(join(run, "margins"))
    except FileNotFoundError:
        names = None
    if names is None:
        what = "does not exist" if not _exists(run) else "has no margins/ (train it with --aum)"
        raise FileNotFoundError(f"run {run} {what}")
    epochs = sorted((int(m.group(1)), join(run, "margins", n)) for n in names if (m := _EPOCH_FILE.match(n)))
    if not epochs:
        raise FileNotFoundError(f"run {run} has no margins/epoch-NNN.parquet (train it with --aum)")
    used = [e for e in epochs if e[0] >= skip_epochs]
    if not used:
        raise ValueError(f"run {run}: all its {len(epochs)} epochs of margins are before --skip-epochs {skip_epochs}")
    return used, len(epochs)


def _exists(path: str) -> bool:
    if is_url(path):
        import fsspec

        fs, _, (p,) = fsspec.get_fs_token_paths(path)
        return fs.exists(p)
    return os.path.exists(path.removeprefix("file://"))


def _config(run: str) -> dict[str, Any]:
    try:
        with open_file(join(run, "config.json")) as f:
            return json.loads(f.read()).get("args", {})
    except (FileNotFoundError, ValueError, AttributeError):
        return {}


class _Keys:
    """Map keys to sample ids (rows of the split's samples.parquet), vectorised: a join on a 64-bit
    hash of the keys, checked with a second, independent 64-bit hash (a join on the strings
    themselves when the split's own keys collide)."""

    def __init__(self, keys: pl.Series, root: str) -> None:
        self.keys, self.root = keys, root
        self._frame: pl.DataFrame | None = None
        self._check: np.ndarray | None = None  # the second hash of the split's keys

    def ids(self, keys: pl.Series, where: str) -> np.ndarray | None:
        """Sample ids of `keys` (None: they are the split's keys in order, the trainer's full-split output)."""
        if keys.len() == self.keys.len() and keys.equals(self.keys, check_names=False):
            return None
        if self._frame is None:
            h = self.keys.hash(_SEEDS[0])
            if h.n_unique() == h.len():
                self._frame = pl.DataFrame({"h": h}).with_row_index("sample")
                self._check = self.keys.hash(_SEEDS[1]).to_numpy()
            else:
                self._frame = pl.DataFrame({"key": self.keys}).with_row_index("sample")
        col, probe = ("h", keys.hash(_SEEDS[0])) if self._check is not None else ("key", keys)
        got = pl.DataFrame({col: probe}).join(self._frame, on=col, how="left", maintain_order="left")["sample"]
        ids = got.fill_null(0).to_numpy().astype(np.int64)
        bad = got.is_null().to_numpy()
        if self._check is not None:
            bad |= self._check[ids] != keys.hash(_SEEDS[1]).to_numpy()  # a key outside the split, hashed like one in it
        if bad.any():
            first = keys.filter(pl.Series(bad))
            raise ValueError(f"{where}: {int(bad.sum())} keys are not samples of split {SPLIT!r} of {self.root} "
                             f"(e.g. {first[0]!r}); was the run trained on another dataset?")
        if np.bincount(ids, minlength=self.keys.len()).max(initial=0) > 1:
            raise ValueError(f"{where}: a key appears more than once")
        return ids


@dataclass
class _RunAum:
    aum: np.ndarray  # float64, nan where the run has no margin
    epochs: np.ndarray  # int32, epochs with a margin
    threshold: np.ndarray  # bool, the run's threshold samples (all False without them)
    has_threshold: bool
    info: dict[str, Any]


def _run_aum(run: str, index: _Keys, labels: np.ndarray, skip_epochs: int) -> _RunAum:
    """One run's AUM per sample: epoch files stream one at a time into per-sample sums."""
    files, n_files = _epoch_files(run, skip_epochs)
    n = len(labels)
    threshold = np.zeros(n, bool)
    expected = labels.copy()  # the label each sample was trained on
    thr_path = join(run, "margins", "threshold.parquet")
    has_thr = _exists(thr_path)
    if has_thr:
        thr = _read(thr_path, ["key", "label", "fake_label"])
        ids = index.ids(thr["key"], f"run {run} threshold.parquet")
        ids = np.arange(n) if ids is None else ids
        if (thr["label"].to_numpy() != labels[ids]).any():
            raise ValueError(f"run {run}: threshold.parquet labels differ from the dataset's; "
                             "was the run trained on another dataset?")
        threshold[ids] = True
        expected[ids] = thr["fake_label"].to_numpy()
    total = np.zeros(n, np.float64)
    epochs = np.zeros(n, np.int32)
    prev: tuple[pl.Series, np.ndarray] | None = None  # the last epoch's keys and ids, when not the split's own
    for epoch, path in files:
        prev = _add_epoch(path, f"run {run} epoch {epoch}", index, expected, total, epochs, prev)
    with np.errstate(invalid="ignore", divide="ignore"):
        run_aum = np.where(epochs > 0, total / np.maximum(epochs, 1), np.nan)
    cfg = _config(run)
    info = {"run": run, "epochs_used": [e for e, _ in files], "epochs_total": n_files,
            "with_margins": int((epochs > 0).sum()), "threshold_samples": int(threshold.sum()) if has_thr else None,
            "view": cfg.get("view"), "data": cfg.get("data"), "threshold_part": cfg.get("aum_threshold_part")}
    return _RunAum(run_aum, epochs, threshold, has_thr, info)


def _add_epoch(path: str, where: str, index: _Keys, expected: np.ndarray, total: np.ndarray, epochs: np.ndarray,
               prev: tuple[pl.Series, np.ndarray] | None) -> tuple[pl.Series, np.ndarray] | None:
    """Add one epoch file's margins to the per-sample sums (one epoch in memory at a time)."""
    m = _read(path, ["key", "label", "margin", "count"])
    keys = m["key"]
    same = prev is not None and keys.len() == prev[0].len() and keys.equals(prev[0], check_names=False)
    ids = prev[1] if same else index.ids(keys, where)
    margin = m["margin"].to_numpy().astype(np.float64)
    trained = m["label"].to_numpy()
    if not np.isfinite(margin).all():
        raise ValueError(f"{where}: {int((~np.isfinite(margin)).sum())} non-finite margins (training diverged?)")
    bad = trained != (expected if ids is None else expected[ids])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}: {int(bad.sum())} samples were trained on labels other than the dataset's "
                         f"(e.g. {keys[i]!r}: {trained[i]}); was the run trained on another dataset?")
    seen = m["count"].to_numpy() > 0
    if ids is None and seen.all():
        total += margin
        epochs += 1
        return None
    at = np.flatnonzero(seen) if ids is None else ids[seen]
    total[at] += margin[seen]
    epochs[at] += 1
    return None if ids is None else (keys, ids)


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


# ---------------------------------------------------------------- flags


def _lowest(table: pl.DataFrame, fraction: float, per_class: bool) -> np.ndarray:
    """Row mask of the lowest `fraction` of the scored rows (globally or per label), ties by key."""
    aum = table["aum"].to_numpy()
    rows = np.flatnonzero(~np.isnan(aum))
    label = table["label"].to_numpy()[rows] if per_class else np.zeros(len(rows), np.int64)
    value = aum[rows]
    order = np.lexsort((value, label))  # numeric sorts; the keys only where (label, aum) tie
    la, va = label[order], value[order]
    if ((la[1:] == la[:-1]) & (va[1:] == va[:-1])).any():
        order = (pl.DataFrame({"label": label, "aum": value, "key": table["key"].gather(rows)})
                 .select(pl.arg_sort_by(["label", "aum", "key"]))).to_series().to_numpy()
        la = label[order]
    _, start, count = np.unique(la, return_index=True, return_counts=True)
    pos = np.arange(len(order)) - np.repeat(start, count)
    take = pos < np.repeat(np.round(fraction * count), count)
    mask = np.zeros(table.height, bool)
    mask[rows[order[take]]] = True
    return mask


def compute_aum(dataset: str | os.PathLike | Dataset, runs: list[str | os.PathLike] | str | os.PathLike, *,
                skip_epochs: int = 1, drop_fraction: float | None = None, threshold_percentile: float | None = None,
                per_class: bool = False) -> AumResult:
    """AUM per sample of the train split from the runs' margins, and the flags of the chosen rule,
    without writing anything (the CLI prints `format_summary` of the result)."""
    t0 = time.perf_counter()
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    runs = [str(r) for r in ([runs] if isinstance(runs, (str, os.PathLike)) else runs)]
    if not runs:
        raise ValueError("no runs given")
    for i, r in enumerate(runs):
        if any(_same_path(r, o) for o in runs[:i]):
            raise ValueError(f"run {r} is given twice")
    if skip_epochs < 0:
        raise ValueError(f"skip_epochs must be >= 0, got {skip_epochs}")
    if drop_fraction is not None and threshold_percentile is not None:
        raise ValueError("give drop_fraction or threshold_percentile, not both")
    if drop_fraction is not None and not 0 <= drop_fraction < 1:
        raise ValueError(f"drop_fraction must be a fraction in [0, 1), got {drop_fraction}")
    if threshold_percentile is not None and not 0 < threshold_percentile <= 100:
        raise ValueError(f"threshold_percentile must be in (0, 100], got {threshold_percentile}")
    if per_class and threshold_percentile is not None:
        raise ValueError("per_class applies to drop_fraction only, not to the threshold-sample rule")
    ds.shards(SPLIT)  # a clear error when the dataset has no train split
    with open_file(join(ds.root, SPLIT, "samples.parquet")) as f:
        samples = pl.read_parquet(f, columns=["key", "label"])
    n = samples.height
    labels = samples["label"].to_numpy()
    index = _Keys(samples["key"], ds.root)

    per_run = []
    total, n_runs, n_epochs = np.zeros(n), np.zeros(n, np.int32), np.zeros(n, np.int32)
    for run in runs:
        r = _run_aum(run, index, labels, skip_epochs)
        own = (r.epochs > 0) & ~r.threshold
        total += np.where(own, r.aum, 0.0)
        n_runs += own
        n_epochs += np.where(own, r.epochs, 0).astype(np.int32)
        per_run.append(r)
    with_thr = [r for r in per_run if r.has_threshold]
    if drop_fraction is None and threshold_percentile is None:
        if with_thr and len(with_thr) == len(per_run) and not per_class:
            threshold_percentile = DEFAULT_PERCENTILE
        else:
            drop_fraction = DEFAULT_FRACTION
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(n_runs > 0, total / np.maximum(n_runs, 1), np.nan)
    table = pl.DataFrame({"key": samples["key"], "label": samples["label"],
                          "aum": pl.Series("aum", values, nan_to_null=True), "n_epochs": n_epochs})

    thr_aums = []
    if threshold_percentile is not None:
        if not with_thr:
            raise ValueError("the threshold rule needs runs trained with --aum-threshold-samples "
                             f"(none of {len(runs)} run(s) has margins/threshold.parquet); use --drop-fraction")
        votes, hits = np.zeros(n, np.int32), np.zeros(n, np.int32)
        for r in with_thr:
            fake = r.aum[r.threshold & (r.epochs > 0)]
            if not fake.size:
                raise ValueError(f"run {r.info['run']}: its threshold samples have no margins in the epochs used")
            cut = float(np.percentile(fake, threshold_percentile))
            r.info["threshold_aum"] = cut
            own = (r.epochs > 0) & ~r.threshold
            votes += own
            hits += own & (r.aum < cut)
            thr_aums.append(fake)
        flagged = (votes > 0) & (hits == votes)
        rule = (f"AUM below the {threshold_percentile:g}th percentile of the threshold samples' AUM, "
                "in every run that trained the sample on its own label")
    else:
        flagged = _lowest(table, drop_fraction, per_class)
        rule = f"lowest {drop_fraction:.0%} of the scored samples" + (" of each class" if per_class else "")
    table = table.with_columns(pl.Series("flagged", flagged))

    notes = []
    for r in per_run:
        data = r.info["data"]
        if data and os.path.isabs(str(data)) and not is_url(ds.root) and not _same_path(str(data), ds.root):
            notes.append(f"run {r.info['run']} was trained on {data} (config.json); its keys and labels match "
                         f"{ds.root}, so it is used")
    unscored = int((n_runs == 0).sum())
    if unscored:
        untrained = int(np.logical_and.reduce([r.epochs == 0 for r in per_run]).sum())
        why = ([f"{untrained} not trained in any run (a view?)"] if untrained else []) + (
            [f"{unscored - untrained} a threshold sample in every run that trained them (use "
             "--aum-threshold-part 0 and 1 on two runs)"] if unscored > untrained else [])
        notes.append(f"{unscored} samples have no AUM (aum null, n_epochs 0, never flagged): " + ", ".join(why))
    stats = {"samples": n, "scored": n - unscored, "flagged": int(flagged.sum()), "rule": rule,
             "drop_fraction": drop_fraction, "threshold_percentile": threshold_percentile, "per_class": per_class,
             "skip_epochs": skip_epochs, "runs": [r.info for r in per_run], "notes": notes,
             "classes": ds.classes, "seconds": time.perf_counter() - t0}
    return AumResult(table, stats, np.concatenate(thr_aums) if thr_aums else np.zeros(0))


# ---------------------------------------------------------------- writing, summary


def write_table(ds: Dataset, table: pl.DataFrame) -> str:
    """Write annotations/aum.parquet: to a temporary name, then rename into place."""
    return ds.write_annotation("aum", table)


def save(dataset: str | os.PathLike | Dataset, res: AumResult, report: str | os.PathLike | None = None) -> str:
    """Write the table (holding the dataset's lock) and render `report`; return the table's path."""
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    with dataset_lock(ds.root, "wvdata aum"):
        path = write_table(ds, res.table)
    if report:
        render_report(ds, res, report)
    return path


def aum(dataset: str | os.PathLike | Dataset, runs: list[str | os.PathLike] | str | os.PathLike, *,
        skip_epochs: int = 1, drop_fraction: float | None = None, threshold_percentile: float | None = None,
        per_class: bool = False, report: str | os.PathLike | None = None) -> pl.DataFrame:
    """Compute AUM from the runs (see `compute_aum` and the module docstring) and write
    DATASET/annotations/aum.parquet (plus a .png or .html `report`); return the table."""
    res = compute_aum(dataset, runs, skip_epochs=skip_epochs, drop_fraction=drop_fraction,
                      threshold_percentile=threshold_percentile, per_class=per_class)
    save(dataset, res, report)
    return res.table


def _class_shares(res: AumResult) -> pl.DataFrame:
    """Per class: scored, flagged, share; most-flagged first."""
    return (res.table.filter(pl.col("n_epochs") > 0).group_by("label")
            .agg(pl.len().alias("scored"), pl.col("flagged").sum().alias("flagged"))
            .with_columns((pl.col("flagged") / pl.col("scored")).alias("share"))
            .sort(["share", "flagged", "label"], descending=[True, True, False]))


def format_summary(res: AumResult, top: int = 5) -> str:
    """Flagged share overall and for the most-flagged classes, per-run details and notes."""
    s = res.stats
    classes = s.get("classes") or []
    lines = [f"aum: {s['samples']} samples of {SPLIT}, {s['scored']} with an AUM, {s['flagged']} flagged "
             f"({s['flagged'] / max(s['scored'], 1):.1%} of those with an AUM, "
             f"{s['flagged'] / max(s['samples'], 1):.1%} of the split)",
             f"  rule: {s['rule']}"]
    shares = _class_shares(res).filter(pl.col("flagged") > 0).head(top)
    if shares.height:
        lines.append("  most-flagged classes: " + ", ".join(
            f"{classes[c] if 0 <= c < len(classes) else c} {sh:.1%} ({f}/{n})" for c, n, f, sh in shares.iter_rows()))
    for r in s["runs"]:
        used = r["epochs_used"]
        part = (f", {r['threshold_samples']} threshold samples" + (
            f" (part {r['threshold_part']})" if r.get("threshold_part") is not None else "") + (
            f", AUM cut {r['threshold_aum']:.3f}" if "threshold_aum" in r else "")) if r["threshold_samples"] else ""
        lines.append(f"  run {r['run']}: epochs {used[0]}-{used[-1]} ({len(used)} of {r['epochs_total']}), "
                     f"{r['with_margins']} samples with margins" + (f", view {r['view']}" if r["view"] else "") + part)
    lines += [f"  note: {n}" for n in s["notes"]]
    lines.append(f"  computed in {s['seconds']:.1f}s")
    return "\n".join(lines)


# ---------------------------------------------------------------- report


def _histogram(res: AumResult, width: int = 760, height: int = 260):
    """AUM histogram (flagged part in red, threshold samples' AUMs as a line), cuts marked."""
    from PIL import Image, ImageDraw, ImageFont

    t = res.table.filter(pl.col("aum").is_not_null())
    vals, flag = t["aum"].to_numpy(), t["flagged"].to_numpy()
    cuts = [r["threshold_aum"] for r in res.stats["runs"] if "threshold_aum" in r]
    if not cuts and flag.any() and not res.stats["per_class"]:
        cuts = [float(vals[flag].max())]
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d, font = ImageDraw.Draw(img), ImageFont.load_default()
    left, right, top, bottom = 50, width - 10, 22, height - 30
    if not len(vals):
        d.text((left, top), "no sample has an AUM", fill=(0, 0, 0), font=font)
        return img
    extra = [*cuts, *([res.threshold_aum.min(), res.threshold_aum.max()] if res.threshold_aum.size else [])]
    lo, hi = float(min(vals.min(), *extra)), float(max(vals.max(), *extra))
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)
    edges = np.linspace(lo, hi, 61)
    all_c, _ = np.histogram(vals, edges)
    red_c, _ = np.histogram(vals[flag], edges)
    peak = max(int(all_c.max()), 1)
    bw = (right - left) / 60
    for i in range(60):
        x0, x1 = left + i * bw, left + (i + 1) * bw - 1
        y_all = bottom - (bottom - top) * all_c[i] / peak
        y_red = bottom - (bottom - top) * red_c[i] / peak
        d.rectangle([x0, y_all, x1, bottom], fill=(90, 130, 190))
        if red_c[i]:
            d.rectangle([x0, y_red, x1, bottom], fill=(200, 60, 60))
    if res.threshold_aum.size:
        fc, _ = np.histogram(res.threshold_aum, edges)
        pts = [(left + (i + 0.5) * bw, bottom - (bottom - top) * fc[i] / max(int(fc.max()), 1)) for i in range(60)]
        d.line(pts, fill=(230, 150, 0), width=2)
    x_of = lambda v: left + (right - left) * (v - lo) / (hi - lo)  # noqa: E731
    for c in cuts:
        x = x_of(c)
        for y in range(top, bottom, 6):
            d.line([(x, y), (x, min(y + 3, bottom))], fill=(120, 0, 0), width=2)
        d.text((x + 3, top), f"cut {c:.2f}", fill=(120, 0, 0), font=font)
    d.line([(left, bottom), (right, bottom)], fill=(0, 0, 0))
    d.line([(left, top), (left, bottom)], fill=(0, 0, 0))
    for v in np.linspace(lo, hi, 7):
        d.text((x_of(v) - 12, bottom + 4), f"{v:.2f}", fill=(0, 0, 0), font=font)
    d.text((4, top), str(peak), fill=(0, 0, 0), font=font)
    d.text((4, bottom - 10), "0", fill=(0, 0, 0), font=font)
    legend = f"AUM of {len(vals)} samples (red: {int(flag.sum())} flagged)"
    d.text((left, 4), legend + (", orange: threshold samples" if res.threshold_aum.size else ""),
           fill=(0, 0, 0), font=font)
    return img


def _grid_rows(ds: Dataset, res: AumResult, classes: int, per_row: int) -> list:
    """For the most-flagged classes: the lowest-AUM images with their given label."""
    from .grid import dataset_tile, short_key

    names = res.stats.get("classes") or ds.classes
    picked = _class_shares(res).head(classes)["label"].to_list()
    low = (res.table.filter(pl.col("aum").is_not_null() & pl.col("label").is_in(picked))
           .sort(["label", "aum", "key"]).group_by("label", maintain_order=True).head(per_row))
    with open_file(join(ds.root, SPLIT, "samples.parquet")) as f:
        loc = pl.read_parquet(f, columns=["key", "shard", "data_offset", "bytes"])
    low = low.join(loc, on="key", how="left")
    shares = {c: (f, n) for c, n, f, _ in _class_shares(res).iter_rows()}
    rows = []
    for label in picked:
        part = low.filter(pl.col("label") == label).sort(["aum", "key"])
        name = names[label] if 0 <= label < len(names) else str(label)
        tiles = [dataset_tile(ds, SPLIT, shard, off, size, f"{'FLAG' if fl else 'keep'} {a:+.2f}",
                              short_key(k), "bad" if fl else "normal")
                 for k, a, fl, shard, off, size in part.select("key", "aum", "flagged", "shard", "data_offset",
                                                               "bytes").iter_rows()]
        f, n = shares.get(label, (0, 0))
        rows.append((f"given label {label} ({name}): lowest AUM, {f} of {n} flagged", tiles))
    return rows


def render_report(dataset: str | os.PathLike | Dataset, res: AumResult, path: str | os.PathLike,
                  classes: int = 6, per_row: int = 8) -> str:
    """A histogram of AUM with the cut(s) marked above a grid of the lowest-AUM images of the
    most-flagged classes, captioned with their AUM; to one .png, or a self-contained .html."""
    from PIL import Image

    from .grid import render

    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    path = str(path)
    hist = _histogram(res)
    title = f"wvdata aum {ds.root}: {res.stats['rule']}"
    rows = _grid_rows(ds, res, classes, per_row)
    if path.lower().endswith((".html", ".htm")):
        render(rows, path, title)
        buf = io.BytesIO()
        hist.save(buf, format="PNG")
        img = f"<img alt='AUM histogram' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"
        with open(path, encoding="utf-8") as f:
            page = f.read()
        with open(path, "w", encoding="utf-8") as f:
            f.write(page.replace("</h2>", "</h2>" + img, 1))
        return path
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        render(rows, tmp, title)
        with Image.open(tmp) as g:
            grid = g.convert("RGB")
    finally:
        os.unlink(tmp)
    sheet = Image.new("RGB", (max(hist.width, grid.width), hist.height + grid.height), (255, 255, 255))
    sheet.paste(hist, (0, 0))
    sheet.paste(grid, (0, hist.height))
    sheet.save(path)
    return path


# ---------------------------------------------------------------- CLI


def _cli(args: argparse.Namespace) -> int:
    res = compute_aum(args.dataset, args.runs, skip_epochs=args.skip_epochs, drop_fraction=args.drop_fraction,
                      threshold_percentile=args.threshold_percentile, per_class=args.per_class)
    path = save(args.dataset, res, args.report)
    print(format_summary(res))
    print(f"wrote {path}" + (f" and {args.report}" if args.report else ""))
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `wvdata aum` on an argparse subparsers object (func=callable(args) -> exit code)."""
    p = subparsers.add_parser("aum", help="AUM per train sample from --aum runs; flag likely wrong labels",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="dataset directory (or fsspec URL)")
    p.add_argument("--runs", "--run", dest="runs", nargs="+", action="extend", required=True, metavar="RUN",
                   help="run directories trained with --aum on this dataset (repeatable); AUM is averaged over them")
    p.add_argument("--skip-epochs", type=int, default=1, metavar="K",
                   help="ignore the margins of epochs 0..K-1 (default: 1)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--drop-fraction", type=float, default=None, metavar="F",
                      help=f"flag the lowest F of the samples (default {DEFAULT_FRACTION} unless every run has "
                           "threshold samples)")
    rule.add_argument("--threshold-percentile", type=float, default=None, metavar="P",
                      help="flag AUM below the P-th percentile of the threshold samples' AUM, in every run that "
                           f"judges the sample (runs with --aum-threshold-samples; default {DEFAULT_PERCENTILE:g})")
    p.add_argument("--per-class", action="store_true", help="with --drop-fraction: the lowest F of each class")
    p.add_argument("--report", default=None, metavar="PATH",
                   help="AUM histogram + the lowest-AUM images of the most-flagged classes, to a .png or .html")
    p.set_defaults(func=_cli)
