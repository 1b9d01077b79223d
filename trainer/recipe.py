"""`python -m trainer.recipe CONFIG`: the whole WebVision recipe as one resumable command.

    python -m trainer.recipe my.toml [--from round2] [--list]   # every stage not yet done
    python -m trainer.recipe demo --out demo-out                # the packaged demo config (make demo)

One TOML file names the crawl and the stages; each stage is one call of a public wvdata function or
a trainer command: [crawl] -> build -> dedup -> clean -> round1 (--aum) -> aum -> embed -> curriculum
-> filtered -> [[models]] -> ensemble -> report. OUT/recipe-state.json records what each stage
consumed (input fingerprints + options): an unchanged stage with its outputs is skipped, one cut
short resumes, `--from STAGE` reruns from there. Scale-out is configuration (`engine = "ray"`,
`nproc_per_node` / `nnodes`). Every option and rule: docs/recipe.md.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._cli import run_main
from .report import print_plan, print_summary, write_report

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

RECIPES = Path(__file__).parent / "recipes"
STATE = "recipe-state.json"
FIXED = ("crawl", "build", "dedup", "clean", "round1", "aum", "embed", "curriculum", "filtered")
TOP = {"crawl", "out", "engine", "workers", "progress", "skip"}
SKIPPABLE = {"dedup": [], "round1": [], "aum": ["round1"], "embed": ["round1"], "curriculum": ["embed"],
             "filtered": ["aum"], "ensemble": []}  # stage: the stages it needs
VIEW_KEYS = {"drop_duplicates", "drop_leaks", "drop_aum", "aum_below", "drop_aum_flagged", "subsets", "per_class",
             "where", "seed"}
SECTIONS: dict[str, set[str] | None] = {  # None: trainer flags, checked by the trainer's own parser
    "generate": {"per_class", "val_per_class", "test", "label_noise", "duplicates", "sizes", "seed"},
    "build": None,  # BuildOptions fields, checked by BuildOptions.of
    "dedup": {"splits", "radius", "hash", "bits", "exact", "verify", "verify_radius", "method"},
    "clean": VIEW_KEYS, "filtered": VIEW_KEYS,
    "train": None, "round1": None,
    "aum": {"skip_epochs", "drop_fraction", "threshold_percentile", "per_class"},
    "embed": {"view", "image_size", "batch_size", "device", "chunk"},
    "curriculum": {"subsets", "method", "density_t", "pca_dim", "seed"},
    "models": None,
    "ensemble": {"runs", "method", "space", "generations", "population", "seed", "candidates"},
}
LAUNCH = {"nproc_per_node", "nnodes", "torchrun", "omp_num_threads"}  # how a run is started, not trainer flags


class RecipeError(ValueError):
    """A bad config or a failed stage: one line for the user."""


# ---------------------------------------------------------------- config


@dataclass
class Config:
    path: str
    crawl: Path
    out: Path
    engine: str
    workers: int | None
    progress: bool
    sections: dict[str, Any]
    skip: set[str] = field(default_factory=set)
    train: dict[str, dict[str, Any]] = field(default_factory=dict)  # run name -> trainer options (+ LAUNCH)

    @property
    def dataset(self) -> Path:
        return self.out / "dataset"

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name


def config_path(name: str) -> Path:
    """A config file, or the name of one shipped in trainer/recipes/ (`demo`)."""
    for p in (Path(name), RECIPES / f"{name}.toml"):
        if p.is_file():
            return p
    raise RecipeError(f"config {name!r} not found (a TOML file, or one of: "
                      f"{', '.join(sorted(q.stem for q in RECIPES.glob('*.toml')))})")


def load_config(name: str, out: str | None = None, crawl: str | None = None) -> Config:
    """Read and check a recipe config; `out` / `crawl` override the file's."""
    path = config_path(name)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: {e}") from None
    unknown = set(raw) - TOP - set(SECTIONS)
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(TOP | set(SECTIONS))}")
    for sec, keys in SECTIONS.items():
        val = raw.get(sec, [] if sec == "models" else {})
        if sec == "models":
            if not isinstance(val, list):
                raise RecipeError(f"{path}: models is a list of tables ([[models]])")
        elif not isinstance(val, dict):
            raise RecipeError(f"{path}: [{sec}] must be a table")
        elif keys is not None and set(val) - keys:
            raise RecipeError(f"{path}: [{sec}] unknown key(s) {sorted(set(val) - keys)}; known: {sorted(keys)}")
        raw[sec] = val
    if not raw.get("crawl"):
        raise RecipeError(f"{path}: `crawl` (the raw crawl: a directory or a manifest) is required")
    engine = raw.get("engine", "local")
    if engine not in ("local", "ray"):
        raise RecipeError(f"{path}: engine must be \"local\" or \"ray\", got {engine!r}")
    skip = raw.get("skip", [])
    if not isinstance(skip, list) or set(skip) - set(SKIPPABLE):
        raise RecipeError(f"{path}: skip is a list of stages among {sorted(SKIPPABLE)}, got {skip!r}")
    for st in set(SKIPPABLE) - set(skip):
        if set(SKIPPABLE[st]) & set(skip):
            raise RecipeError(f"{path}: stage {st} needs {SKIPPABLE[st]}: skip {st} too, or keep them")
    cfg = Config(str(path), Path(crawl or raw["crawl"]), Path(out or raw.get("out", "recipe-out")), engine,
                 raw.get("workers"), bool(raw.get("progress", True)), raw, set(skip))
    if out and not crawl and raw.get("generate"):  # a generated crawl moves with the output folder
        cfg.crawl = cfg.out / "crawl"
    _check_options(cfg)
    return cfg


