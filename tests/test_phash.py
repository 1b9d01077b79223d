"""wvdata.dedup.hashing: bit equality with imagehash (exact mode), closeness of the fast mode, the
crop-aligned distance, and the FAISS range search against a brute force."""
from __future__ import annotations

import io

import imagehash
import numpy as np
import pytest
from PIL import Image

from wvdata.dedup.cluster import UnionFind
from wvdata.dedup.hashing import FULL, VERIFY_VIEWS, hamming, hash_images, signature_distance, to_hex
from wvdata.dedup.search import brute_force_pairs, multihash_params, range_pairs
from wvdata.synth import duplicates as synth


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Real photos as JPEG at several sizes and modes, plus degenerate flat images."""
    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "moon", "hubble_deep_field",
                 "page", "retina"):
        im = synth.photo(name)
        out += [synth.jpeg(im), synth.jpeg(im.resize((im.width // 3 + 1, im.height // 2)), 70),
                synth.jpeg(im.convert("L"))]
    png = io.BytesIO()
    synth.photo("coins").save(png, format="PNG")
    return out + [png.getvalue(), synth.flat(255), synth.flat(128, (64, 48))]


@pytest.mark.parametrize("hash_size", [8, 16])
def test_exact_mode_is_bit_equal_to_imagehash(photos, hash_size):
    got = to_hex(hash_images(photos, hash_size=hash_size, exact=True).bits[:, 0])
    want = [str(imagehash.phash(Image.open(io.BytesIO(b)), hash_size=hash_size)) for b in photos]
    assert got == want


def test_exact_dhash_is_bit_equal_to_imagehash(photos):
    got = to_hex(hash_images(photos, hash="dhash", exact=True).bits[:, 0])
    assert got == [str(imagehash.dhash(Image.open(io.BytesIO(b)))) for b in photos]


def test_fast_mode_is_close_to_imagehash(photos):
    """Fast mode differs by rounding only: at most a few bits on photos (flat images excluded:
    their hash is noise in both)."""
    real = photos[:-2]
    fast = hash_images(real).bits[:, 0]
    want = [str(imagehash.phash(Image.open(io.BytesIO(b)))) for b in real]
    dist = [bin(int(a, 16) ^ int(b, 16)).count("1") for a, b in zip(to_hex(fast), want)]
    assert max(dist) <= 4 and np.mean(dist) <= 1.0, dist
    assert sum(d == 0 for d in dist) >= len(dist) // 2


def test_views_shape_and_crop_view_matches_cropped_copy():
    im = synth.photo("rocket")
    orig, crop = synth.jpeg(im), synth.TRANSFORMS["crop5_all_sides"](im)
    h = hash_images([orig, crop], views=(FULL, (0.05,) * 4))
    assert h.bits.shape == (2, 2, 8) and h.vbits.shape == (2, 32) and h.ok.all()
    whole = int(hamming(h.bits[0, 0], h.bits[1, 0]))
    via_view = int(hamming(h.bits[0, 1], h.bits[1, 0]))
    assert via_view <= 4 < whole


def test_undecodable_bytes_are_flagged():
    h = hash_images([b"not an image", synth.flat(10)])
    assert h.ok.tolist() == [False, True] and not h.bits[0].any()
    assert h.std[1] < 4 and not h.colorful[1]


def test_signature_distance_separates_crops_from_look_alikes():
    """The verification signature (computed while hashing) keeps border crops of a photo within
    16 bits of 256 and distinct digits of one class apart (their 64-bit hashes collide)."""
    im = synth.photo("coffee")
    kinds = ("crop5_left", "crop5_bottom", "crop5_all_sides", "crop3_all_sides", "combo", "resize50")
    h = hash_images([synth.jpeg(im)] + [synth.TRANSFORMS[t](im) for t in kinds])
    assert h.vsig.shape == (len(kinds) + 1, len(VERIFY_VIEWS), 32)
    d = signature_distance(h.vsig[:1], h.vsig[1:])
    assert (d <= 16).all(), dict(zip(kinds, d))
    digits = [data for label, data in synth.digits(per_class=6) if label == 4]
    g = hash_images(digits)
    i, j = np.triu_indices(len(digits), 1)
    assert signature_distance(g.vsig[i], g.vsig[j]).min() >= 28
    assert hamming(g.bits[i, 0], g.bits[j, 0]).min() <= 10  # what the search alone would merge


@pytest.mark.parametrize("radius", [0, 3, 10])
def test_range_search_flat_and_multihash_equal_brute_force(radius):
    rng = np.random.default_rng(radius)
    codes = rng.integers(0, 256, size=(3000, 8), dtype=np.uint8)
    for k in range(200):  # near copies 0..radius+2 bits away
        bits = np.unpackbits(codes[k])
        bits[rng.choice(64, k % (radius + 3), replace=False)] ^= 1
        codes[2000 + k] = np.packbits(bits)
    want = set(zip(*[a.tolist() for a in brute_force_pairs(codes, codes, radius)]))
    for method in ("flat", "multihash"):
        got = set(zip(*[a.tolist() for a in range_pairs(codes, codes, radius, method)]))
        assert got == want, method
    assert sum(1 for q, i, _ in want if q < i) >= 200 * (radius + 1) // (radius + 3)


def test_multihash_params_are_exact_by_pigeonhole():
    for n, bits, radius in ((1_000_000, 64, 10), (7_000_000, 64, 8), (10_000, 256, 20)):
        nhash, b, nflip = multihash_params(n, bits, radius)
        assert nhash * b <= bits and nhash * (nflip + 1) > radius


def test_union_find():
    uf = UnionFind(6)
    for a, b in ((0, 1), (2, 3), (1, 3)):
        uf.union(a, b)
    r = uf.roots()
    assert len({r[0], r[1], r[2], r[3]}) == 1 and len({r[0], r[4], r[5]}) == 3
