"""Dedup benchmark: hashing images/sec vs `imagehash.phash`; near-duplicate search over
1,000,000 random 64-bit hashes (wvdata's compiled multi-index hashing; FAISS's flat and
IndexBinaryMultiHash timed alongside) vs a numpy popcount brute force; a duplicate-heavy crawl
(2,000 crops of 7 photos), whole `wvdata dedup` CLI vs imagededup; and 1,000,000 images at the
signature level (no decode) with clusters of up to 10,000 members: search + verify + cluster.

    python -m benchmarks.dedup_bench [--scale small|full] [--sections hashing,search,heavy,signatures]

Both hashing paths run in this one process on the same JPEG bytes (photos bundled with
scikit-image at several web-typical sizes). The brute force over all 1M x 1M pairs would take
far too long, so it is timed on a subset of the queries and extrapolated linearly (it does the
same work per query); its pairs are compared with FAISS's on that subset.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def bench_images(n: int, seed: int = 0) -> list[bytes]:
    """n JPEGs (q90) cut from bundled photos, long side 400-1200 px like crawled images."""
    from PIL import Image

    from wvdata.synth import duplicates as synth

    rng = np.random.default_rng(seed)
    photos = [synth.photo(p) for p in synth.PHOTOS]
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(.7, 1)), int(h * rng.uniform(.7, 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        side = int(rng.integers(400, 1201))
        s = side / max(cw, ch)
        crop = im.crop((x, y, x + cw, y + ch)).resize((max(1, int(cw * s)), max(1, int(ch * s))),
                                                     Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _rate(fn, n: int, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def run_hashing(n_images: int) -> dict[str, float]:
    import imagehash
    from PIL import Image

    from wvdata.dedup import SEARCH_VIEWS
    from wvdata.dedup.hashing import FULL, hash_images, to_hex

    datas = bench_images(n_images)
    mpix = np.mean([Image.open(io.BytesIO(d)).size[0] * Image.open(io.BytesIO(d)).size[1]
                    for d in datas]) / 1e6
    print(f"hashing: {len(datas)} JPEGs, mean {mpix:.2f} Mpixel, one process")
    ref = [str(imagehash.phash(Image.open(io.BytesIO(d)))) for d in datas]

    def batched(**kw):
        return lambda: [hash_images(datas[s:s + 256], **kw) for s in range(0, len(datas), 256)]

    rates = {"imagehash.phash (per image)": _rate(
        lambda: [imagehash.phash(Image.open(io.BytesIO(d))) for d in datas], len(datas))}
    rates["wvdata exact (bit-equal)"] = _rate(batched(exact=True, extras=False), len(datas))
    rates["wvdata exact + dedup extras (7 views + 256-bit + chroma)"] = _rate(
        batched(exact=True, views=SEARCH_VIEWS), len(datas))
    rates["wvdata fast, 1 view"] = _rate(batched(exact=False), len(datas))
    rates["wvdata fast, dedup default (7 views + 256-bit + chroma)"] = _rate(
        batched(exact=False, views=SEARCH_VIEWS), len(datas))
    exact = to_hex(hash_images(datas, exact=True, views=(FULL,), extras=False).bits[:, 0])
    fast = hash_images(datas, exact=False).bits[:, 0]
    dist = [bin(int(a, 16) ^ int(b, 16)).count("1") for a, b in zip(to_hex(fast), ref)]
    base = rates["imagehash.phash (per image)"]
    for name, r in rates.items():
        print(f"  {name:58s} {r:8.0f} img/s  {r / base:5.2f}x")
    print(f"  exact mode equal to imagehash: {sum(a == b for a, b in zip(exact, ref))}/{len(ref)}")
    print(f"  fast vs imagehash, bits differing of 64: mean {np.mean(dist):.2f}, "
          f"max {max(dist)}, share equal {np.mean(np.array(dist) == 0):.2f}")
    return rates


def run_search(n: int, radius: int, n_planted: int, brute_queries: int, seed: int = 0) -> dict:
    from wvdata.dedup.search import brute_force_pairs, range_pairs

    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, size=(n, 8), dtype=np.uint8)
    # plant near duplicates: row dst becomes row src with k random bits flipped
    src = rng.choice(n, n_planted, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), n_planted, replace=False)
    flips = rng.integers(0, radius + 4, n_planted)  # some beyond the radius: must not be found
    for s, d, k in zip(src, dst, flips):
        bits = np.unpackbits(codes[s])
        bits[rng.choice(64, k, replace=False)] ^= 1
        codes[d] = np.packbits(bits)
    from wvdata.dedup import _mih

    nhash, b, nflip = _mih.params(n, radius)
    print(f"search: {n} random 64-bit hashes, radius {radius}, {n_planted} planted pairs "
          f"(0-{radius + 3} bits apart); wvdata mih nhash={nhash} b={b} nflip={nflip}, "
          f"threads={_faiss_threads()}")
    range_pairs(codes[:1000], codes[:10], radius, "mih")  # compile (cached on disk afterwards)
    t = time.perf_counter()
    q, i, d = range_pairs(codes, codes, radius, "auto")
    t_mih = time.perf_counter() - t
    pairs = {(int(a), int(c)) for a, c in zip(q, i) if a < c}
    want = {(int(min(s, d)), int(max(s, d))) for s, d, k in zip(src, dst, flips) if k <= radius}
    beyond = {(int(min(s, d)), int(max(s, d))) for s, d, k in zip(src, dst, flips) if k > radius}
    print(f"  wvdata dedup search (auto = mih), all {n} queries: {t_mih:.2f}s; {len(pairs)} pairs; "
          f"planted within radius found {len(want & pairs)}/{len(want)}; planted beyond found {len(beyond & pairs)}")
    sub = np.sort(np.concatenate([src[:brute_queries // 2],
                                  rng.choice(n, brute_queries - brute_queries // 2, replace=False)]))
    t = time.perf_counter()
    bq, bi, _ = brute_force_pairs(codes, codes[sub], radius)
    t_sub = time.perf_counter() - t
    t_brute = t_sub * n / len(sub)
    brute = {(int(sub[a]), int(c)) for a, c in zip(bq, bi) if sub[a] != c}
    sub_set = set(sub.tolist())
    mine = {(int(a), int(c)) for a, c in zip(q, i) if int(a) in sub_set and a != c}
    print(f"  numpy popcount brute force: {len(sub)} queries in {t_sub:.2f}s -> "
          f"{t_brute:.0f}s extrapolated to {n} queries (linear; 1 thread)")
    print(f"  same pairs on those {len(sub)} queries: {brute == mine} ({len(brute)} pairs)")
    print(f"  speed-up vs numpy brute force: {t_brute / t_mih:.0f}x (target >= 50x)")
    for method, nq in (("multihash", 2000), ("flat", 2000)):
        t = time.perf_counter()
        range_pairs(codes, codes[:nq], radius, method)
        est = (time.perf_counter() - t) * n / nq
        print(f"  (faiss {method}: {est:.0f}s extrapolated from {nq} queries -> wvdata is {est / t_mih:.0f}x faster)")
    return {"search_s": t_mih, "brute_s": t_brute, "speedup": t_brute / t_mih,
            "same_pairs": brute == mine}


def run_quality() -> None:
    """The measurements behind dedup's defaults (docs/dedup.md): distances of true copies and
    of look-alikes, 64-bit search hash (whole, min over views) and the 256-bit signature."""
    import itertools

    from wvdata.dedup import SEARCH_VIEWS
    from wvdata.dedup.hashing import hamming, hash_images, signature_distance
    from wvdata.synth import duplicates as synth

    def dists(a: bytes, b: bytes) -> tuple[int, int, int]:
        h = hash_images([a, b], views=SEARCH_VIEWS)
        d = min(int(hamming(h.bits[0, :], h.bits[1, 0]).min()), int(hamming(h.bits[1, :], h.bits[0, 0]).min()))
        return int(hamming(h.bits[0, 0], h.bits[1, 0])), d, int(signature_distance(h.vsig[0], h.vsig[1]))

    print("quality: max over 14 photos (copies) / min over pairs (look-alikes)")
    print(f"  {'set':22s} {'64b whole':>9s} {'64b views':>9s} {'256b signature':>14s}")
    rows: dict[str, list] = {}
    for _, orig, copies in synth.near_duplicates():
        for t, data in copies.items():
            rows.setdefault(t, []).append(dists(orig, data))
    for t, v in rows.items():
        a = np.array(v).max(axis=0)
        print(f"  copy {t:17s} {a[0]:9d} {a[1]:9d} {a[2]:14d}")
    for g, datas in synth.look_alikes().items():
        v = [dists(datas[i], datas[j]) for i, j in itertools.combinations(range(len(datas)), 2)]
        a = np.array(v).min(axis=0)
        print(f"  look-alike {g:11s} {a[0]:9d} {a[1]:9d} {a[2]:14d}")


def _faiss_threads() -> int:
    import faiss

    return faiss.omp_get_max_threads()


SCALES = {  # sizes per --scale: hashing images, search hashes, brute-force queries, heavy crawl,
    # signature-level images, largest cluster, images of the collapse-vs-pairwise comparison
    "small": dict(images=60, hashes=100_000, brute=200, heavy=300, sigs=100_000, max_cluster=1_000, compare=20_000),
    "full": dict(images=240, hashes=1_000_000, brute=2000, heavy=2000, sigs=1_000_000, max_cluster=10_000,
                 compare=100_000),
}
SECTIONS = ("hashing", "search", "heavy", "signatures")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=tuple(SCALES), default="full")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}")
    p.add_argument("--radius", type=int, default=10)
    p.add_argument("--planted", type=int, default=2000)
    p.add_argument("--clustered", type=float, default=0.5, help="share of images in clusters (signatures)")
    p.add_argument("--sigs", type=int, default=None, help="signature-level images (overrides --scale)")
    p.add_argument("--max-cluster", type=int, default=None, help="largest cluster (overrides --scale)")
    p.add_argument("--quality", action="store_true", help="also print the distance tables")
    args = p.parse_args(argv)
    sc = dict(SCALES[args.scale])
    sc["sigs"] = args.sigs or sc["sigs"]
    sc["max_cluster"] = args.max_cluster or sc["max_cluster"]
    sections = [s for s in args.sections.split(",") if s]
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when piped to a file
    from benchmarks._common import machine

    print(machine())
    print(f"wvdata dedup benchmark ({os.cpu_count()} cores, --scale {args.scale}, sections {sections})")
    if args.quality:
        run_quality()
    if "heavy" in sections:  # first: fresh processes, before this one holds much memory
        run_heavy(sc["heavy"])
    if "hashing" in sections:
        rates = run_hashing(sc["images"])
        base = rates["imagehash.phash (per image)"]
        print(f"summary: hashing {rates['wvdata fast, 1 view'] / base:.1f}x imagehash "
              f"(exact mode {rates['wvdata exact (bit-equal)'] / base:.1f}x)")
    if "search" in sections:
        search = run_search(sc["hashes"], args.radius, args.planted, sc["brute"])
        print(f"summary: search {search['speedup']:.0f}x brute force, same pairs: {search['same_pairs']}")
    if "signatures" in sections:
        run_signatures(sc["sigs"], sc["max_cluster"], args.clustered, sc["compare"])
    return 0




# ---------------------------------------------------------------- (b) 1M signatures, no decode


def synthetic_signatures(n: int, max_cluster: int, clustered: float = 0.3, spread: int = 6,
                         seed: int = 0):
    """Hashes of n images without decoding any: a share `clustered` of them in clusters of
    max(2, max_cluster // k) members (k = 1, 2, ...: a few popular images, many pairs), each
    member's whole-image hash and view hashes within `spread` bits of its cluster's, its
    verification signature within 8 bits per view of its cluster's; the rest random.
    Returns (Hashes, true cluster id per image (-1: none))."""
    from wvdata.dedup import SEARCH_VIEWS
    from wvdata.dedup.hashing import VERIFY_VIEWS, Hashes

    rng = np.random.default_rng(seed)
    sizes, total, k = [], 0, 1
    while total < clustered * n:
        s = min(max(2, max_cluster // k), int(clustered * n) - total)
        if s < 2:
            break
        sizes.append(s)
        total += s
        k += 1
    truth = np.full(n, -1, np.int64)
    truth[:total] = np.repeat(np.arange(len(sizes)), sizes)
    v, vv = len(SEARCH_VIEWS), len(VERIFY_VIEWS)
    bits = rng.integers(0, 1 << 64, size=(n, v), dtype=np.uint64)
    vsig = rng.integers(0, 256, size=(n, vv, 32), dtype=np.uint8)
    chroma = rng.uniform(-30, 30, size=(n, 2)).astype(np.float32)
    m = np.arange(total)
    cid = truth[:total]
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])[cid]  # each member copies its cluster's first
    bits[m] = bits[first]
    vsig[m] = vsig[first]
    chroma[m] = chroma[first] + rng.uniform(-3, 3, size=(total, 2)).astype(np.float32)
    for j in range(v):  # up to `spread` random bit flips per hash
        flips = rng.integers(0, spread + 1, total)
        for f in range(1, spread + 1):
            pos = rng.integers(0, 64, size=(total, 1)).astype(np.uint64)
            bits[m, j] ^= np.where(flips >= f, np.uint64(1) << pos[:, 0], np.uint64(0))
    for _ in range(4):  # verification signature: up to 4 flipped bits per view
        pos = rng.integers(0, 256, size=(total, vv))
        vsig[m[:, None], np.arange(vv)[None, :], pos // 8] ^= (1 << (pos % 8)).astype(np.uint8)
    packed = bits.astype("<u8").view(np.uint8).reshape(n, v, 8)
    h = Hashes(packed, vsig, np.full(n, 128, np.float32), np.full(n, 50, np.float32), chroma,
               np.ones(n, bool), np.ones(n, bool))
    return h, truth


def pair_scores(truth: np.ndarray, found: np.ndarray) -> tuple[float, float]:
    """Pair precision and recall of labels `found` against `truth` (-1: a singleton) by counting."""
    def pairs(labels):
        _, c = np.unique(labels, return_counts=True)
        return int((c * (c - 1) // 2).sum())
    t = np.where(truth < 0, -1 - np.arange(len(truth)), truth)
    both = t * (int(found.max()) + 1) + found
    tp = pairs(both)
    return tp / max(pairs(found), 1), tp / max(pairs(t), 1)


# ---------------------------------------------------------------- (a) duplicate-heavy crawl, whole CLI

OUT = Path(__file__).resolve().parent / "out"

_IMAGEDEDUP = """
import sys
from imagededup.methods import PHash
ph = PHash(verbose=False)
enc = ph.encode_images(image_dir=sys.argv[1], recursive=True, num_enc_workers=int(sys.argv[2]))
dup = ph.find_duplicates(encoding_map=enc, max_distance_threshold=10, num_dist_workers=int(sys.argv[2]))
print(f"imagededup: {len(enc)} images encoded, {sum(1 for v in dup.values() if v)} with a duplicate")
"""


def heavy_set(n: int, seed: int = 0) -> tuple[Path, Path]:
    """(folder crawl, built dataset) of `synth.duplicates.photo_crops(n)`, cached under
    benchmarks/out/ (built without resizing: the stored JPEGs are the crawled bytes)."""
    root = OUT / f"dedup-heavy-{n}-{seed}-v1"
    src, ds = root / "src", root / "ds"
    if not (root / "complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        from wvdata.synth.duplicates import photo_crops

        for i, (name, data) in enumerate(photo_crops(n, seed=seed)):
            (src / name).mkdir(parents=True, exist_ok=True)
            (src / name / f"{i:05d}.jpg").write_bytes(data)
        subprocess.run([sys.executable, "-c", "import sys; from wvdata.build import build; "
                        "build(sys.argv[1], sys.argv[2], layout='folder', workers=2, progress=False)",
                        str(src), str(ds)], check=True)
        (root / "complete").write_text("ok\n")
    return src, ds


def run_heavy(n: int, workers: int = 2) -> dict:
    """Whole `wvdata dedup` CLI vs imagededup PHash (encode + find_duplicates, radius 10), each a
    fresh process on the same 2 cores, the files in the page cache for both."""
    from benchmarks._common import load, read_all, result

    src, ds = heavy_set(n)
    files = sorted(p for p in src.rglob("*.jpg"))
    mb = read_all(files) / 1e6
    read_all(p for p in ds.rglob("*") if p.is_file())
    print(f"heavy: {len(files)} JPEGs ({mb:.0f} MB) cut from {len(list(src.iterdir()))} photos, "
          f"folder layout, built without resizing; {workers} workers each; {load()}")
    wv = str(Path(sys.executable).with_name("wvdata"))
    # numba compiles wvdata's kernels on a machine's first run and caches them on disk: warm that
    # cache (untimed) so the timed run is what every later run costs
    subprocess.run([sys.executable, "-c", "from benchmarks.dedup_bench import synthetic_signatures as s; "
                    "from wvdata.dedup.search import link; h = s(3000, 100, seed=1)[0]; "
                    "[link(h, 10, m, flat_std=4.0) for m in ('auto', 'mih')]"], check=True)
    t = time.perf_counter()
    out = subprocess.run([wv, "dedup", str(ds), "--workers", str(workers), "--no-progress"],
                         capture_output=True, text=True, check=True).stdout
    t_wv = time.perf_counter() - t
    t = time.perf_counter()
    idd = subprocess.run([sys.executable, "-c", _IMAGEDEDUP, str(src), str(workers)],
                         capture_output=True, text=True, check=True).stdout
    t_idd = time.perf_counter() - t
    for line in out.splitlines()[:1] + [x for x in out.splitlines() if "bits, radius" in x]:
        print("  wvdata: " + line.strip())
    print("  " + idd.strip().splitlines()[-1])
    print(f"  whole run: wvdata dedup {t_wv:.1f}s, imagededup {t_idd:.1f}s -> {t_idd / t_wv:.2f}x "
          f"(target >= 3x); {load()}")
    result("dedup", f"duplicate-heavy crawl ({len(files)} JPEGs), whole wvdata dedup CLI", t_wv, "s",
           baseline="imagededup PHash encode + find_duplicates", baseline_value=t_idd,
           higher_is_better=False, target=3.0)
    return {"wvdata_s": t_wv, "imagededup_s": t_idd}


def run_signatures(n: int, max_cluster: int, clustered: float, compare_n: int) -> dict:
    """search + verify + cluster over `synthetic_signatures` (no decode), peak memory; then the
    collapse path against the plain pairwise path (every image queries) on a smaller set."""
    import resource

    from benchmarks._common import load, result
    from wvdata.dedup.cluster import components
    from wvdata.dedup.search import link, range_pairs

    warm = synthetic_signatures(3000, 100, seed=1)[0]  # compile the kernels (cached on disk)
    link(warm, 10, flat_std=4.0)
    range_pairs(warm.bits[:, 0], warm.bits[:100, 1], 10, "mih")
    h, truth = synthetic_signatures(n, max_cluster, clustered)
    sizes = np.bincount(truth[truth >= 0])
    print(f"signatures: {n} images, {len(sizes)} clusters of {sizes.min()}-{sizes.max()} holding "
          f"{int(sizes.sum())} ({clustered:.0%}), the rest random; 7 search hashes + {h.vsig.shape[1]} "
          f"x 256-bit signature per image ({h.vsig.nbytes / 1e6:.0f} MB); {load()}")
    t, c = time.perf_counter(), time.process_time()
    lk = link(h, 10, "auto", flat_std=4.0)
    t_link = time.perf_counter() - t
    t1, c1 = time.perf_counter(), time.process_time()
    labels = components(n, lk.edges[:, 0], lk.edges[:, 1])
    keep = np.unique(labels, return_index=True)[1]  # one kept per cluster (here: the first)
    phases = dict(lk.stats["phases"], clusters=(time.perf_counter() - t1, time.process_time() - c1))
    t_all, c_all = time.perf_counter() - t, time.process_time() - c
    p, r = pair_scores(truth, labels)
    out = {"seconds": t_all, "cpu_seconds": c_all, "precision": p, "recall": r, "phases": phases}
    stats = {k: v for k, v in lk.stats.items() if k != "phases"}
    print(f"  search + verify {t_link:.1f}s, + clusters and keep {t_all:.1f}s ({len(keep)} kept), "
          f"{c_all:.1f} CPU-s (all threads); pair precision {p:.4f}, recall {r:.4f}; {stats}")
    print("  phases (wall s / CPU-s): " + ", ".join(f"{k} {w:.1f} / {cc:.1f}" for k, (w, cc) in phases.items()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"  peak memory (max RSS of this process): {peak:.2f} GB; {load()}")
    result("dedup", f"{n} images at the signature level: search + verify + cluster", out["seconds"], "s",
           higher_is_better=False, target=60.0 if n >= 1_000_000 else None)  # the target is for 1M
    del h
    hs, ts = synthetic_signatures(compare_n, max(2, max_cluster // 5), clustered, seed=2)
    print(f"  collapse vs pairwise on {compare_n} images (clusters up to {max(2, max_cluster // 5)}):")
    for name, dense in (("collapse", 24), ("pairwise", None)):
        t = time.perf_counter()
        lk = link(hs, 10, "auto", flat_std=4.0, dense_min=dense)
        labels = components(compare_n, lk.edges[:, 0], lk.edges[:, 1])
        p, r = pair_scores(ts, labels)
        print(f"    {name:9s} {time.perf_counter() - t:6.1f}s  precision {p:.4f} recall {r:.4f}  "
              f"candidates {lk.stats['candidates']}, checks {lk.stats['checks']}")
    out["peak_gb"] = peak
    return out


if __name__ == "__main__":
    raise SystemExit(main())