def _check_options(cfg: Config) -> None:
    """Fail before the first stage on anything a later stage would refuse."""
    from wvdata.build import BuildOptions

    s = cfg.sections
    try:
        BuildOptions.of(**s["build"])
    except (TypeError, ValueError) as e:
        raise RecipeError(f"[build] {e}") from None
    base = {k: v for k, v in s["train"].items()}
    if "round1" not in cfg.skip:
        cfg.train["round1"] = {**base, **s["round1"], "aum": True, "view": "clean"}
    names = set(FIXED) | {"ensemble", "report"}
    for i, m in enumerate(s["models"]):
        name = m.get("name")
        if not isinstance(name, str) or name in names or not name.replace("-", "").replace("_", "").isalnum():
            raise RecipeError(f"[[models]] #{i + 1}: `name` must be a new stage name of letters, digits, - and _ "
                              f"(taken: {sorted(names)})")
        names.add(name)
        opts = {**base, "view": "clean" if "filtered" in cfg.skip else "filtered",
                **{k: v for k, v in m.items() if k != "name"}}
        if opts["view"] not in ("clean", "filtered") or opts["view"] in cfg.skip:
            raise RecipeError(f"[[models]] {name}: view is \"clean\" or \"filtered\" (not skipped), "
                              f"got {opts['view']!r}")
        if opts.get("stages") and "curriculum" in cfg.skip:
            raise RecipeError(f"[[models]] {name}: --stages needs the curriculum stage, which is skipped")
        if "round1" in cfg.skip:
            raise RecipeError(f"[[models]] {name}: models after round 1 need round1, which is skipped")
        cfg.train[name] = opts
    for name, opts in cfg.train.items():
        trainer_args(cfg, name)  # parsed by the trainer's own parser now
        if (int(opts.get("nnodes", 1)) > 1) and not opts.get("torchrun"):
            raise RecipeError(f"{name}: nnodes > 1 needs torchrun rendezvous flags, e.g. torchrun = ['--rdzv-backend', "
                              "'c10d', '--rdzv-endpoint', 'HOST:29400', '--rdzv-id', 'wv1']")
    runs = s["ensemble"].get("runs", list(cfg.train))
    if set(runs) - set(cfg.train):
        raise RecipeError(f"[ensemble] runs: unknown {sorted(set(runs) - set(cfg.train))}; models: {list(cfg.train)}")


