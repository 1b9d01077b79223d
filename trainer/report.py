"""The recipe's report: OUT/report.html + OUT/figures/*.png, readable offline (relative links only).

What a person needs to judge a run of the recipe: the funnel (samples in, kept and dropped by each
stage with the reason), each model's and the ensemble's top-1 / top-5 and class-averaged top-1 /
top-5 on val, images/sec of each stage, and the image grids the stages rendered through
`wvdata.grid` (largest duplicate clusters and leaks, lowest-AUM images with their labels,
curriculum subsets of a few classes), plus val accuracy per epoch of every model.
"""
from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

if TYPE_CHECKING:
    from .recipe import Config

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
METRICS = ("top1", "top5", "class_top1", "class_top5")
MODEL_HEAD = ["model", "trained on", "epochs", "top-1", "top-5", "class top-1", "class top-5", "held-out top-1",
              "held-out top-5", "held-out class top-1", "held-out class top-5"]


def _read(path: Path, columns: list[str] | None = None) -> pl.DataFrame | None:
    return pl.read_parquet(path, columns=columns) if path.exists() else None


def funnel(cfg: Config, state: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(stage, samples after it, dropped, why) rows for the train split, then val and test."""
    ds, rows = cfg.dataset, []
    manifest = json.loads((ds / "dataset.json").read_text())
    train = _read(ds / "train" / "samples.parquet", ["key", "label"])
    errors = _read(ds / "train" / "errors.parquet", ["reason"])
    n_err = 0 if errors is None else errors.height
    stored = 0 if train is None else train.height
    rows.append(("crawl", f"{stored + n_err}", "", "train inputs the crawl lists"))
    if errors is not None:
        for reason, n in errors.group_by("reason").len().sort(["len", "reason"], descending=[True, False]).iter_rows():
            rows.append(("build", "", f"{n}", f"rejected: {reason}"))
    rows.append(("build", f"{stored}", f"{n_err}", "stored in shards (every rejected input is in errors.parquet)"))
    dedup = _read(ds / "annotations" / "dedup.parquet", ["key", "split", "keep", "leak"])
    if dedup is not None:
        d = dedup.filter(pl.col("split") == "train")
        leaks, dups = int(d["leak"].sum()), int((~d["keep"] & ~d["leak"]).sum())
        rows.append(("dedup", f"{stored - dups - leaks}", f"{dups}", "near or exact duplicate of a kept train image"))
        rows.append(("dedup", "", f"{leaks}", "leak: a copy of a val or test image"))
    clean = _read(ds / "views" / "clean" / "entries.parquet", ["key"])
    aum = _read(ds / "annotations" / "aum.parquet", ["key", "flagged"])
    if clean is not None:
        n = clean["key"].n_unique()
        before = stored - (0 if dedup is None else dups + leaks)
        rows.append(("clean view", f"{n}", f"{before - n}" if before != n else "",
                     "other [clean] filters" if before != n else "what round 1 trains on"))
        if aum is not None:
            flagged = int(aum.filter(pl.col("key").is_in(clean["key"].unique().implode()))["flagged"].sum())
            rule = state["stages"].get("aum", {}).get("stats", {}).get("rule", "")
            rows.append(("aum", "", f"{flagged}", f"AUM-flagged by round 1 ({rule})"))
    filtered = _read(ds / "views" / "filtered" / "entries.parquet", ["key", "label"])
    if filtered is not None:
        rows.append(("filtered view", f"{filtered['key'].n_unique()}", "", "clean minus AUM-flagged: what the "
                     "[[models]] train on"))
    for name, opts in cfg.train.items():
        per = opts.get("per_class")
        v = _read(ds / "views" / opts["view"] / "entries.parquet", ["key", "label"])
        if per and v is not None:
            counts = v.unique("key").group_by("label").len()["len"].to_numpy()
            short, over = int((counts < per).sum()), int((counts > per).sum())
            rows.append((f"class balance ({name})", f"{per * len(counts)} / epoch", "",
                         f"--per-class {per}: {short} classes repeated up to it, {over} sampled down to it, "
                         "redrawn each epoch"))
    for split in ("val", "test"):
        if split in manifest["splits"]:
            meta = manifest["splits"][split]
            rows.append((split, f"{meta['samples']}", f"{meta['errors']}", f"{split} images stored (rejected: "
                                                                              f"{meta['errors']})"))
    return rows


def model_rows(cfg: Config, state: dict[str, Any]) -> tuple[list[list[str]], dict[str, list[dict]]]:
    """Per model: view, epochs, full-val metrics of the last epoch, held-out-half metrics; then the fusions."""
    ens_path = cfg.out / "ensemble" / "metrics.json"
    ens = json.loads(ens_path.read_text()) if ens_path.exists() else {}
    rows, curves = [], {}
    pct = lambda v: "" if v is None else f"{100 * v:.2f}"  # noqa: E731
    for name, opts in cfg.train.items():
        path = cfg.run_dir(name) / "metrics.jsonl"
        if not path.exists():
            continue
        recs = list({r["epoch"]: r for r in map(json.loads, path.read_text().splitlines()) if r}.values())
        curves[name] = recs
        last, held = recs[-1] if recs else {}, ens.get("models", {}).get(name, {})
        how = opts["view"] + (f", --per-class {opts['per_class']}" if opts.get("per_class") else "") + (
            f", --stages {opts['stages']}" if opts.get("stages") else "") + (", --aum" if opts.get("aum") else "")
        rows.append([name, how, str(len(recs)), *(pct(last.get(f"val_{m}")) for m in METRICS),
                     *(pct(held.get(f"heldout_{m}")) for m in METRICS)])
    for k in ("average", "ga"):
        if k in ens:
            rows.append([f"ensemble: {k}", "weights fitted on the other half" if k == "ga" else "equal weights", "",
                         "", "", "", "", *(pct(ens[k].get(f"heldout_{m}")) for m in METRICS)])
    return rows, curves


def curves_png(curves: dict[str, list[dict]], path: Path, width: int = 760, height: int = 300) -> Path:
    """Val top-1 per epoch of every model, one line each."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), (255, 255, 255))
    d, font = ImageDraw.Draw(img), ImageFont.load_default()
    left, right, top, bottom = 46, width - 150, 24, height - 34
    epochs = max((len(r) for r in curves.values()), default=1)
    d.text((left, 6), "val top-1 (%) per epoch", fill=(0, 0, 0), font=font)
    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for v in range(0, 101, 20):
        y = bottom - (bottom - top) * v / 100
        d.line([left, y, right, y], fill=(225, 225, 225))
        d.text((left - 28, y - 6), f"{v:3d}", fill=(0, 0, 0), font=font)
    d.text(((left + right) // 2 - 20, bottom + 14), "epoch", fill=(0, 0, 0), font=font)
    step = (right - left) / max(epochs - 1, 1)
    for i, (name, recs) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = [(left + step * j, bottom - (bottom - top) * r.get("val_top1", 0)) for j, r in enumerate(recs)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        d.line([right + 12, top + 10 + 16 * i, right + 32, top + 10 + 16 * i], fill=colour, width=3)
        d.text((right + 38, top + 4 + 16 * i), name, fill=(0, 0, 0), font=font)
    for j in range(epochs):
        if epochs <= 20 or j % 5 == 0:
            d.text((left + step * j - 3, bottom + 2), str(j), fill=(0, 0, 0), font=font)
    img.save(path)
    return path


def _table(head: list[str], rows: list[list[str]] | list[tuple], cls: str = "") -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><tr>{h}</tr>{body}</table>"


def _link(out: Path, target: Path, text: str | None = None) -> str:
    rel = os.path.relpath(target, out)
    return f"<a href='{html.escape(rel)}'>{html.escape(text or rel)}</a>"


def write_report(cfg: Config, state: dict[str, Any]) -> Path:
    """Write OUT/report.html and OUT/figures/curves.png; link the figures the stages wrote."""
    out, figs = cfg.out, cfg.out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    models, curves = model_rows(cfg, state)
    parts = ["<!doctype html><meta charset='utf-8'><title>wvdata recipe report</title><style>"
             "body{font:14px sans-serif;margin:20px;max-width:1350px}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}th{background:#eee}"
             "td:nth-child(n+2){font-variant-numeric:tabular-nums}img{max-width:100%;border:1px solid #ccc}"
             "code{background:#f4f4f4}</style>",
             "<h1>wvdata recipe report</h1>",
             f"<p>config <code>{html.escape(cfg.path)}</code>, crawl <code>{html.escape(str(cfg.crawl))}</code>, "
             f"written {time.strftime('%Y-%m-%d %H:%M:%S')}. Dataset: {_link(out, cfg.dataset / 'dataset.json')}; "
             f"what each stage consumed: {_link(out, out / 'recipe-state.json')}.</p>",
             "<h2>Funnel: train samples through the stages</h2>",
             _table(["stage", "samples after", "dropped", "why"], funnel(cfg, state))]
    parts += ["<h2>Models on val</h2><p>Full val (last epoch) and the held-out half of val the ensemble reports on "
              "(the ensemble's weights are fitted on the other half). Percent.</p>" if models else
              "<h2>Models on val</h2><p>No model trained yet.</p>",
              "" if not models else _table(MODEL_HEAD, models)]
    if curves:
        curves_png(curves, figs / "curves.png")
        parts.append("<p><img src='figures/curves.png' alt='val top-1 per epoch'></p>")
        parts.append("<p>Run directories: " + ", ".join(
            f"{name} ({_link(out, cfg.run_dir(name) / 'metrics.jsonl', 'metrics')}, "
            f"{_link(out, cfg.run_dir(name) / 'train.log', 'log')})" for name in curves
            if (cfg.run_dir(name) / "train.log").exists()) + "</p>")
    if (out / "ensemble" / "weights.json").exists():
        w = json.loads((out / "ensemble" / "weights.json").read_text())
        parts.append("<p>Ensemble weights: " + ", ".join(f"{html.escape(k)} {v:.3f}" for k, v in w.items()) +
                     f" ({_link(out, out / 'ensemble' / 'metrics.json', 'metrics.json')})</p>")
    stage_rows = []
    for name, rec in state["stages"].items():
        s = rec.get("stats") or {}
        secs = s.get("seconds") or rec.get("seconds")
        ips = f"{s['images'] / secs:.0f}" if s.get("images") and secs else ""
        status = "this report" if name == "report" else rec.get("status", "")
        stage_rows.append([name, status, time.strftime("%H:%M:%S", time.localtime(rec["started"]))
                           if rec.get("started") else "", f"{secs:.1f}" if secs else "",
                           f"{int(s['images'])}" if s.get("images") else "", ips])
    parts += ["<h2>Stages</h2><p>Images/sec: images the stage processed (a training stage: every image of every "
              "epoch) per second of it. A stage whose inputs and options did not change since it finished is "
              "skipped, and its row shows when it last ran.</p>",
              _table(["stage", "status", "last started", "seconds", "images", "images/sec"], stage_rows)]
    for fig, title, text in (
            ("dedup.png", "Duplicates and leaks", "The largest duplicate clusters (KEEP: the image kept) and every "
             "train image that copies a val or test image (LEAK, dropped)."),
            ("aum.png", "Lowest-AUM images", "Area under the margin from round 1: the histogram with the cut, then "
             "the lowest-AUM images of the most-flagged classes with their given label (FLAG: dropped from the "
             "filtered view)."),
            ("curriculum.png", "Curriculum subsets", "CurriculumNet density subsets of a few classes: subset 1 "
             "(dense, most likely clean) to 3 (sparse, most likely noisy).")):
        if (figs / fig).exists():
            parts.append(f"<h2>{title}</h2><p>{text}</p><p><a href='figures/{fig}'>"
                         f"<img src='figures/{fig}' alt='{title}'></a></p>")
    (out / "report.html").write_text("\n".join(parts) + "\n", encoding="utf-8")
    print(f"wrote {out / 'report.html'}")
    return out / "report.html"


def print_summary(cfg: Config, state: dict[str, Any], seconds: float) -> None:
    """The last lines: each model's val accuracy, round 1 against the AUM-filtered rounds, where the report is."""
    print(f"\nrecipe finished in {seconds:.0f}s; val accuracy (top-1 / class-averaged top-5):")
    acc = {}
    for name in cfg.train:
        st = state["stages"].get(name, {}).get("stats", {})
        if "val_top1" in st:
            acc[name] = st["val_top1"]
            print(f"  {name:<14} {100 * st['val_top1']:6.2f}% / {100 * st['val_class_top5']:6.2f}%  "
                  f"(chance {100 / max(1, _num_classes(cfg)):.0f}%)")
    ens = cfg.out / "ensemble" / "metrics.json"
    if ens.exists():
        m = json.loads(ens.read_text())
        for k in ("average", "ga"):
            if k in m:
                print(f"  ensemble {k:<5} {100 * m[k]['heldout_top1']:6.2f}% / {100 * m[k]['heldout_class_top5']:6.2f}%"
                      "  (held-out half of val)")
    for name, a in acc.items():
        if name != "round1" and cfg.train[name]["view"] == "filtered" and "round1" in acc:
            verdict = "beats" if a > acc["round1"] else "does not beat"
            print(f"AUM-filtered {name} {100 * a:.2f}% {verdict} round 1 {100 * acc['round1']:.2f}% (val top-1)")
    print(f"report: {cfg.out / 'report.html'}")


def _num_classes(cfg: Config) -> int:
    try:
        return len(json.loads((cfg.dataset / "dataset.json").read_text())["classes"])
    except (OSError, ValueError, KeyError):
        return 0


def print_plan(cfg: Config) -> int:
    """`--list`: each stage, whether it would run now, and its command."""
    from .recipe import plan, read_state, stage_fingerprint, up_to_date

    state = read_state(cfg.out) if cfg.out.is_dir() else {"stages": {}}
    stages = plan(cfg)
    for st in stages:
        fp = stage_fingerprint(st, state, [s.name for s in stages])[0]
        status = "done" if up_to_date(st, state["stages"].get(st.name), fp) else "to run"
        print(f"{st.name:<12} {status:<7} {st.command}")
    return 0
