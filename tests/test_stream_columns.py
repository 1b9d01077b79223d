"""The loader's entry arrays read row group by row group into shared memory (stream._columns)
equal the plain Arrow read of the same view, for a whole split and for a written view whose
repeated keys are dictionary-encoded (the key buffer then outgrows its size estimate)."""
import shutil

import numpy as np
import pytest

from wvdata import open_dataset
from wvdata.stream._columns import read_key_buffer, read_numbers
from wvdata.stream.base import EntryArrays
from wvdata.views import ENTRY_COLUMNS, View, load_view, select, write_view


@pytest.fixture(scope="module")
def ds(webvision_dataset, tmp_path_factory):
    dst = tmp_path_factory.mktemp("columns") / "ds"
    shutil.copytree(webvision_dataset, dst)
    samples = select(dst, "train", columns=ENTRY_COLUMNS)
    rows = np.random.default_rng(0).integers(0, samples.height, 20_000)  # every sample ~100 times
    write_view(dst, "rep", samples[rows])
    return dst


@pytest.mark.parametrize("name", [None, "rep"])
def test_row_group_reads_equal_the_arrow_path(ds, name):
    v = load_view(ds, name, "train")
    assert read_numbers(v, EntryArrays.NUMBERS) is not None and read_key_buffer(v) is not None
    fast = EntryArrays.of(v)
    slow = EntryArrays.of(View(open_dataset(ds), "train", name, v.entries))  # in memory: the Arrow path
    for c in ("shard_id", "offset", "size", "width", "height", "label", "sample"):
        a, b = getattr(fast, c), getattr(slow, c)
        assert a.dtype == b.dtype and np.array_equal(a, b), c
    assert np.array_equal(fast.keys.offsets, slow.keys.offsets) and np.array_equal(fast.keys.data, slow.keys.data)
    assert fast.keys.take([0, len(v) - 1]) == [v.entries["key"][0], v.entries["key"][-1]]


def test_keys_load_in_the_background_or_on_first_use(ds):
    v = load_view(ds, "rep", "train")
    later = EntryArrays.of(v, keys="later")
    assert later._keys is not None and not hasattr(later._keys, "offsets")  # not read yet
    thread = EntryArrays.of(v, keys="thread")
    assert later.keys.take(range(5)) == thread.keys.take(range(5)) == v.entries["key"][:5].to_list()
    with pytest.raises(ValueError, match="keys must be"):
        EntryArrays.of(v, keys="soon")