def _flags(opts: dict[str, Any]) -> list[str]:
    """{"batch_size": 32, "aum": True, "crop_scale": [0.35, 1]} -> --batch-size 32 --aum --crop-scale 0.35,1"""
    out = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is not None and v is not False:
            out += [flag, ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]
    return out


def trainer_args(cfg: Config, name: str) -> list[str]:
    """The `python -m trainer.train` arguments of run NAME, checked by the trainer's parser."""
    from .train import parse_args

    opts = {k: v for k, v in cfg.train[name].items() if k not in LAUNCH}
    if not cfg.progress:
        opts["no_progress"] = True
    argv = ["--data", str(cfg.dataset), "--out", str(cfg.run_dir(name)), *_flags(opts)]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parse_args(argv)
    except SystemExit:
        msg = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "bad trainer options"
        raise RecipeError(f"{name}: {msg.split('error: ', 1)[-1]}") from None
    return argv


def total_epochs(cfg: Config, name: str) -> int:
    from .train import parse_args, parse_stages

    a = parse_args(trainer_args(cfg, name))
    return sum(n for _, n in parse_stages(a.stages, a.epochs))


# ---------------------------------------------------------------- fingerprints and state


def stamp(path: Path) -> str:
    """Size and mtime of a file, or of every file under a directory (hidden names skipped)."""
    if path.is_file():
        st = path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    if not path.is_dir():
        return "missing"
    h = hashlib.sha1()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if not f.startswith("."):
                p = Path(root, f)
                st = p.stat()
                h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def crawl_inputs(crawl: Path) -> list[Path]:
    """What identifies a crawl cheaply: a manifest file, a WebVision crawl's info/ filelists, else every file."""
    return [crawl / "info"] if (crawl / "info").is_dir() else [crawl]


def fingerprint(inputs: list[Path], options: Any) -> tuple[str, dict[str, str]]:
    stamps = {str(p): stamp(p) for p in inputs}
    h = hashlib.sha1(json.dumps([stamps, options], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16], stamps


def read_state(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / STATE).read_text())
    except FileNotFoundError:
        return {"version": 1, "stages": {}}
    except json.JSONDecodeError:
        raise RecipeError(f"{out / STATE} is not valid JSON; delete it to rerun every stage") from None


def write_state(out: Path, state: dict[str, Any]) -> None:
    tmp = out / f".{STATE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(state, indent=1, default=str) + "\n")
    os.replace(tmp, out / STATE)


# ---------------------------------------------------------------- stages


@dataclass
class Stage:
    name: str
    command: str  # the equivalent command line, shown as the stage starts
    inputs: list[Path]
    outputs: list[Path]
    options: Any
    run: Callable[[bool], dict[str, Any]]  # resume -> stats (images, seconds, ...)


