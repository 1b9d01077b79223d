"""Batched perceptual hashes (pHash, dHash) of encoded images, bit-compatible with `imagehash`.

Two decode modes:

- ``exact``: full-size decode, convert("L"), LANCZOS resize to (4*hash_size)² by Pillow:
  the very calls `imagehash.phash` makes, then scipy's DCT batched over the images, so the
  bits equal `imagehash.phash(Image.open(...), hash_size)` (tested on real photos, flat
  images included). Not faster than imagehash: the full decode and full-size LANCZOS are
  the cost, and exactness needs both.
- ``fast`` (default): JPEG reduced-size decoding (Pillow ``draft``: libjpeg DCT scaling by
  1/2, 1/4 or 1/8, straight to YCbCr, so one entropy decode gives luma and chroma) to no
  less than FAST_MIN_SIDE pixels a side, one LANCZOS resize to a 64x64 intermediate, and
  every view's hash from it through fixed matrices (crop + Lanczos + DCT folded together).
  Exactness holds only where nothing is scaled (JPEGs under 2*FAST_MIN_SIDE a side, stored
  grayscale); elsewhere JPEG luma differs from Pillow's RGB->L by rounding and DCT scaling
  differs from a full-size LANCZOS. Measured on 240 web-sized photos: 0.24 bits of 64 differ
  on average (max 2, 88% identical) at 3.4x imagehash's speed (docs/dedup.md).

Dedup's verification signature comes from the same pass: the 256-bit pHash of the whole image
and of `VERIFY_VIEWS` border crops (up to 6% a side), so that checking a candidate pair is
arithmetic on stored bits (`signature_distance`), never a second decode.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

FAST_MIN_SIDE = 64  # draft decode keeps at least this many pixels on each side (hashing)
_GAP = None  # LANCZOS reducing_gap for the intermediate (None: exact LANCZOS)
_LANCZOS = Image.Resampling.LANCZOS
HASHES = ("phash", "dhash")


Box = tuple[float, float, float, float]  # fractions cut off (left, top, right, bottom)
FULL: Box = (0.0, 0.0, 0.0, 0.0)


def _verify_views() -> tuple[Box, ...]:
    """The border crops behind the verification signature (docs/dedup.md measures them): the
    whole image; 1.5/3/4.5/6% off every side; 2/4/6% off one side; 2 or 4% off each of two
    adjacent sides. A copy cut within about 0.5% of one of these is <= 16 bits (of 256) from
    its original's view; distinct look-alikes stay >= 28."""
    views: list[Box] = [FULL] + [(c,) * 4 for c in (0.015, 0.03, 0.045, 0.06)]
    for side in range(4):
        for c in (0.02, 0.04, 0.06):
            views.append(tuple(c if k == side else 0.0 for k in range(4)))  # type: ignore[misc]
    for x, y in ((0, 1), (0, 3), (2, 1), (2, 3)):  # (left|right, top|bottom) corners
        for cx in (0.02, 0.04):
            for cy in (0.02, 0.04):
                views.append(tuple(cx if k == x else cy if k == y else 0.0 for k in range(4)))  # type: ignore[misc]
    return tuple(views)


VERIFY_VIEWS = _verify_views()


@dataclass
class Hashes:
    """Hashes of a batch of images.

    bits: (n, views, bits/8) uint8 search hashes, packed MSB first, so the hex of a row is
        what str(imagehash.phash(...)) prints; view 0 is the whole image.
    vsig: (n, len(VERIFY_VIEWS), 32) uint8, 256-bit pHash of the whole image (view 0) and of
        each verification crop: dedup's verification signature, 1 KB an image.
    mean, std: (n,) gray level statistics of the whole-image 64x64 thumbnail (flat check).
    chroma: (n, 2) mean (Cb, Cr) - 128 of the image; colorful: (n,) bool, some 4x4 cell's
        mean chroma is >= GRAY_CHROMA away from gray (pHash itself is blind to colour).
    ok: (n,) bool, False where the image could not be decoded (its rows are zero).
    """

    bits: np.ndarray
    vsig: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    chroma: np.ndarray
    colorful: np.ndarray
    ok: np.ndarray

    @property
    def vbits(self) -> np.ndarray:
        """(n, 32) uint8: the whole image's 256-bit pHash."""
        return self.vsig[:, 0]

    @classmethod
    def zeros(cls, n: int, views: int, nbytes: int, vviews: int = len(VERIFY_VIEWS)) -> Hashes:
        return cls(np.zeros((n, views, nbytes), np.uint8), np.zeros((n, vviews, 32), np.uint8),
                   np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros((n, 2), np.float32),
                   np.zeros(n, bool), np.zeros(n, bool))


