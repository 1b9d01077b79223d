"""The torch backend's RandAugment (PIL only, torchvision's operations and magnitudes) on a real
photo: each operation does what its name says at the configured magnitude, draws come from the
sample's rng, and a loader's first batch imports neither torchvision nor pandas."""
import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import data

from wvdata.stream.transforms import RandAugment, TransformConfig, make_randaug

M = 9  # of 31 levels: 0.3 of each range


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(data.astronaut()).resize((128, 128))


def _arr(img):
    return np.asarray(img).astype(np.int64)


def test_every_operation_keeps_the_size_and_changes_the_photo(photo):
    ra = RandAugment(2, M)
    dim = Image.fromarray((np.asarray(photo) // 2 + 64).astype(np.uint8))  # autocontrast has work to do
    for op in RandAugment.OPS:
        src = dim if op == "autocontrast" else photo
        out = ra.apply(src, op)
        assert out.size == photo.size and out.mode == "RGB", op
        assert (op == "identity") == np.array_equal(_arr(out), _arr(src)), op
    stretched = _arr(ra.apply(dim, "autocontrast"))
    assert stretched.min() == 0 and stretched.max() == 255


def test_operations_follow_their_magnitude(photo):
    ra, a = RandAugment(2, M), _arr(photo)
    assert (_arr(ra.apply(photo, "posterize")) % 2 == 0).all()  # 8 - round(4 * 0.3) = 7 bits
    t = 255 * (1 - M / 30)
    assert np.array_equal(_arr(ra.apply(photo, "solarize")), np.where(a < t, a, 255 - a))
    shift = round(150 / 331 * 128 * M / 30)  # ~17 px: that band is filled with black
    moved = _arr(ra.apply(photo, "translate_x", 1.0))
    assert (moved[:, -shift + 1:] == 0).all() and not (moved[:, :-shift - 1] == 0).all()
    assert (_arr(ra.apply(photo, "rotate"))[0, 0] == 0).all()  # 9 degrees: the corners are fill
    brighter, darker = _arr(ra.apply(photo, "brightness", 1.0)), _arr(ra.apply(photo, "brightness", -1.0))
    assert brighter.mean() > a.mean() * 1.2 and darker.mean() < a.mean() * 0.8


def test_draws_come_from_the_sample_rng(photo):
    ra = RandAugment(2, M)
    outs = [_arr(ra(photo, random.Random(seed))) for seed in (1, 1, 2, 3, 4)]
    assert np.array_equal(outs[0], outs[1])
    assert sum(not np.array_equal(outs[0], o) for o in outs[2:]) >= 2
    assert np.array_equal(_arr(RandAugment(0, M)(photo, random.Random(1))), _arr(photo))
    with pytest.raises(ValueError, match="0 <= m < 31"):
        RandAugment(2, 31)
    assert make_randaug(TransformConfig(train=False)) is None and make_randaug(TransformConfig(randaug_n=0)) is None


def test_a_torch_loader_imports_neither_torchvision_nor_pandas(webvision_dataset):
    code = ("import sys; from wvdata.stream import loader; "
            f"ld = loader({str(webvision_dataset)!r}, batch_size=8, image_size=32, num_workers=1, rank=0, "
            "world_size=1, randaug=(2, 9)); next(iter(ld)); "
            "print(sorted(m for m in ('torchvision', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "[]"
