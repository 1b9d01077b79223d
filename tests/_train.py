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
