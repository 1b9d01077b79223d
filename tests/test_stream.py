"""The loader: epoch semantics, resume, transforms, bad samples, in both backends."""
import shutil
from collections import Counter

import pytest
import torch

from wvdata import open_dataset
from wvdata.stream import loader, normalize
from wvdata.views import load_view, view

BACKENDS = ["torch", "dali"]


def _keys(ld):
    out = []
    for images, labels, keys in ld:
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.shape[0] == labels.shape[0] == len(keys)
        out += keys
    return out


@pytest.fixture(scope="module")
def balanced(webvision_dataset, tmp_path_factory):
    dst = tmp_path_factory.mktemp("stream") / "ds"
    shutil.copytree(webvision_dataset, dst)
    view(dst, "bal", per_class=7)  # 70 entries, repeats for short classes
    return dst


@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_visits_every_view_entry_exactly_once(balanced, backend):
    ld = loader(balanced, view="bal", batch_size=16, backend=backend, image_size=64,
                num_workers=2, rank=0, world_size=1)
    assert len(ld) == 5
    keys = _keys(ld)
    assert Counter(keys) == Counter(load_view(balanced, "bal").entries["key"].to_list())
    ld.set_epoch(1)
    assert Counter(_keys(ld)) == Counter(keys)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_match_the_dataset(balanced, backend):
    truth = dict(open_dataset(balanced).samples("train").select("key", "label").iter_rows())
    ld = loader(balanced, batch_size=8, backend=backend, image_size=32, num_workers=1, rank=0, world_size=1)
    for _, labels, keys in ld:
        assert labels.tolist() == [truth[k] for k in keys]


