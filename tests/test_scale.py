"""The scale benchmark scaled down (200k entries): the loader's entry data is flat arrays in
shared memory, not per-entry Python objects, so forked workers neither hold nor copy it."""
import mmap
import shutil
import sys
from collections import Counter

import numpy as np
import pytest

from wvdata import open_dataset
from wvdata.stream import loader
from wvdata.stream.base import EntryArrays
from wvdata.views import ENTRY_COLUMNS, load_view, select, write_view

N = 200_000


@pytest.fixture(scope="module")
def big(webvision_dataset, tmp_path_factory):
    """A 200k-entry view over the small real dataset's shards (every sample repeated)."""
    dst = tmp_path_factory.mktemp("scale") / "ds"
    shutil.copytree(webvision_dataset, dst)
    samples = select(dst, "train", columns=ENTRY_COLUMNS)
    rows = np.arange(N) % samples.height
    write_view(dst, "big", samples[rows])
    return dst


def test_entry_data_is_not_per_entry_python_objects(big):
    """Building a loader's entry data over 200k entries allocates a handful of Python objects (a
    list of keys alone would be 200k); the arrays live in one shared mapping."""
    v = load_view(big, "big")
    before = sys.getallocatedblocks()
    e = EntryArrays.of(v)
    grown = sys.getallocatedblocks() - before
    assert len(e) == N and grown < 20_000, grown
    assert e.keys[N - 1] == v.entries["key"][N - 1]
    for a in (e.shard_id, e.offset, e.size, e.label, e.sample, e.keys.data, e.keys.offsets):
        while isinstance(a, np.ndarray):
            a = a.base
        assert isinstance(a, memoryview) and isinstance(a.obj, mmap.mmap), type(a)


_FORK_CHECK = """
import os, sys
from wvdata.stream import loader
def dirty():
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Private_Dirty:"))
ld = loader(sys.argv[1], view="big", batch_size=64, image_size=32, num_workers=0, rank=0, world_size=1)
e = ld.entries
assert len(e.keys) == int(sys.argv[2])  # keys are read on first use (the loader: once its workers forked)
r, w = os.pipe()
pid = os.fork()
if pid == 0:  # the child: no polars, no torch; plain reads of the shared arrays
    try:
        start = dirty()
        total = sum(len(e.keys[p]) for p in range(len(e)))
        total += int(e.size.sum()) + int(e.label.sum()) + int(e.offset.sum())
        os.write(w, str(dirty() - start).encode())
    finally:
        os._exit(0)
os.close(w)
print(int(os.read(r, 100)))
os.waitpid(pid, 0)
"""


def test_a_forked_worker_reading_every_entry_copies_nothing(big):
    """A forked process that reads every entry's key and numbers dirties (copies) almost no
    memory: no refcounts are touched. Per-entry str objects would copy their pages (~18 MB).
    Measured from a fresh process, as a loader's workers are forked from a trainer: a pytest
    process's freed-but-dirty heap adds allocator noise of several MB."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _FORK_CHECK, str(big), str(N)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    grown_kb = int(out.stdout.split()[-1])
    assert grown_kb < 4096, f"the child copied {grown_kb} kB"


def test_big_view_streams_its_entries(big):
    """The 200k-entry view: its first batches are real samples with their labels."""
    truth = dict(open_dataset(big).samples("train", ["key", "label"]).iter_rows())
    ld = loader(big, view="big", batch_size=256, image_size=32, num_workers=2, rank=0, world_size=1)
    assert len(ld) == -(-N // 256)
    it = iter(ld)
    for _ in range(2):
        images, labels, keys = next(it)
        assert images.shape[0] == 256 and labels.tolist() == [truth[k] for k in keys]
    del it


def test_per_class_balance_of_a_big_table_is_exact():
    """select's class balance is vectorised: 200k rows, 5,000 long-tailed classes, exact counts."""
    import polars as pl

    from wvdata.views import balance_per_class

    rng = np.random.default_rng(0)
    sizes = np.maximum(1, (2000 * (np.arange(5000) + 1.0) ** -0.9).astype(int))
    labels = np.repeat(np.arange(5000), sizes)
    df = pl.DataFrame({"key": [f"k{i}" for i in range(len(labels))], "label": rng.permutation(labels)})
    out = balance_per_class(df, 30, seed=4)
    counts = Counter(out["label"].to_list())
    assert set(counts.values()) == {30} and len(counts) == 5000
    big_class = out.filter(pl.col("label") == 0)
    assert big_class["key"].n_unique() == 30  # no repeats where a class has enough
    short = out.filter(pl.col("label") == 4999)  # one sample: repeated 30 times
    assert short["key"].n_unique() == 1