def plan(cfg: Config) -> list[Stage]:
    """The stages of this config, in order."""
    s, ds, figs, o = cfg.sections, cfg.dataset, cfg.out / "figures", cfg.out
    ann = ds / "annotations"
    dsj = ds / "dataset.json"
    stages = []
    if s["generate"]:
        stages.append(Stage("crawl", f"python -m wvdata.demo --crawl-only --out {cfg.crawl}", [],
                            [cfg.crawl / "info" / "synsets.txt"], s["generate"], lambda r: _crawl(cfg)))
    stages += [
        Stage("build", f"wvdata build {cfg.crawl} -o {ds} {_cli(s['build'])}",
              [cfg.crawl / "info"] if s["generate"] else crawl_inputs(cfg.crawl), [dsj],
              s["build"], lambda r: _build(cfg, r)),
        Stage("dedup", f"wvdata dedup {ds} --report {figs}/dedup.png {_cli(s['dedup'])}", [dsj],
              [ann / "dedup.parquet", figs / "dedup.png"], s["dedup"], lambda r: _dedup(cfg)),
        Stage("clean", f"wvdata view {ds} clean {_cli(s['clean'])}", [dsj, ann / "dedup.parquet"],
              [ds / "views" / "clean" / "entries.parquet"], s["clean"], lambda r: _view(cfg, "clean", s["clean"])),
        *([] if "round1" in cfg.skip else [_train_stage(cfg, "round1", [ds / "views" / "clean" / "entries.parquet"])]),
        Stage("aum", f"wvdata aum {ds} --runs {cfg.run_dir('round1')} --report {figs}/aum.png {_cli(s['aum'])}",
              [dsj, cfg.run_dir("round1") / "margins"], [ann / "aum.parquet", figs / "aum.png"], s["aum"],
              lambda r: _aum(cfg)),
        Stage("embed", f"wvdata embed {ds} --checkpoint {cfg.run_dir('round1')}/checkpoint.pt --name round1 "
              f"{_cli(s['embed'])}", [cfg.run_dir("round1") / "checkpoint.pt",
                                      ds / "views" / s["embed"].get("view", "clean") / "entries.parquet"],
              [ds / "features" / "round1" / "features.npy"], {**s["embed"], "engine": cfg.engine},
              lambda r: _embed(cfg, r)),
        Stage("curriculum", f"wvdata curriculum {ds} --features round1 --report {figs}/curriculum.png "
              f"{_cli(s['curriculum'])}", [ds / "features" / "round1" / "features.npy"],
              [ann / "curriculum.parquet", figs / "curriculum.png"], s["curriculum"], lambda r: _curriculum(cfg)),
        Stage("filtered", f"wvdata view {ds} filtered {_cli({**s['clean'], **s['filtered']})}",
              [dsj, ann / "dedup.parquet", ann / "aum.parquet"], [ds / "views" / "filtered" / "entries.parquet"],
              {**s["clean"], **s["filtered"]}, lambda r: _view(cfg, "filtered", {**s["clean"], **s["filtered"]})),
    ]
    stages = [st for st in stages if st.name not in cfg.skip]
    for name in [n for n in cfg.train if n != "round1"]:
        opts = cfg.train[name]
        extra = [ann / "curriculum.parquet"] if opts.get("stages") else []
        stages.append(_train_stage(cfg, name, [ds / "views" / opts["view"] / "entries.parquet", *extra]))
    runs = s["ensemble"].get("runs", list(cfg.train))
    if len(runs) >= 2 and "ensemble" not in cfg.skip:
        eopts = {k: v for k, v in s["ensemble"].items() if k != "runs"}
        stages.append(Stage("ensemble", _show(_ensemble_cmd(cfg, runs, eopts)),
                            [cfg.run_dir(r) / "scores" for r in runs], [o / "ensemble" / "metrics.json"],
                            {"runs": runs, **eopts}, lambda r: _ensemble(cfg, runs, eopts)))
    stages.append(Stage("report", f"(trainer.report) {o}/report.html", [], [o / "report.html"], None,
                        lambda r: {"path": str(write_report(cfg, read_state(cfg.out)))}))
    return stages


def _show(cmd: list[str]) -> str:
    return " ".join("python" if c == sys.executable else c for c in cmd)


def _cli(opts: dict[str, Any]) -> str:
    return " ".join(_flags(opts))


def _crawl(cfg: Config) -> dict[str, Any]:
    from wvdata.demo import make_crawl

    shutil.rmtree(cfg.crawl, ignore_errors=True)
    g = cfg.sections["generate"]
    n = make_crawl(cfg.crawl, **{k: (tuple(map(tuple, v)) if k == "sizes" else tuple(v) if isinstance(v, list)
                                     else v) for k, v in g.items()})
    return {"images": n}


def _build(cfg: Config, resume: bool) -> dict[str, Any]:
    from wvdata.build import build, format_summary

    ds = cfg.dataset
    exists = ds.is_dir() and any(p.name != ".wvdata.lock" for p in ds.iterdir())
    s = build(cfg.crawl, ds, engine=cfg.engine, workers=cfg.workers, resume=resume and exists,
              overwrite=exists and not resume, progress=cfg.progress, **cfg.sections["build"])
    print(format_summary(s))
    return {"images": s.processed, "seconds": s.seconds, "samples": s.samples, "errors": s.errors,
            "errors_by_reason": s.errors_by_reason}


