"""Ensembler: average fusion and genetic-algorithm model weights over many score files.

    python -m trainer.ensemble --runs runs/r50 runs/r101 'sweep/*' --data DATASET --out ens
    python -m trainer.ensemble --runs a=runs/x b=runs/y --data DATASET --out ens --space rank --method average

Each run (a run directory, or any directory holding val.npy + val_keys.parquet, optionally test.npy
+ test_keys.parquet) gives N x C softmax scores; rows are aligned by key to the dataset's val split,
whose labels come from DATASET. Val is split in two class-stratified, seeded halves: weights are
fitted on one and every figure is reported on the other. The GA (population, tournament selection,
uniform crossover, Gaussian mutation, elitism) maximises class-averaged top-5 (ties: top-1) of the
weighted sum, evaluated exactly on per-model top-K candidates (see trainer/_ga.py) so that 128 x
294k x 5,000 float16 files are read, memory-mapped, once per pass rather than once per candidate.

Writes OUT/weights.json, val.npy / test.npy (float16) + *_keys.parquet, predictions.csv (test key,
top-5 class ids), metrics.json ({models, average, ga}: held-out top-1/5, class top-1/5) and
config.json (arguments, split sizes, reduced-form statistics, GA history).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from ._ga import GAResult, Reduced, run_ga
from .metrics import class_averaged, topk_hits

SPACES = ("prob", "logits", "rank")
LOG_FLOOR = 1e-7
CHUNK_BYTES = 512 << 20  # float32 scores of all models held at once by a pass


class EnsembleError(ValueError):
    """Bad input: the CLI prints it as one line and exits 2."""


# ---------------------------------------------------------------- inputs


@dataclass
class Model:
    """One model's score files; `rows[split][i]` is the file row of the reference's row i (None: same order)."""

    name: str
    dir: Path
    splits: list[str]
    rows: dict[str, np.ndarray | None] = field(default_factory=dict)

    def path(self, split: str) -> Path:
        return self.dir / f"{split}.npy"


@dataclass
class Scores:
    """Aligned score files of several models: the input of `fuse`, `genetic_weights` and `evaluate`."""

    models: list[Model]
    keys: dict[str, np.ndarray]  # reference key order per split ("val", and "test" where every model has it)
    labels: np.ndarray  # val labels in that order (-1: unknown)
    num_classes: int

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def read(self, split: str, rows: np.ndarray | slice) -> np.ndarray:
        """Raw scores of `rows` (reference order) for every model: M x r x C float32. Each file is
        memory-mapped only for the read, so the pages it touched do not stay in this process."""
        n = len(self.keys[split])
        rows = np.arange(n)[rows] if isinstance(rows, slice) else np.asarray(rows)
        out = np.empty((len(self.models), len(rows), self.num_classes), np.float32)
        for j, m in enumerate(self.models):
            arr = np.load(m.path(split), mmap_mode="r")
            file_rows = rows if m.rows[split] is None else m.rows[split][rows]
            step = np.diff(file_rows)
            if len(file_rows) and (step == 1).all():  # a range: a slice of the mapping
                out[j] = arr[file_rows[0]:file_rows[-1] + 1]
            elif (step > 0).all():  # ascending rows (the fitted half): one gather
                out[j] = arr[file_rows]
            else:
                order = np.argsort(file_rows, kind="stable")
                out[j][order] = arr[file_rows[order]]
            del arr
        return out

    def chunk_rows(self, budget: int = CHUNK_BYTES) -> int:
        return max(1, budget // (4 * len(self.models) * self.num_classes))


def scores_dir(path: Path, spec: str) -> tuple[Path, Path]:
    """(run path used for naming, directory holding val.npy) for one --runs entry."""
    if path.is_file() and (path.parent / "val.npy").is_file():
        d = path.parent
        return (d.parent if d.name == "scores" else d), d
    if (path / "scores" / "val.npy").is_file():
        return path, path / "scores"
    if (path / "val.npy").is_file():
        return path, path
    what = "does not exist" if not path.exists() else "holds no scores/val.npy or val.npy"
    raise EnsembleError(f"{path}{'' if str(path) == spec else f' (from {spec})'} {what}")


def resolve_runs(specs: list[str]) -> list[tuple[str, Path]]:
    """--runs entries (paths, globs, NAME=PATH) -> [(model name, scores directory)] in the order given.
    Unnamed models are named by their path relative to the runs' common parent."""
    found: list[tuple[str | None, Path, Path]] = []
    for spec in specs:
        name, pattern = None, spec
        head, sep, tail = spec.partition("=")
        if sep and head and "/" not in head and not Path(spec).exists():
            name, pattern = head, tail
        paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not paths:
            raise EnsembleError(f"{spec}: the glob matches nothing")
        if name is not None and len(paths) > 1:
            raise EnsembleError(f"{spec}: NAME=PATH names one run, but the glob matches {len(paths)}")
        for p in paths:
            run, d = scores_dir(Path(p), spec)
            found.append((name, run.resolve(), d))
    unnamed = [str(run) for name, run, _ in found if name is None]
    common = os.path.commonpath(unnamed) if unnamed else ""
    out: dict[str, Path] = {}
    for name, run, d in found:
        if name is None:
            name = os.path.relpath(run, common)
            name = run.name if name == "." else name
        same = [n for n, x in out.items() if x.resolve() == d.resolve()]
        if same:
            raise EnsembleError(f"{d} is given twice (as {same[0]!r} and {name!r})")
        if name in out:
            raise EnsembleError(f"two models are named {name!r} ({out[name]} and {d}); name them with NAME=PATH")
        out[name] = d
    return list(out.items())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def labels_from_dataset(data: str | os.PathLike) -> tuple[dict[str, np.ndarray], np.ndarray, int, dict[str, set]]:
    """(reference keys per split, val labels, class count, lazy lookup of other splits' keys) of a dataset."""
    import wvdata

    try:
        ds = wvdata.open_dataset(data)
        num_classes = ds.num_classes
    except (FileNotFoundError, ValueError) as e:
        raise EnsembleError(str(e)) from None
    if "val" not in ds.splits:
        raise EnsembleError(f"dataset {data} has no val split (its splits: {', '.join(ds.splits)})")
    val = ds.samples("val").select("key", "label")
    keys = {"val": val["key"].to_numpy()}
    if "test" in ds.splits:
        keys["test"] = ds.samples("test")["key"].to_numpy()
    return keys, val["label"].to_numpy().astype(np.int64), num_classes, _OtherSplits(ds)


