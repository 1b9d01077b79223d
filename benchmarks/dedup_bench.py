"""Dedup benchmark: hashing images/sec vs `imagehash.phash`, and near-duplicate search over
1,000,000 random 64-bit hashes (wvdata's compiled multi-index hashing; FAISS's flat and
IndexBinaryMultiHash timed alongside) vs a numpy popcount brute force.

    python -m benchmarks.dedup_bench [--images 240] [--hashes 1000000] [--brute-queries 2000]

Both hashing paths run in this one process on the same JPEG bytes (photos bundled with
scikit-image at several web-typical sizes). The brute force over all 1M x 1M pairs would take
far too long, so it is timed on a subset of the queries and extrapolated linearly (it does the
same work per query); its pairs are compared with FAISS's on that subset.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

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
    of look-alikes, 64-bit search hash (min over views) and crop-aligned 256-bit pHash."""
    import itertools

    from wvdata.dedup import SEARCH_VIEWS
    from wvdata.dedup.hashing import aligned_distance, hamming, hash_images
    from wvdata.synth import duplicates as synth

    def search_d(a: bytes, b: bytes, views) -> tuple[int, int]:
        h = hash_images([a, b], views=views)
        d = min(int(hamming(h.bits[0, :], h.bits[1, 0]).min()), int(hamming(h.bits[1, :], h.bits[0, 0]).min()))
        return int(hamming(h.bits[0, 0], h.bits[1, 0])), d

    print("quality: max over 14 photos (copies) / min over pairs (look-alikes)")
    print(f"  {'set':22s} {'64b whole':>9s} {'64b views':>9s} {'256b aligned':>12s}")
    rows: dict[str, list] = {}
    for _, orig, copies in synth.near_duplicates():
        for t, data in copies.items():
            rows.setdefault(t, []).append((*search_d(orig, data, SEARCH_VIEWS), aligned_distance(orig, data)))
    for t, v in rows.items():
        a = np.array(v).max(axis=0)
        print(f"  copy {t:17s} {a[0]:9d} {a[1]:9d} {a[2]:12d}")
    for g, datas in synth.look_alikes().items():
        v = [(*search_d(datas[i], datas[j], SEARCH_VIEWS), aligned_distance(datas[i], datas[j]))
             for i, j in itertools.combinations(range(len(datas)), 2)]
        a = np.array(v).min(axis=0)
        print(f"  look-alike {g:11s} {a[0]:9d} {a[1]:9d} {a[2]:12d}")


def _faiss_threads() -> int:
    import faiss

    return faiss.omp_get_max_threads()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--hashes", type=int, default=1_000_000)
    p.add_argument("--radius", type=int, default=10)
    p.add_argument("--planted", type=int, default=2000)
    p.add_argument("--brute-queries", type=int, default=2000)
    p.add_argument("--quality", action="store_true", help="also print the distance tables")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when piped to a file
    print(f"wvdata dedup benchmark ({os.cpu_count()} cores)")
    if args.quality:
        run_quality()
    rates = run_hashing(args.images)
    search = run_search(args.hashes, args.radius, args.planted, args.brute_queries)
    base = rates["imagehash.phash (per image)"]
    print(f"summary: hashing {rates['wvdata fast, 1 view'] / base:.1f}x imagehash "
          f"(exact mode {rates['wvdata exact (bit-equal)'] / base:.1f}x); "
          f"search {search['speedup']:.0f}x brute force, same pairs: {search['same_pairs']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