def _dedup(cfg: Config) -> dict[str, Any]:
    import polars as pl

    from wvdata.dedup import find_duplicates, format_summary, save

    d = dict(cfg.sections["dedup"])
    splits = d.pop("splits", ("train", "val", "test"))
    splits = splits.split(",") if isinstance(splits, str) else splits
    res = find_duplicates(cfg.dataset, splits, d.get("radius"), d.get("hash", "phash"), d.get("bits"), cfg.engine,
                          cfg.workers, cfg.progress, d.get("exact", False), d.get("verify", True),
                          **{k: d[k] for k in ("verify_radius", "method") if k in d})
    (cfg.out / "figures").mkdir(parents=True, exist_ok=True)
    save(cfg.dataset, res, str(cfg.out / "figures" / "dedup.png"))
    print(format_summary(res.table, res.stats))
    t = res.table
    return {"images": t.height, "seconds": res.stats.get("seconds"), "removed": int((~t["keep"]).sum()),
            "leaks": int(t["leak"].sum()), "clusters": int(t.filter(pl.col("cluster") >= 0)["cluster"].n_unique())}


def _view(cfg: Config, name: str, opts: dict[str, Any]) -> dict[str, Any]:
    from wvdata.views import view

    t0 = time.perf_counter()
    v = view(cfg.dataset, name, **opts)
    unique = v.entries["key"].n_unique()
    print(f"view {name}: {len(v)} entries, {unique} unique samples, {v.entries['label'].n_unique()} classes")
    return {"images": len(v), "unique": unique, "seconds": time.perf_counter() - t0}


def _aum(cfg: Config) -> dict[str, Any]:
    from wvdata.aum import compute_aum, format_summary, save

    res = compute_aum(cfg.dataset, [cfg.run_dir("round1")], **cfg.sections["aum"])
    (cfg.out / "figures").mkdir(parents=True, exist_ok=True)
    save(cfg.dataset, res, cfg.out / "figures" / "aum.png")
    print(format_summary(res))
    return {"images": res.stats["samples"], "scored": res.stats["scored"], "flagged": res.stats["flagged"],
            "rule": res.stats["rule"], "seconds": res.stats["seconds"]}


def _embed(cfg: Config, resume: bool) -> dict[str, Any]:
    from wvdata.embed import embed

    if not resume:  # finished chunks of an older checkpoint must not be reused
        shutil.rmtree(cfg.dataset / "features" / "round1", ignore_errors=True)
    e = dict(cfg.sections["embed"])
    s = embed(cfg.dataset, checkpoint=cfg.run_dir("round1") / "checkpoint.pt", name="round1",
              view=e.pop("view", "clean"), engine=cfg.engine, workers=cfg.workers, progress=cfg.progress, **e)
    print(f"embed: {s['rows']} samples x {s['dim']} features, {s['unreadable']} unreadable, {s['seconds']:.1f}s")
    return {"images": s["rows"], "seconds": s["seconds"]}


def _curriculum(cfg: Config) -> dict[str, Any]:
    from wvdata.curriculum import find_subsets, format_summary, render_report, save

    c = cfg.sections["curriculum"]
    res = find_subsets(cfg.dataset, "round1", progress=cfg.progress, **c)
    save(cfg.dataset, res.table)
    (cfg.out / "figures").mkdir(parents=True, exist_ok=True)
    render_report(cfg.dataset, "train", res.table, str(cfg.out / "figures" / "curriculum.png"),
                  seed=c.get("seed", 0))
    print(format_summary(res.table, res.stats))
    return {"images": res.stats["with_features"], "seconds": res.stats["seconds"]}


