"""Run the trainer as a user does (`python -m trainer.train`, or torchrun for several ranks)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
# a quick CPU recipe: the smallest registered model, no RandAugment, one loader worker
QUICK = ["--model", "test_resnet", "--image-size", "32", "--randaug", "0,0", "--workers", "1",
         "--no-progress", "--warmup-epochs", "0.3"]


def run_trainer(args: list[str], nproc: int = 1, timeout: float = 600, module: str = "trainer.train"):
    """Run `module` with `args` in a fresh interpreter; fail the test with its output on error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(port), "-m", module, *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


# ---------------------------------------------------------------- trainer.evaluate on seeded synthetic rows
# `python -m tests._train OUT` (1 rank) or under torchrun (2 ranks): scores a 37-row, 7-class "split" as the
# trainer's evaluation does, with the loader's rank plan (padding included) and batch 4, over 2 eval sizes.
# Row 11 is never yielded (an unreadable image); a padding row gets a poisoned row, so keeping it shows.

SYNTH_ROWS, SYNTH_CLASSES, SYNTH_BATCH, SYNTH_MISSING = 37, 7, 4, 11


def synthetic_labels():
    import numpy as np

    labels = np.random.default_rng(3).integers(0, SYNTH_CLASSES, SYNTH_ROWS)
    labels[5] = -1  # an unlabelled row: not in the metrics
    return labels


def synthetic_rows(ids, size: int):
    """float32 softmax rows of these sample ids at eval size index `size` (0 or 1), from a seeded table."""
    import numpy as np

    logits = np.random.default_rng(4).normal(0, 2, (2, SYNTH_ROWS, SYNTH_CLASSES)).astype(np.float32)[size, ids]
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def synthetic_eval(out: str) -> None:
    import json
    from pathlib import Path

    import numpy as np
    import torch
    import torch.distributed as dist

    from trainer.evaluate import score_passes
    from wvdata.stream.order import rank_plan

    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    plan = rank_plan(np.arange(SYNTH_ROWS), rank, world, SYNTH_BATCH)
    first = rank * len(plan.positions)  # this rank's first position in the padded global order

    def one_size(size: int):
        def run():
            for b in range(len(plan)):
                ids = plan.batch(b)
                pos = first + b * SYNTH_BATCH + np.arange(len(ids))
                rows = synthetic_rows(ids, size)
                rows[pos >= SYNTH_ROWS] = np.eye(SYNTH_CLASSES, dtype=np.float32)[-1]  # padding: poisoned
                keep = ids != SYNTH_MISSING
                yield torch.from_numpy(rows[keep]), torch.from_numpy(ids[keep].astype(np.int64))
        return run

    report = score_passes([one_size(0), one_size(1)], synthetic_labels(), SYNTH_CLASSES, rank=rank, world=world,
                          device=torch.device("cpu"), work=Path(out) / ".eval", dest=Path(out) / "scores" / "val.npy",
                          name="val")
    if rank == 0:
        Path(out, "metrics.json").write_text(json.dumps(report))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    synthetic_eval(sys.argv[1])
