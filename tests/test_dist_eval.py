"""The pieces of evaluation shared by the ranks (kiln.training.dist_eval), on 2 processes (gloo, torch.multiprocessing
with a file:// rendezvous): outputs gathered in batch order whatever each rank holds (none, batches of other
shapes), sums added, FSDP2 models evaluated with different numbers of forwards per rank, and ranks that disagree
on a decision stopped with an error."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def outputs_of(batch: int) -> torch.Tensor:
    """Batch `batch`'s made-up outputs: shapes differ from batch to batch, and batch 1 has none (0 rows)."""
    rows = [2, 0, 3, 1, 4][batch]
    return torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3) + 100 * batch


def ranks(rank: int, world: int, init: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from kiln.training.dist_eval import Share
    from kiln.training.distributed import Dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        share = Share(rank, world)
        for count in (5, 1, 0):  # batches 0..4 (rank 0: 0, 2, 4; rank 1: 1, 3); one batch (rank 1: none); none
            mine = {i: outputs_of(i) for i in range(count) if share.mine(i)}
            got = share.gather(mine, count)
            assert len(got) == count and all(torch.equal(got[i], outputs_of(i)) for i in range(count)), count
        assert share.sum([1.5, rank + 1]) == [3.0, 3.0]

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        plain.load_state_dict(model.state_dict())
        fully_shard(model[0]), fully_shard(model[2]), fully_shard(model)
        x = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
        for forwards in ((1, 0), (3, 1)):  # rank 1 none (no batch of its own; FSDP not yet run on it), then 3 and 1
            with torch.no_grad(), share.whole(model):
                outs = [model(x) for _ in range(forwards[rank])]
            assert all(torch.equal(out, plain(x).detach()) for out in outs)
            for _ in range(2):  # sharded again: training goes on, the ranks' backward collectives in step
                model(x).square().mean().backward()
            assert type(model[0].weight).__name__ == "DTensor"

        import os
        os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
        agree = Dist("ddp")
        agree.agree([1.0, 2, float("nan")], "the best epoch", torch.device("cpu"))
        with pytest.raises(RuntimeError, match=r"the processes disagree on the best epoch: rank \d has"):
            agree.agree([1.0, rank], "the best epoch", torch.device("cpu"))
        dist.barrier()  # as Dist.finish does: a rank that tears gloo down while its peer is mid-op aborts both
        del model, outs  # the sharded model's device mesh holds the process group: let it go first
        import gc
        gc.collect()
    finally:
        dist.destroy_process_group()


def test_shared_evaluation_pieces_on_two_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(ranks, args=(2, f"file://{tmp_path / 'rendezvous'}"), nprocs=2, join=True)