def _train_stage(cfg: Config, name: str, view_inputs: list[Path]) -> Stage:
    cmd = _train_cmd(cfg, name)
    return Stage(name, _show(cmd),
                 [cfg.dataset / "dataset.json", *view_inputs],
                 [cfg.run_dir(name) / "metrics.jsonl", cfg.run_dir(name) / "checkpoint.pt"],
                 cfg.train[name], lambda r: _train(cfg, name, r))


def _train_cmd(cfg: Config, name: str, resume: bool = False) -> list[str]:
    opts = cfg.train[name]
    nproc, nnodes = int(opts.get("nproc_per_node", 1)), int(opts.get("nnodes", 1))
    args = trainer_args(cfg, name) + (["--resume"] if resume else [])
    if nproc == 1 and nnodes == 1:
        return [sys.executable, "-m", "trainer.train", *args]
    launch = list(opts.get("torchrun") or ["--standalone"])
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", str(nnodes),
            *launch, "-m", "trainer.train", *args]


def _train(cfg: Config, name: str, resume: bool) -> dict[str, Any]:
    run = cfg.run_dir(name)
    resume = resume and (run / "checkpoint.pt").exists()
    if not resume:
        shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True, exist_ok=True)
    cmd = _train_cmd(cfg, name, resume)
    if int(cfg.train[name].get("nnodes", 1)) > 1:
        print("on every other node, run: " + _show(cmd))
    t0 = time.perf_counter()
    threads = cfg.train[name].get("omp_num_threads")
    run_command(cmd, run / "train.log", name, {"OMP_NUM_THREADS": str(threads)} if threads else {})
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    want = total_epochs(cfg, name)
    if not records or records[-1]["epoch"] != want - 1:
        raise RecipeError(f"{name}: the trainer stopped before epoch {want} (a SIGTERM?); rerun to resume it")
    last = {k: v for k, v in records[-1].items() if k.startswith("val_")}
    done = {r["epoch"]: r for r in records}.values()  # a resumed epoch logged twice counts once
    return {"images": sum(r["images_per_sec"] * r["seconds"] for r in done), "seconds": time.perf_counter() - t0,
            "train_seconds": sum(r["seconds"] for r in done), "resumed": resume, **last}


def _ensemble_cmd(cfg: Config, runs: list[str], opts: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "trainer.ensemble", "--runs", *[f"{r}={cfg.run_dir(r)}" for r in runs],
            "--data", str(cfg.dataset), "--out", str(cfg.out / "ensemble"), *_flags(opts)]


