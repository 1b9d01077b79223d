"""The DALI backend reads an epoch in segments (one pipeline and set of index files each, the
first about one shard window, the next one built in a thread while the current one runs), so
its first batch does not wait for the whole epoch's index:
every entry still comes exactly once, and a state saved anywhere (mid-segment, at a segment's
end) restores to exactly the rest of the uninterrupted epoch, images included."""
import os
import shutil
from collections import Counter

import pytest
import torch

from wvdata.stream import loader
from wvdata.views import load_view, view

pytest.importorskip("nvidia.dali")

# window=1: segments of about one shard's entries, growing 4x; no RandAugment keeps the many
# pipelines of these tests quick (the segment logic does not depend on the augmentation)
KW = dict(view="bal", batch_size=4, backend="dali", device="cpu", image_size=32, num_workers=1, rank=0,
          world_size=1, seed=11, window=1, randaug=(0, 0))


@pytest.fixture(autouse=True)
def _small_growth(monkeypatch):
    """Segments growing 2x (4x by default), so this 18-batch epoch has three of them."""
    from wvdata.stream.dali_backend import DaliLoader

    monkeypatch.setattr(DaliLoader, "GROWTH", 2)


@pytest.fixture(scope="module")
def balanced(webvision_dataset, tmp_path_factory):
    dst = tmp_path_factory.mktemp("segments") / "ds"
    shutil.copytree(webvision_dataset, dst)
    view(dst, "bal", per_class=7)  # 70 entries over 16-sample shards, repeats for short classes
    return dst


def _idx_files(ld) -> list[str]:
    return sorted(f for f in os.listdir(ld._tmp) if f.endswith(".idx"))


def test_an_epoch_in_segments_visits_every_entry_once_and_removes_its_index_files(balanced):
    ld = loader(balanced, **KW)
    bounds = ld.segments().tolist()
    assert len(bounds) >= 4 and bounds[0] == 0 and bounds[-1] == len(ld)
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    assert all(b == 2 * a for a, b in zip(sizes, sizes[1:-1]))  # each segment GROWTH x the one before
    it = iter(ld)
    keys = list(next(it)[2])
    files = _idx_files(ld)
    # the first batch needs the first segment only; the next one is being built in a thread
    assert any("-k0-" in f for f in files) and all("-k0-" in f or "-k1-" in f for f in files)
    for _, _, k in it:
        keys += k
    assert Counter(keys) == Counter(load_view(balanced, "bal").entries["key"].to_list())
    assert _idx_files(ld) == []  # each segment's files go when its pipeline is done
    ld.set_epoch(1)
    assert Counter(k for _, _, b in ld for k in b) == Counter(keys)


def test_a_state_saved_anywhere_in_a_segmented_epoch_restores_exactly_the_rest(balanced):
    full = loader(balanced, **KW)
    full.set_epoch(1)
    batches = [(images.clone(), keys) for images, _, keys in full]
    bounds = full.segments().tolist()
    # mid first segment, exactly at the end of the first and of the second, inside the third
    for stop in sorted({max(1, bounds[1] - 1), bounds[1], bounds[2], bounds[2] + 1}):
        first = loader(balanced, **KW)
        first.set_epoch(1)
        it = iter(first)
        seen = [k for _ in range(stop) for k in next(it)[2]]
        state = first.state_dict()
        assert state["batch"] == stop and state["dali"] is not None
        resumed = loader(balanced, **KW)
        resumed.load_state_dict(state)
        rest = [(images, keys) for images, _, keys in resumed]
        assert seen + [k for _, keys in rest for k in keys] == [k for _, keys in batches for k in keys], stop
        for (images, keys), (want, want_keys) in zip(rest, batches[stop:]):
            assert keys == want_keys and torch.equal(images, want), stop


def test_a_corrupt_sample_in_a_later_segment_is_replaced_and_the_epoch_completes(webvision_dataset, tmp_path):
    """The culprit is searched among the failing segment's entries; the rest of the epoch comes
    from a fresh pipeline, every batch still there and every other entry exactly once."""
    dst = tmp_path / "ds"
    shutil.copytree(webvision_dataset, dst)
    kw = {**KW, "view": None, "batch_size": 8}
    ld = loader(dst, **kw)
    bounds, plan = ld.segments().tolist(), ld._plan(0)
    assert len(bounds) >= 3
    later = set(plan[bounds[1] * 8:].tolist()) - set(plan[:bounds[1] * 8].tolist())
    victim = load_view(dst, None, "train").entries.row(min(later), named=True)
    with open(dst / "train" / f"{victim['shard']}.tar", "r+b") as f:
        f.seek(victim["data_offset"])
        f.write(b"\x00" * victim["bytes"])
    ld = loader(dst, **kw)
    batches = [keys for _, _, keys in ld]
    keys = [k for b in batches for k in b]
    assert len(batches) == len(ld) and ld.stats.skipped == 1 and victim["key"] not in keys
    assert set(keys) == set(load_view(dst, None, "train").entries["key"]) - {victim["key"]}
