"""Evaluation shared by the processes of a distributed run: each rank evaluates its share of a split.

A split is evaluated in the batches one process would use (the kind's ``eval_batches``, or ``model_outputs``'s
slices); rank r of N computes batches r, r + N, r + 2N, ... (strided: every batch is computed by exactly one
rank, whatever the split's size). Then:

- outputs (logits, scores) are gathered, in batch order, onto every rank (:meth:`Share.gather`), and every rank
  computes the task's metrics from the whole split's outputs: ROC-AUC, F1, thresholds and the kind's own metrics
  need all predictions, and each batch is computed exactly as one process computes it, so the metrics are those
  of a one-process evaluation of the same weights, bit for bit on the same hardware and thread count;
- token tasks (lm, seq2seq) add up sums (loss x tokens, tokens, right tokens, exact matches) with all_reduce
  (:meth:`Share.sum`): equal to one process's up to the order of float64 additions (about 1e-16 relative).

Every rank ends with the same metrics, so the best epoch, early stopping and the decision threshold are decided
alike everywhere. Under FSDP2 the model's forward all-gathers each block's parameters, a collective that every
rank must call as often as the others; a rank's share may be one batch fewer, and seq2seq's greedy decoding runs
as many steps as its batch needs, so for an evaluation the parameters are gathered once (``unshard``), kept whole
(``set_reshard_after_forward(False)``, the use PyTorch documents for evaluations) and sharded again after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

MAX_DIMS = 8  # dimensions of one batch's outputs that a gather describes
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Share:
    """This process's part of an evaluation: all of it (the default), or every ``world``-th batch from ``rank``.
    ``device``: where collectives run (nccl's tensors live on the GPU)."""

    rank: int = 0
    world: int = 1
    device: torch.device = CPU

    @property
    def active(self) -> bool:
        return self.world > 1

    def mine(self, batch: int) -> bool:
        return batch % self.world == self.rank

    def sum(self, values: list[float]) -> list[float]:
        """The values added over the ranks (float64)."""
        if not self.active:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def gather(self, mine: dict[int, torch.Tensor], count: int) -> list[torch.Tensor]:
        """Every one of ``count`` batches' outputs (float32, on the CPU), in batch order, on every rank, from each
        rank's own (``mine``: batch number -> outputs)."""
        if not self.active or not count:
            return [mine[i] for i in range(count)]
        shapes = torch.zeros(count, MAX_DIMS + 1, dtype=torch.int64, device=self.device)
        for i, out in mine.items():
            if out.dim() > MAX_DIMS:
                raise ValueError(f"outputs of {out.dim()} dimensions; a distributed evaluation gathers at most "
                                 f"{MAX_DIMS}")
            shapes[i, 0] = out.dim()
            shapes[i, 1:out.dim() + 1] = torch.tensor(out.shape, dtype=torch.int64)
        dist.all_reduce(shapes)  # each batch's shape, known to all (one rank filled each row)
        shapes = shapes.cpu().tolist()
        batch_shapes = [tuple(row[1:row[0] + 1]) for row in shapes]
        sizes = [[i for i in range(count) if i % self.world == r] for r in range(self.world)]
        numels = [sum(_numel(batch_shapes[i]) for i in batches) for batches in sizes]
        local = torch.zeros(max(numels), dtype=torch.float32)
        flat = [mine[i].reshape(-1).float() for i in sorted(mine)]
        if flat:
            local[:numels[self.rank]] = torch.cat(flat)
        pieces = [torch.empty_like(local, device=self.device) for _ in range(self.world)]
        dist.all_gather(pieces, local.to(self.device))
        out: list[torch.Tensor | None] = [None] * count
        for r, batches in enumerate(sizes):
            piece, at = pieces[r].cpu(), 0
            for i in batches:
                n = _numel(batch_shapes[i])
                out[i] = mine[i] if i in mine else piece[at:at + n].reshape(batch_shapes[i])
                at += n
        return out  # type: ignore[return-value]

    @contextlib.contextmanager
    def whole(self, model: torch.nn.Module) -> Iterator[None]:
        """Under FSDP2 with several ranks: the model's parameters gathered whole for the evaluation (every rank
        calls this together), so that ranks may run different numbers of forwards; sharded again after."""
        from torch.distributed.fsdp import FSDPModule

        sharded = [m for m in model.modules() if isinstance(m, FSDPModule)] if self.active else []
        if not sharded:
            yield
            return
        root = sharded[0]
        root.set_reshard_after_forward(False)
        for m in sharded:
            m.unshard()
        try:
            yield
        finally:
            for m in sharded:
                m.reshard()
            root.set_reshard_after_forward(True)  # fully_shard's defaults: each block resharded after forward,
            root.set_reshard_after_forward(False, recurse=False)  # the root kept whole until backward
            _forget_forwards(sharded)


def _forget_forwards(sharded: list) -> None:
    """FSDP2 records every forward (its post-forward order) to choose what to prefetch in the next backward, and
    clears the record only when a backward ends. The evaluation's forwards, as many as each rank's share of the
    batches (none on a rank without a batch), would make the ranks prefetch different blocks in the next training
    backward, whose collectives would then no longer pair up (a hang). So they are forgotten here, as a backward
    would forget them. This reads FSDP2's private state (torch is pinned; tests/test_dist_eval.py holds it)."""
    for m in sharded:
        state = m._get_fsdp_state()
        order = getattr(state._comm_ctx, "post_forward_order", None)  # made at FSDP's first training forward
        if order is not None:
            order.clear()
        for group in state._fsdp_param_groups:
            group._post_forward_indices.clear()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