def _ensemble(cfg: Config, runs: list[str], opts: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    (cfg.out / "ensemble").mkdir(parents=True, exist_ok=True)
    run_command(_ensemble_cmd(cfg, runs, opts), cfg.out / "ensemble" / "ensemble.log", "ensemble")
    import numpy as np

    n = sum(len(np.load(cfg.run_dir(r) / "scores" / "val.npy", mmap_mode="r")) for r in runs)
    return {"images": n, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------- subprocesses


def _die_with_parent() -> None:
    """In the child: die when the recipe dies (SIGKILL included), so no trainer is left running."""
    with contextlib.suppress(OSError):
        __import__("ctypes").CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_CHILD: list[subprocess.Popen] = []


def _forward_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (a preemption): the trainer checkpoints and stops; the recipe then stops too."""
    for p in _CHILD:
        p.send_signal(signal.SIGTERM)
    if not _CHILD:
        raise SystemExit(128 + signum)


def run_command(cmd: list[str], log: Path, stage: str, env: dict[str, str] | None = None) -> None:
    """Run cmd with its output shown and copied to `log`; a failure is one line naming the log."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    with open(log, "ab") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        _CHILD.append(proc)
        tail = b""
        try:
            while chunk := proc.stdout.read1(1 << 16):  # type: ignore[union-attr]
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                f.write(chunk)
                tail = (tail + chunk)[-4096:]
            rc = proc.wait()
        finally:
            _CHILD.remove(proc)
            if proc.poll() is None:
                proc.kill()
    if rc != 0:
        lines = [x for x in tail.decode(errors="replace").replace("\r", "\n").splitlines() if x.strip()]
        why = lines[-1].strip() if lines else f"exit status {rc}"
        raise RecipeError(f"stage {stage} failed: {why} (exit {rc}; full output in {log})")


# ---------------------------------------------------------------- the run


def stage_fingerprint(st: Stage, state: dict[str, Any], names: list[str]) -> tuple[str, dict[str, str]]:
    if st.name == "report":  # it consumes what the others recorded: when each ran, on what
        recs = state["stages"]
        return fingerprint([], {n: [recs.get(n, {}).get(k) for k in ("fingerprint", "started")] for n in names[:-1]})
    return fingerprint(st.inputs, st.options)


def up_to_date(stage: Stage, rec: dict[str, Any] | None, fp: str) -> bool:
    return bool(rec) and rec.get("status") == "done" and rec.get("fingerprint") == fp and all(
        p.exists() for p in stage.outputs)


def run(cfg: Config, start: str | None = None) -> dict[str, Any]:
    """Run the stages in order; skip the up-to-date ones (all from `start` on rerun). Returns the state."""
    from wvdata.lock import dataset_lock

    stages = plan(cfg)
    names = [s.name for s in stages]
    if start is not None and start not in names:
        raise RecipeError(f"--from {start!r}: not a stage of this recipe; stages: {', '.join(names)}")
    if not cfg.sections["generate"] and not cfg.crawl.exists():
        raise RecipeError(f"crawl {cfg.crawl} does not exist")
    cfg.out.mkdir(parents=True, exist_ok=True)
    with dataset_lock(cfg.out, "trainer.recipe"):
        state = read_state(cfg.out)
        state["config"] = cfg.path
        forced = names.index(start) if start else len(names)
        t_all = time.perf_counter()
        for i, st in enumerate(stages):
            head = f"[{i + 1}/{len(stages)}] {st.name}"
            fp, stamps = stage_fingerprint(st, state, names)
            rec = state["stages"].get(st.name)
            if i < forced and up_to_date(st, rec, fp):
                print(f"{head}: up to date (inputs and options unchanged), skipped", flush=True)
                continue
            resume = i < forced and bool(rec) and rec.get("status") == "started" and rec.get("fingerprint") == fp
            print(f"\n{head}{' (resuming)' if resume else ''}: {st.command}", flush=True)
            state["stages"][st.name] = {"status": "started", "fingerprint": fp, "inputs": stamps,
                                        "options": st.options, "outputs": [str(p) for p in st.outputs],
                                        "started": time.time()}
            write_state(cfg.out, state)
            t0 = time.perf_counter()
            stats = st.run(resume)
            seconds = time.perf_counter() - t0
            state["stages"][st.name].update(status="done", seconds=seconds, stats=stats)
            write_state(cfg.out, state)
            ips = stats.get("images", 0) / max(stats.get("seconds") or seconds, 1e-9)
            print(f"{head}: done in {seconds:.1f}s" + (f" ({ips:.0f} images/s)" if stats.get("images") else ""),
                  flush=True)
        print_summary(cfg, state, time.perf_counter() - t_all)
    return state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.recipe", description=__doc__.split("\n\n")[0],
                                epilog="Errors are one line with exit status 2; --debug shows the traceback.")
    p.add_argument("config", help="recipe TOML file, or the name of a packaged one (demo)")
    p.add_argument("--out", default=None, help="output folder (default: the config's `out`)")
    p.add_argument("--crawl", default=None, help="the raw crawl (default: the config's `crawl`)")
    p.add_argument("--from", dest="start", default=None, metavar="STAGE", help="rerun from this stage on")
    p.add_argument("--list", action="store_true", help="list the stages and whether each would run; run nothing")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.out, args.crawl)
    if args.list:
        return print_plan(cfg)
    signal.signal(signal.SIGTERM, _forward_sigterm)
    try:
        run(cfg, args.start)
    except KeyboardInterrupt:  # Ctrl-C: the stage under way stays `started` and resumes on the next run
        print("\ntrainer.recipe: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="trainer.recipe"))