def thumb_size(hash: str, hash_size: int) -> tuple[int, int]:
    """(width, height) of the grayscale thumbnail a hash is computed from."""
    if hash == "phash":
        return hash_size * 4, hash_size * 4
    if hash == "dhash":
        return hash_size + 1, hash_size
    raise ValueError(f"unknown hash {hash!r}; use one of {HASHES}")


def _open_draft(data: bytes, mode: str, min_side: int, exact: bool):
    """Open encoded bytes; in fast mode a JPEG is decoded reduced (DCT scaling) to no less
    than min_side a side, and the box of the original extent in reduced pixels comes back."""
    img = Image.open(io.BytesIO(data))
    if not exact:
        r = img.draft(mode, (min_side, min_side))
        if r is not None:
            return img, r[1]
    return img, None


GRAY_CHROMA = 3.0  # a 4x4 cell's mean |Cb| or |Cr| from which an image counts as colourful


@lru_cache(maxsize=8)
def _dct_matrix(n: int, k: int) -> np.ndarray:
    """First k rows of the unnormalised DCT-II matrix (scipy.fftpack.dct's convention)."""
    i = np.arange(k)[:, None]
    j = np.arange(n)[None, :]
    return (2.0 * np.cos(np.pi * i * (2 * j + 1) / (2 * n))).astype(np.float64)


def phash_bits(thumbs: np.ndarray, hash_size: int, exact: bool) -> tuple[np.ndarray, np.ndarray]:
    """pHash of (m, s, s) uint8 thumbnails: (bits (m, hs*hs) bool, DCT block (m, hs*hs))."""
    m = thumbs.shape[0]
    if exact:  # scipy's FFT-based DCT, batched: same per-line arithmetic as imagehash
        import scipy.fftpack

        x = thumbs.astype(np.float64)
        low = scipy.fftpack.dct(scipy.fftpack.dct(x, axis=1), axis=2)[:, :hash_size, :hash_size]
    else:  # only the hs x hs lowest frequencies: C x C^T with a (hs, s) matrix
        c = _dct_matrix(thumbs.shape[1], hash_size).astype(np.float32)
        low = c @ thumbs.astype(np.float32) @ c.T
    low = low.reshape(m, -1)
    med = np.median(low, axis=1, keepdims=True)
    return low > med, low


