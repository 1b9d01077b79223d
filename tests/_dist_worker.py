"""Run under torchrun by tests/test_stream_dist.py: each rank streams a view, results to JSON."""
import json
import sys

import torch.distributed as dist

from wvdata.stream import loader


def main(dataset: str, view: str, backend: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    kw = dict(view=view, batch_size=8, backend=backend, image_size=32, num_workers=2, seed=7)
    ld = loader(dataset, **kw)  # rank and world size come from torch.distributed
    ld.set_epoch(1)
    epoch = [keys for _, _, keys in ld]
    ld2 = loader(dataset, **kw)
    ld2.set_epoch(1)
    it = iter(ld2)
    head = [next(it)[2] for _ in range(2)]
    state = ld2.state_dict()
    del it
    ld3 = loader(dataset, **kw)
    ld3.load_state_dict(state)
    tail = [keys for _, _, keys in ld3]
    dist.barrier()  # every rank reaches the end: nobody waits on a missing batch
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, {"rank": rank, "len": len(ld), "epoch": epoch,
                                     "resumed": head + tail})
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