def test_torch_order_is_a_function_of_seed_and_epoch(balanced):
    def order(seed, epoch, workers):
        ld = loader(balanced, view="bal", batch_size=8, image_size=32, seed=seed, num_workers=workers,
                    rank=0, world_size=1)
        ld.set_epoch(epoch)
        return _keys(ld)
    a = order(0, 3, 0)
    assert a == order(0, 3, 2)  # worker count does not change the order
    assert a != order(0, 4, 0) and a != order(1, 3, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_resumes_mid_epoch_with_exactly_the_rest(balanced, backend):
    """Both backends continue in exactly the order (and, same seeds, with the same images) of the
    uninterrupted epoch; DALI through its pipeline checkpoint, carried in the loader state."""
    kw = dict(view="bal", batch_size=8, backend=backend, image_size=32, num_workers=1, rank=0,
              world_size=1, seed=5)
    full = loader(balanced, **kw)
    full.set_epoch(2)
    batches = [(images.clone(), keys) for images, _, keys in full]
    all_keys = [k for _, keys in batches for k in keys]
    first = loader(balanced, **kw)
    first.set_epoch(2)
    seen = []
    for i, (_, _, keys) in enumerate(first):
        seen += keys
        if i == 2:
            state = first.state_dict()
            break
    assert (state["epoch"], state["batch"]) == (2, 3)
    resumed = loader(balanced, **kw)
    resumed.load_state_dict(state)
    rest = [(images, keys) for images, _, keys in resumed]
    assert seen + [k for _, keys in rest for k in keys] == all_keys
    for (images, keys), (want, want_keys) in zip(rest, batches[3:]):
        assert keys == want_keys and torch.equal(images, want)
    assert resumed.epoch == 3  # the next iteration is the next epoch


def test_dali_state_without_checkpoint_still_yields_the_rest(balanced):
    """A loader state without a DALI checkpoint (an older one) still gives exactly the entries not
    yet yielded, in a fresh order."""
    kw = dict(view="bal", batch_size=8, backend="dali", image_size=32, num_workers=1, rank=0, world_size=1)
    full = loader(balanced, **kw)
    all_keys = _keys(full)
    first = loader(balanced, **kw)
    it = iter(first)
    seen = [k for _ in range(2) for k in next(it)[2]]
    state = first.state_dict()
    assert state["dali"] and len(state["consumed"]) == 16
    del state["dali"]
    resumed = loader(balanced, **kw)
    resumed.load_state_dict(state)
    assert Counter(seen + _keys(resumed)) == Counter(all_keys)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("crops", [1, 5, 10])
def test_eval_crops(balanced, backend, crops):
    ld = loader(balanced, "val", batch_size=4, backend=backend, train=False, image_size=48,
                eval_crops=crops, num_workers=1, rank=0, world_size=1)
    images, labels, keys = next(iter(ld))
    expect = (4, 3, 48, 48) if crops == 1 else (4, crops, 3, 48, 48)
    assert tuple(images.shape) == expect
    if crops == 10:  # the last five are the mirrors of the first five
        assert torch.equal(images[:, 5:], images[:, :5].flip(-1))
    assert _keys(ld) == load_view(balanced, None, "val").entries["key"].to_list()  # eval: no shuffle


def test_train_images_are_real_crops_not_noise(balanced):
    """Eval centre crop of the torch and DALI backends see the same picture."""
    out = []
    for backend in BACKENDS:
        ld = loader(balanced, "val", batch_size=6, backend=backend, train=False, image_size=64,
                    num_workers=1, rank=0, world_size=1)
        out.append(next(iter(ld))[0].float())
    diff = (out[0] - out[1]).abs().mean().item()
    assert diff < 12, diff  # same picture, resampled by two libraries
    assert out[0].std() > 20


def test_normalize_helper():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    y = normalize(x, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert y.dtype == torch.float32 and torch.allclose(y, torch.ones_like(y))
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_sample_is_skipped_counted_and_never_fatal(webvision_dataset, tmp_path, backend, caplog):
    dst = tmp_path / "ds"
    shutil.copytree(webvision_dataset, dst)
    s = open_dataset(dst).samples("train")
    victim = s.row(3, named=True)
    with open(dst / "train" / f"{victim['shard']}.tar", "r+b") as f:
        f.seek(victim["data_offset"] + victim["bytes"] // 3)
        f.write(b"\x00" * (victim["bytes"] // 2))  # garbage in the middle of the JPEG
        f.seek(victim["data_offset"])
        f.write(b"\x00" * 64)  # and a broken header
    ld = loader(dst, batch_size=8, backend=backend, image_size=32, num_workers=1, rank=0, world_size=1)
    keys = _keys(ld)
    assert ld.stats.skipped == 1 and ld.stats.skipped_by_shard == {victim["shard"]: 1}
    assert victim["key"] not in keys
    assert len(set(keys)) == s.height - 1
    assert "skipping unreadable samples" in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_index_gives_sample_rows(balanced, backend):
    samples = open_dataset(balanced).samples("train")
    ld = loader(balanced, view="bal", batch_size=16, backend=backend, image_size=32, num_workers=1,
                rank=0, world_size=1, with_index=True)
    for _, labels, keys, ids in ld:
        assert ids.dtype == torch.int64
        assert samples["key"].gather(ids.numpy()).to_list() == keys
        assert samples["label"].gather(ids.numpy()).to_list() == labels.tolist()


def test_dali_device_cpu_is_explicit(balanced):
    ld = loader(balanced, batch_size=8, backend="dali", image_size=32, num_workers=1, rank=0, world_size=1,
                device="cpu")
    assert ld.device_id is None
    with pytest.raises(ValueError, match="device must be"):
        loader(balanced, backend="dali", rank=0, world_size=1, device="tpu")


def test_reader_keeps_few_files_open(balanced, monkeypatch):
    from wvdata.stream.base import ShardFiles as _Files

    monkeypatch.setattr(_Files, "MAX_OPEN", 2)
    ld = loader(balanced, batch_size=8, image_size=32, num_workers=0, rank=0, world_size=1)
    assert len(_keys(ld)) == len(load_view(balanced, None, "train"))  # 4 shards through 2 slots