class _OtherSplits(dict):
    """Keys of every split of a dataset, read only when an error message needs them."""

    def __init__(self, ds) -> None:
        super().__init__()
        self.ds = ds

    def __missing__(self, split: str) -> set:
        self[split] = set(self.ds.samples(split)["key"].to_list()) if split in self.ds.splits else set()
        return self[split]


def align(model: Model, split: str, ref: np.ndarray | None, num_classes: int,
          other_splits: dict[str, set] | None = None) -> np.ndarray:
    """Check one model's {split}.npy against its keys and the reference keys; set model.rows[split].
    Returns the file's keys (the reference for test where the dataset has none)."""
    npy, kp = model.path(split), model.dir / f"{split}_keys.parquet"
    if not kp.is_file():
        raise EnsembleError(f"{kp} is missing (needed beside {npy})")
    try:
        keys = pl.read_parquet(kp, columns=["key"])["key"].cast(pl.String)
    except Exception as e:  # noqa: BLE001 - polars raises several kinds for a bad or foreign file
        raise EnsembleError(f"{kp}: not a keys table with a `key` column ({_first_line(e)})") from None
    try:
        arr = np.load(npy, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise EnsembleError(f"{npy}: unreadable ({_first_line(e)})") from None
    if arr.ndim != 2 or arr.dtype.kind != "f":
        raise EnsembleError(f"{npy}: expected an N x C float array, got shape {arr.shape} {arr.dtype}")
    if arr.shape[1] != num_classes:
        raise EnsembleError(f"{npy}: {arr.shape[1]} classes, but the dataset has {num_classes}")
    if arr.shape[0] != len(keys):
        raise EnsembleError(f"{npy}: {arr.shape[0]} rows, but {kp.name} lists {len(keys)} keys")
    if keys.is_duplicated().any():
        raise EnsembleError(f"{kp}: key {keys.filter(keys.is_duplicated())[0]!r} appears more than once")
    if ref is None:
        model.rows[split] = None
        return keys.to_numpy()
    table = pl.DataFrame({"key": keys, "row": np.arange(len(keys))})
    joined = pl.DataFrame({"key": ref}).join(table, on="key", how="left", maintain_order="left")
    missing = joined.filter(pl.col("row").is_null())["key"]
    extra = len(keys) - (len(ref) - len(missing))
    if len(missing) or extra:
        sample = keys[0] if len(keys) else None
        for other in ("train", "val", "test"):
            if other != split and other_splits is not None and sample in other_splits[other]:
                raise EnsembleError(f"{npy}: its keys are the dataset's {other} split, not {split}")
        what = (f"{len(missing)} of the {len(ref)} {split} keys are missing (e.g. {missing[0]!r})" if len(missing)
                else f"{extra} keys are not in the {split} split")
        raise EnsembleError(f"{npy}: {what}")
    rows = joined["row"].to_numpy().astype(np.int64)
    model.rows[split] = None if (rows == np.arange(len(rows))).all() else rows
    return keys.to_numpy()


def load_scores(runs: list[str], data: str | os.PathLike | None = None, *, labels: tuple | None = None) -> Scores:
    """Resolve --runs entries and align every model's val (and test) scores by key.

    Labels come from the dataset `data` (its val split), or from `labels` = (val keys, val labels,
    num_classes[, test keys]) for callers without a dataset directory. Test is used only where every
    model has it. Raises EnsembleError naming the offending file on any mismatch.
    """
    if labels is not None:
        keys = {"val": np.asarray(labels[0])}
        if len(labels) > 3 and labels[3] is not None:
            keys["test"] = np.asarray(labels[3])
        val_labels, num_classes, other = np.asarray(labels[1], np.int64), int(labels[2]), None
    else:
        keys, val_labels, num_classes, other = labels_from_dataset(data)
    if len(val_labels) and val_labels.max() >= num_classes:
        raise EnsembleError(f"val label {val_labels.max()} is out of range for {num_classes} classes")
    models = [Model(name, d, [s for s in ("val", "test") if (d / f"{s}.npy").is_file()])
              for name, d in resolve_runs(runs)]
    for m in models:
        align(m, "val", keys["val"], num_classes, other)
    with_test = [m for m in models if "test" in m.splits]
    if with_test and len(with_test) < len(models):
        lacking = next(m for m in models if "test" not in m.splits)
        raise EnsembleError(f"{lacking.path('test')} is missing, but {with_test[0].path('test')} exists "
                            "(give every model test scores, or none)")
    for m in with_test:
        keys.setdefault("test", align(m, "test", keys.get("test"), num_classes, other))
    if not with_test:
        keys.pop("test", None)
    return Scores(models, keys, val_labels, num_classes)


# ---------------------------------------------------------------- spaces, halves, fusion


def to_space(p: np.ndarray, space: str) -> np.ndarray:
    """Scores in the fusion space: prob (as stored), logits (log max(p, 1e-7)), or rank (per image and
    model, the number of classes scored strictly lower, / (C - 1): 1 for the top class, ties share a
    rank). All three are non-decreasing in p, which the exact reduced fitness relies on."""
    if space == "prob":
        return p
    if space == "logits":
        return np.log(np.maximum(p, LOG_FLOOR))
    if space != "rank":
        raise EnsembleError(f"unknown space {space!r} (choose from {', '.join(SPACES)})")
    c = p.shape[-1]
    flat = p.reshape(-1, c)
    order = np.argsort(flat, axis=1, kind="stable")
    s = np.take_along_axis(flat, order, axis=1)
    pos = np.broadcast_to(np.arange(c), s.shape).copy()
    pos[:, 1:][s[:, 1:] == s[:, :-1]] = 0
    np.maximum.accumulate(pos, axis=1, out=pos)
    out = np.empty(flat.shape, np.float32)
    np.put_along_axis(out, order, pos.astype(np.float32) / max(c - 1, 1), axis=1)
    return out.reshape(p.shape)


def split_halves(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Class-stratified seeded halves of val: 0 = fit (weights are tuned here), 1 = held out (reported
    here), -1 = unlabelled. Within each class, shuffled samples alternate fit / held out."""
    rng = np.random.default_rng([seed, 15])
    perm = rng.permutation(len(labels))
    perm = perm[np.argsort(labels[perm], kind="stable")]
    lab = labels[perm]
    first = np.searchsorted(lab, lab, side="left")
    half = np.full(len(labels), -1, np.int64)
    half[perm] = (np.arange(len(labels)) - first) % 2
    half[labels < 0] = -1
    return half


def weighted_sum(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted sums of M x r x C scores for each row of `w` (K x M): K x r x C float32, accumulated
    model by model (bit-identical to the GA's compiled fitness, so the two agree on every tie)."""
    w = np.atleast_2d(np.asarray(w, np.float32))
    out = np.zeros((len(w), *x.shape[1:]), np.float32)
    tmp = np.empty(x.shape[1:], np.float32)
    for k, wk in enumerate(w):
        for m, wm in enumerate(wk):
            np.multiply(x[m], wm, out=tmp)
            out[k] += tmp
    return out


def output_scores(fused: np.ndarray, space: str) -> np.ndarray:
    """What val.npy / test.npy store: the weighted mean itself (prob: a distribution; rank: mean rank),
    or for logits its softmax (the normalised weighted geometric mean of the models' probabilities)."""
    if space != "logits":
        return fused
    e = np.exp(fused - fused.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def fuse(scores: Scores, weights: np.ndarray | dict[str, float], split: str = "val", space: str = "prob",
         out: str | os.PathLike | None = None) -> np.ndarray:
    """Fused scores of a split (weights normalised to sum 1), chunk by chunk over the memory-mapped
    files: a float32 array, or with `out` a float16 .npy written there (returned memory-mapped)."""
    w = _weight_vector(scores, weights)[None]
    n = len(scores.keys[split])
    dest = (np.lib.format.open_memmap(out, mode="w+", dtype=np.float16, shape=(n, scores.num_classes))
            if out is not None else np.empty((n, scores.num_classes), np.float32))
    step = scores.chunk_rows()
    for lo in range(0, n, step):
        sl = slice(lo, min(n, lo + step))
        dest[sl] = output_scores(weighted_sum(to_space(scores.read(split, sl), space), w)[0], space)
    if out is not None:
        dest.flush()
    return dest


def _weight_vector(scores: Scores, weights: np.ndarray | dict[str, float]) -> np.ndarray:
    if isinstance(weights, dict):
        weights = [weights[name] for name in scores.names]
    w = np.clip(np.asarray(weights, np.float64), 0, None)
    if w.shape != (len(scores.models),) or w.sum() <= 0:
        raise EnsembleError(f"need {len(scores.models)} non-negative weights, not all zero")
    return w / w.sum()


# ---------------------------------------------------------------- GA and evaluation


def reduced_fitness(scores: Scores, space: str = "prob", seed: int = 0, k: int = 10) -> Reduced:
    """The exact reduced form of the fitted half (see trainer/_ga.py): one pass over the val files."""
    fit_rows = np.flatnonzero(split_halves(scores.labels, seed) == 0)
    return Reduced(lambda rows: to_space(scores.read("val", rows), space), fit_rows, scores.labels[fit_rows],
                   scores.num_classes, k=k, chunk_rows=scores.chunk_rows())


def genetic_weights(scores: Scores, *, space: str = "prob", population: int = 32, generations: int = 30,
                    seed: int = 0, k: int = 10, progress=None, reduced: Reduced | None = None) -> GAResult:
    """Model weights by a genetic algorithm: generation 0 is the plain average plus random vectors in
    [0, 1]^M; each next generation keeps the 2 best (elitism) and fills up with children of
    tournament-selected (3 entrants) parents, uniform crossover (p = 0.9), Gaussian mutation (sigma
    0.2, each gene with p = 1/M). Fitness: class-averaged top-5, ties by top-1, on the fitted half
    only. Deterministic for a seed."""
    reduced = reduced or reduced_fitness(scores, space, seed, k)
    return run_ga(reduced.fitness, len(scores.models), population=population, generations=generations,
                  seed=seed, progress=progress)


def evaluate(scores: Scores, weights: dict[str, np.ndarray | dict[str, float]], space: str = "prob",
             seed: int = 0, models: bool = True, write: tuple[str, str | os.PathLike] | None = None) -> dict:
    """One pass over val: {"fused": {name: metrics} per weight set, "models": {name: metrics} per model}.
    Metrics: top-1/5 and class-averaged top-1/5 on the held-out half (`heldout_*`), and for the fusions
    also on the fitted half (`fit_*`; models are scored on the held-out half only, which halves the
    pass's main cost). `write=(name, path)` also stores that fusion's val scores (float16)."""
    half = split_halves(scores.labels, seed)
    names = list(weights)
    w = np.stack([_weight_vector(scores, weights[n]) for n in names])
    n = len(scores.labels)
    hits: dict[tuple[str, str], dict[int, np.ndarray]] = {}  # ("model" | "fused", name) -> k -> per image
    dest = (np.lib.format.open_memmap(write[1], mode="w+", dtype=np.float16, shape=(n, scores.num_classes))
            if write else None)
    step = scores.chunk_rows()
    for lo in range(0, n, step):
        sl = slice(lo, min(n, lo + step))
        raw, lab = scores.read("val", sl), np.maximum(scores.labels[sl], 0)
        fused = weighted_sum(to_space(raw, space), w)
        held = np.flatnonzero(half[sl] == 1)
        for j, m in enumerate(scores.models if models else []):
            for k in (1, 5):
                hits.setdefault(("model", m.name), {}).setdefault(k, np.zeros(n, bool))[lo + held] = topk_hits(
                    raw[j][held], lab[held], k)
        for j, name in enumerate(names):
            for k in (1, 5):
                hits.setdefault(("fused", name), {}).setdefault(k, np.empty(n, bool))[sl] = topk_hits(fused[j], lab, k)
        if dest is not None:
            dest[sl] = output_scores(fused[names.index(write[0])], space)
        del raw, fused  # before the next read: one chunk in memory at a time
    if dest is not None:
        dest.flush()
    report: dict = {"models": {}, "fused": {}}
    for (kind, name), by_k in hits.items():
        m = {}
        for part, h in (("heldout", 1), ("fit", 0))[:1 if kind == "model" else 2]:
            keep = half == h
            for k in (1, 5):
                m[f"{part}_top{k}"] = float(by_k[k][keep].mean()) if keep.any() else float("nan")
            for k in (1, 5):
                m[f"{part}_class_top{k}"] = class_averaged(by_k[k][keep], scores.labels[keep])
        report["models" if kind == "model" else "fused"][name] = m
    return report


# ---------------------------------------------------------------- outputs and CLI


def write_test(scores: Scores, w: np.ndarray, space: str, out: Path) -> None:
    """test.npy (float16) + test_keys.parquet, and predictions.csv: key, then the top-5 class ids by fused
    score (ties: lower class id first), chunk by chunk."""
    n, k = len(scores.keys["test"]), min(5, scores.num_classes)
    w = _weight_vector(scores, w)[None]
    dest = np.lib.format.open_memmap(out / "test.npy", mode="w+", dtype=np.float16, shape=(n, scores.num_classes))
    top = np.empty((n, k), np.int64)
    step = scores.chunk_rows()
    for lo in range(0, n, step):
        sl = slice(lo, min(n, lo + step))
        fused = weighted_sum(to_space(scores.read("test", sl), space), w)[0]
        dest[sl] = output_scores(fused, space)
        part = np.argpartition(-fused, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(fused, part, axis=1)
        top[sl] = np.take_along_axis(part, np.lexsort((part, -vals), axis=-1), axis=1)
    dest.flush()
    del dest
    pl.DataFrame({"key": scores.keys["test"]}).write_parquet(out / "test_keys.parquet")
    pl.DataFrame({"key": scores.keys["test"], **{f"top{i + 1}": top[:, i] for i in range(k)}}).write_csv(
        out / "predictions.csv")


def format_table(metrics: dict, heldout: int) -> str:
    """The metrics as a table (percent), one row per model, then the fusions."""
    rows = [*metrics["models"].items(), *((k, metrics[k]) for k in ("average", "ga") if k in metrics)]
    width = max(12, *(len(name) for name, _ in rows))
    lines = [f"{'held-out half: ' + str(heldout) + ' images':<{width}}   top-1   top-5  class top-1  class top-5"]
    for i, (name, m) in enumerate(rows):
        if i == len(metrics["models"]):
            lines.append("-" * len(lines[0]))
        lines.append(f"{name:<{width}}  {100 * m['heldout_top1']:6.2f}  {100 * m['heldout_top5']:6.2f}"
                     f"  {100 * m['heldout_class_top1']:11.2f}  {100 * m['heldout_class_top5']:11.2f}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="python -m trainer.ensemble", description="\n\n".join(__doc__.split("\n\n")[:2]),
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Errors are one line with exit status 2; --debug anywhere shows the traceback instead.")
    p.add_argument("--runs", "--run", dest="runs", nargs="+", action="extend", required=True, metavar="RUN",
                   help="run directories, score directories or globs, or NAME=PATH; repeatable")
    p.add_argument("--data", required=True, help="dataset directory (val labels, key order)")
    p.add_argument("--out", required=True, help="ensemble directory to write")
    p.add_argument("--method", choices=["ga", "average"], default="ga",
                   help="weights written to OUT (default ga; the plain average is always reported beside it)")
    p.add_argument("--space", choices=SPACES, default="prob",
                   help="fuse probabilities, log-probabilities or per-image ranks (default prob)")
    p.add_argument("--generations", type=int, default=30, help="GA generations after the first (default 30)")
    p.add_argument("--population", type=int, default=32, help="GA population size (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seeds the val halves and the GA")
    p.add_argument("--candidates", type=int, default=10, metavar="K",
                   help="per-model top-K classes kept for the exact GA fitness (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no per-generation lines")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """The CLI's work: load, fit, evaluate, write OUT. Returns metrics.json's content."""
    if args.generations < 0 or args.population < 2 or args.candidates < 1:
        raise EnsembleError("--generations must be >= 0, --population >= 2 and --candidates >= 1")
    t0 = time.perf_counter()
    scores = load_scores(args.runs, args.data)
    half = split_halves(scores.labels, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda s: None) if args.no_progress else (lambda s: print(s, file=sys.stderr, flush=True))
    say(f"{len(scores.models)} models, {len(scores.labels)} val images ({(half == 0).sum()} fit, "
        f"{(half == 1).sum()} held out), {scores.num_classes} classes, space {args.space}")
    uniform = np.full(len(scores.models), 1 / len(scores.models))
    sets = {"average": uniform}
    config = {"args": vars(args), "models": scores.names, "fit_images": int((half == 0).sum()),
              "heldout_images": int((half == 1).sum())}
    if args.method == "ga":
        reduced = reduced_fitness(scores, args.space, args.seed, args.candidates)
        say(f"reduced form: {reduced.stats['candidates_mean']:.1f} candidates per image (max "
            f"{reduced.stats['candidates_max']}), {reduced.stats['bytes'] / 2**20:.1f} MiB, "
            f"{reduced.stats['build_seconds']:.1f}s")

        def line(r: dict) -> None:
            say(f"generation {r['generation']:3d}/{args.generations}: best class top-5 {100 * r['best_class_top5']:.2f}"
                f" (top-1 {100 * r['best_class_top1']:.2f}), population mean {100 * r['mean_class_top5']:.2f}, "
                f"{r['evaluations']} evaluated, {r['seconds']:.1f}s")

        ga = genetic_weights(scores, space=args.space, population=args.population, generations=args.generations,
                             seed=args.seed, reduced=reduced, progress=line)
        sets["ga"] = ga.weights
        config.update(reduced=reduced.stats, ga={"fit_class_top5": ga.fitness[0], "fit_class_top1": ga.fitness[1],
                                                 "evaluations": ga.evaluations, "history": ga.history})
    chosen = sets[args.method]
    report = evaluate(scores, sets, args.space, args.seed, write=(args.method, out / "val.npy"))
    pl.DataFrame({"key": scores.keys["val"]}).write_parquet(out / "val_keys.parquet")
    if "test" in scores.keys:
        write_test(scores, chosen, args.space, out)
    else:  # no test scores: leave no stale test outputs of an earlier ensemble in OUT
        for name in ("test.npy", "test_keys.parquet", "predictions.csv"):
            (out / name).unlink(missing_ok=True)
    metrics = {"models": report["models"], **report["fused"]}
    (out / "weights.json").write_text(json.dumps(dict(zip(scores.names, map(float, chosen))), indent=1) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    config["seconds"] = time.perf_counter() - t0
    (out / "config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
    print(format_table(metrics, int((half == 1).sum())))
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args([a for a in argv if a != "--debug"])  # --debug anywhere: the traceback instead
    try:
        run(args)
    except Exception as e:  # noqa: BLE001 - every error is one line (bad input, disk full, permission)
        if "--debug" in argv:
            raise
        print(f"python -m trainer.ensemble: error: {_first_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