def dhash_bits(thumbs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dHash of (m, hs, hs+1) thumbnails: bits (m, hs*hs) and the thumbnail signature."""
    t = thumbs.astype(np.int16)
    bits = (t[:, :, 1:] > t[:, :, :-1]).reshape(len(t), -1)
    sig = t.reshape(len(t), -1).astype(np.float32)
    return bits, sig


def hash_bits(thumbs: np.ndarray, hash: str, hash_size: int, exact: bool) -> np.ndarray:
    """Packed hash bits of (m, h, w) thumbnails."""
    if hash == "phash":
        bits, _ = phash_bits(thumbs, hash_size, exact)
    else:
        bits, _ = dhash_bits(thumbs)
    return np.packbits(bits, axis=1)


def _decode_for_hash(data: bytes, exact: bool, min_side: int, chroma: bool = True):
    """One decode per image: (gray image for the whole-image hash, content box, (4, 4, 2) chroma).

    Fast: JPEG draft to YCbCr at reduced scale (one entropy decode gives luma and chroma).
    Exact: full decode and convert("L") as imagehash does; chroma from the full RGB image.
    """
    img, box = _open_draft(data, "YCbCr", min_side, exact)
    img.load()
    if exact and not chroma:
        gray = img.convert("L")
        return gray, (0.0, 0.0, float(gray.width), float(gray.height)), np.zeros((4, 4, 2), np.float32)
    if img.mode == "YCbCr":
        gray = img.getchannel(0)
        chroma = np.asarray(img.resize((4, 4), Image.Resampling.BOX), np.float32)[:, :, 1:] - 128
    elif img.mode == "L":
        gray, chroma = img, np.zeros((4, 4, 2), np.float32)
    else:
        rgb = img.convert("RGB")
        gray = img.convert("L") if exact else rgb.convert("L")
        small = rgb.resize((4, 4), Image.Resampling.BOX).convert("YCbCr")
        chroma = np.asarray(small, np.float32)[:, :, 1:] - 128
    if box is None:
        box = (0.0, 0.0, float(gray.width), float(gray.height))
    return gray, box, chroma


def _lanczos_matrix(out: int, m: int, lo: float, hi: float) -> np.ndarray:
    """(out, m) Lanczos-3 resampling weights from source span [lo, hi) of m pixels."""
    scale = (hi - lo) / out
    support = max(scale, 1.0)
    centre = lo + (np.arange(out) + 0.5) * scale
    x = (np.arange(m)[None, :] + 0.5 - centre[:, None]) / support
    w = np.sinc(x) * np.sinc(x / 3.0) * (np.abs(x) < 3.0)
    return w / w.sum(axis=1, keepdims=True)


@lru_cache(maxsize=16)
def _view_operators(hash: str, hash_size: int, m: int, views: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Per view, left (k, m) and right (m, k') matrices taking the m x m intermediate straight
    to the DCT block (pHash: DCT folded into the resampling) or to the thumbnail (dHash)."""
    tw, th = thumb_size(hash, hash_size)
    lefts, rights = [], []
    for left, t, r, b in views:
        ry = _lanczos_matrix(th, m, t * m, (1 - b) * m)
        rx = _lanczos_matrix(tw, m, left * m, (1 - r) * m)
        if hash == "phash":
            ry = _dct_matrix(th, hash_size) @ ry
            rx = _dct_matrix(tw, hash_size) @ rx
        lefts.append(ry)
        rights.append(rx.T)
    return np.stack(lefts).astype(np.float32), np.stack(rights).astype(np.float32)


def hash_images(datas: Sequence[bytes], hash: str = "phash", hash_size: int = 8,
                exact: bool = False, views: Sequence[Box] = (FULL,),
                min_side: int = FAST_MIN_SIDE, extras: bool = True) -> Hashes:
    """Hash a batch of encoded images: every view's search hash, plus the 256-bit pHash, gray
    statistics and chroma of the whole image, from one decode each, in one vectorised pass.
    extras=False (exact mode, whole image only) skips the latter: imagehash's work alone.

    Each image is decoded once and resized (Pillow LANCZOS) to an M x M intermediate, M =
    twice the thumbnail side (>= 64); every view's hash comes from it through fixed matrices
    (crop + Lanczos resampling + DCT folded into one left and one right matrix per view),
    one batched matrix product for the whole batch. In exact mode the whole-image hash is
    made from the full decode with the very calls imagehash makes, for bit equality.
    """
    size = thumb_size(hash, hash_size)
    m = max(64, 2 * max(size))
    views = tuple(tuple(float(x) for x in v) for v in views)
    n, v = len(datas), len(views)
    mids = np.zeros((n, m, m), np.uint8)
    exact_thumbs = np.zeros((n, size[1], size[0]), np.uint8)
    chroma = np.zeros((n, 4, 4, 2), np.float32)
    ok = np.ones(n, bool)
    for i, data in enumerate(datas):
        try:
            gray, box, chroma[i] = _decode_for_hash(data, exact, min_side, extras)
            if exact:
                exact_thumbs[i] = np.asarray(gray.resize(size, _LANCZOS))  # as imagehash
                if extras or views != (FULL,):
                    mids[i] = np.asarray(gray.resize((m, m), _LANCZOS, reducing_gap=2.0))
            else:
                mids[i] = np.asarray(gray.resize((m, m), _LANCZOS, box=box, reducing_gap=_GAP))
        except Exception:  # noqa: BLE001 - a broken image must not stop a crawl-scale pass
            ok[i] = False
    left, right = _view_operators(hash, hash_size, m, views)
    x = mids.astype(np.float32)[:, None]  # (n, 1, m, m)
    out = left[None] @ x @ right[None]  # (n, v, k, k')
    if hash == "phash":
        low = out.reshape(n, v, -1)
        bits = low > _median(low)
    else:
        t = np.rint(out)
        bits = (t[..., 1:] > t[..., :-1]).reshape(n, v, -1)
    packed = np.packbits(bits, axis=2)
    if exact and FULL in views:
        packed[:, views.index(FULL)] = hash_bits(exact_thumbs, hash, hash_size, True)
    vsig = verify_signature(mids) if extras else np.zeros((n, 1, 32), np.uint8)
    packed[~ok] = 0
    vsig[~ok] = 0
    flat = mids.reshape(n, -1).astype(np.float32)
    colorful = np.abs(chroma).reshape(n, -1).max(axis=1, initial=0.0) >= GRAY_CHROMA
    return Hashes(packed, vsig, flat.mean(axis=1), flat.std(axis=1), chroma.mean(axis=(1, 2)),
                  colorful, ok)


VERIFY_SOURCE = 64  # side of the intermediate the verification crops are resampled from


@lru_cache(maxsize=4)
def _verify_operators(m: int, views: tuple) -> tuple:
    """Row windows' stacked (DCT x Lanczos) matrices, and per row window the views using it with
    their column windows' matrices side by side: the operators of `verify_signature`."""
    rows = sorted({(v[1], v[3]) for v in views})
    dct = _dct_matrix(64, 16)
    dy = np.concatenate([dct @ _lanczos_matrix(64, m, t * m, (1 - b) * m) for t, b in rows])
    per_row = []
    for t, b in rows:
        ks = [k for k, v in enumerate(views) if (v[1], v[3]) == (t, b)]
        right = np.concatenate([(dct @ _lanczos_matrix(64, m, views[k][0] * m, (1 - views[k][2]) * m)).T
                                for k in ks], axis=1)
        per_row.append((ks, np.ascontiguousarray(right, np.float32)))
    return np.ascontiguousarray(dy, np.float32), per_row


def verify_signature(mids: np.ndarray, views: Sequence[Box] = VERIFY_VIEWS) -> np.ndarray:
    """(n, len(views), 32) uint8 256-bit pHashes of border crops of (n, m, m) intermediates.

    The intermediate is first box-averaged to VERIFY_SOURCE (the 16x16 lowest DCT frequencies of
    a 64-pixel thumbnail need no more). Crops act per axis, so each row window's resampling is
    applied to the whole batch in one matrix product, then all of its views' column windows in
    a second one.
    """
    n, m = mids.shape[0], mids.shape[1]
    x = mids.astype(np.float32)
    if m > VERIFY_SOURCE and m % VERIFY_SOURCE == 0:
        f = m // VERIFY_SOURCE
        x = x.reshape(n, VERIFY_SOURCE, f, VERIFY_SOURCE, f).mean(axis=(2, 4))
        m = VERIFY_SOURCE
    dy, per_row = _verify_operators(m, tuple(tuple(float(c) for c in v) for v in views))
    y = dy @ np.ascontiguousarray(x.transpose(1, 0, 2)).reshape(m, n * m)  # (rows*16, n*m)
    y = y.reshape(len(per_row), 16, n, m).transpose(0, 2, 1, 3)  # (rows, n, 16, m)
    low = np.empty((n, len(views), 16, 16), np.float32)
    for r, (ks, right) in enumerate(per_row):
        out = np.ascontiguousarray(y[r]).reshape(n * 16, m) @ right  # (n*16, len(ks)*16)
        low[:, ks] = out.reshape(n, 16, len(ks), 16).transpose(0, 2, 1, 3)
    low = low.reshape(n, len(views), 256)
    return np.packbits(low > _median(low), axis=2)


def _median(x: np.ndarray) -> np.ndarray:
    """Median over the last axis (even length), kept as a length-1 axis: np.median's value,
    ~4x faster on many short rows (a sort instead of a two-point partition)."""
    k = x.shape[-1] // 2
    return np.sort(x, axis=-1)[..., k - 1:k + 1].mean(axis=-1, keepdims=True)


def signature_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Crop-tolerant 256-bit distance of signatures a, b (..., views, 32): the smallest over views
    v of d(a_v, b_whole) and d(a_whole, b_v). A crop window keeps one image's content at uniform
    scale against the other's whole frame, so it cannot stretch one drawing into another."""
    d1 = hamming(a, b[..., :1, :]).min(axis=-1)
    d2 = hamming(a[..., :1, :], b).min(axis=-1)
    return np.minimum(d1, d2)


def to_hex(packed: np.ndarray) -> list[str]:
    """Hex strings of packed hash rows (the format str(imagehash.ImageHash) prints)."""
    return [bytes(row).hex() for row in np.ascontiguousarray(packed)]


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distance of packed hashes (broadcasting)."""
    return np.unpackbits(np.bitwise_xor(a, b), axis=-1).sum(axis=-1)


