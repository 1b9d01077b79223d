"""Multi-rank streaming with real processes: torchrun, gloo, 2 ranks x 2 workers."""
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from wvdata.views import load_view, view


@pytest.fixture(scope="module")
def dataset(webvision_dataset, tmp_path_factory):
    dst = tmp_path_factory.mktemp("dist") / "ds"
    shutil.copytree(webvision_dataset, dst)
    view(dst, "v70", per_class=7)
    return dst


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_two_ranks_cover_the_view_exactly_and_resume(dataset, tmp_path, backend):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(Path(__file__).parent / "_dist_worker.py"), str(dataset), "v70", backend, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    view_keys = Counter(load_view(dataset, "v70").entries["key"].to_list())
    # 70 entries over 2 ranks in batches of 8: 35 each, 5 batches each, no padding needed
    assert [r["len"] for r in ranks] == [5, 5]
    assert [len(r["epoch"]) for r in ranks] == [5, 5]
    seen = Counter(k for r in ranks for batch in r["epoch"] for k in batch)
    assert seen == view_keys
    # an entry goes to one rank only: a sample listed once in the view is never on both ranks
    once = {k for k, n in view_keys.items() if n == 1}
    assert len(once) >= 35
    on_rank = [set(k for b in r["epoch"] for k in b) for r in ranks]
    assert not on_rank[0] & on_rank[1] & once
    for r in ranks:  # resuming after 2 batches gives exactly the rest of this rank's epoch, in order
        assert r["resumed"] == r["epoch"]
