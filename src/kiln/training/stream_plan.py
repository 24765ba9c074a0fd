"""The ``stream`` plan: epochs whose batches come from a kind's stream of rows (data bigger than memory) instead of
indexing tensors held in memory.

It is the epoch plan (evaluation, best weights and early stopping after each epoch) with another source of
batches. A batch of step ``i`` of an epoch is the reader's rows ``[i * b, (i + 1) * b)`` of that epoch's stream
(``b``: this process's share of ``train.batch_size``), and the stream's order is a function of (seed, epoch,
rank) alone, so the data position of a checkpoint is the trainer's ``step_in_epoch``: a resumed run asks the
kind for the stream from row ``step_in_epoch * b`` and draws the same batches as the run it continues.

Batches are read one block ahead on a background thread (Arrow and NumPy release the GIL while they read and
convert), so reading overlaps the training step.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator, Sequence

from kiln.data.table_stream import rebatch
from kiln.errors import ConfigError
from kiln.training.plans import Epochs, Steps

PREFETCH = 8  # batches read ahead


def process_group() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed's when a process group is up, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Stream(Epochs):
    def __init__(self, trainer, rank: int | None = None, world_size: int | None = None) -> None:
        self.tr, self.t = trainer, trainer.t
        if rank is None or world_size is None:
            rank, world_size = process_group()
        self.rank, self.world_size = rank, world_size
        t = self.t
        for name, on in (("train.hard_examples", t.hard_examples), ("train.fairness", t.fairness),
                         ("train.class_weights: auto", t.class_weights == "auto")):
            if on:
                raise ConfigError(f"{name} needs every training row in memory; a streamed table "
                                  "(data.stream: true) cannot use it (set data.stream: false if the rows fit)")
        if t.batch_size % world_size:
            raise ConfigError(f"train.batch_size {t.batch_size} must divide among {world_size} processes")
        self.local_batch = t.batch_size // world_size
        # Every rank takes the same number of steps: the fewest whole batches any rank's shards give (one process
        # also takes the last, smaller batch).
        rows = [trainer.kind.reader_rows(r, world_size) for r in range(world_size)]
        per_epoch = math.ceil(rows[0] / self.local_batch) if world_size == 1 else min(rows) // self.local_batch
        if per_epoch == 0:
            raise ConfigError(f"data: a process's training shards hold {min(rows)} rows, fewer than its share of "
                              f"train.batch_size ({self.local_batch})")
        self.steps_per_epoch = per_epoch
        self.total_steps = per_epoch * t.epochs
        self.eval_size = t.eval_batch_size
        self.periods = t.epochs

    def describe(self) -> str:
        data = self.tr.data
        return (f"{len(data.train_x):,} train rows streamed from shards ({self.steps_per_epoch:,} steps an epoch) / "
                f"{len(data.val_x):,} val samples")

    def batches(self) -> Sequence:
        s, tr = self.tr.state, self.tr
        rows = tr.kind.stream(start=s.step_in_epoch * self.local_batch, batch_size=self.local_batch,
                              seed=tr.cfg.seed, epoch=s.epoch, rank=self.rank, world_size=self.world_size)
        return StreamBatches(rows, self.steps_per_epoch, s.step_in_epoch)


class StreamSteps(Steps):
    """The step plan (text) with batches of windows from the kind's stream. The stream is read in passes over the
    training data, each with its own order (pass p is the stream's "epoch" p); step i's batch is rows
    ``[i * b, (i + 1) * b)`` of this process's passes one after another, so a resumed run starts at the pass and
    row its step gives."""

    def __init__(self, trainer, rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__(trainer)
        if rank is None or world_size is None:
            rank, world_size = process_group()
        self.rank, self.world_size = rank, world_size
        if self.t.batch_size % self.world_size:
            raise ConfigError(f"train.batch_size {self.t.batch_size} must divide among {self.world_size} processes")
        self.local_batch = self.t.batch_size // self.world_size
        self.pass_rows = trainer.kind.reader_rows(self.rank, self.world_size)
        if self.pass_rows == 0:
            raise ConfigError("data: this process's training files hold no whole window of data.context + 1 tokens")

    def describe(self) -> str:
        return (f"{self.t.steps} steps of {self.t.batch_size} windows of {self.tr.kind.input_shape[0]} tokens, "
                f"streamed ({self.pass_rows:,} windows a pass)")

    def batches(self) -> Sequence:
        tr, first = self.tr, self.tr.state.global_step
        position = first * self.local_batch
        where = {"seed": tr.cfg.seed, "rank": self.rank, "world_size": self.world_size}

        def blocks():
            epoch, start = divmod(position, self.pass_rows)
            while True:
                yield from tr.kind.stream_blocks(epoch=epoch, start=start, **where)
                epoch, start = epoch + 1, 0

        return StreamBatches(rebatch(blocks(), self.local_batch), self.t.steps, first)


def stream_plan(trainer) -> Stream | StreamSteps:
    """The plan of a kind that streams: epochs (tables) or steps (text), as the kind trains."""
    return StreamSteps(trainer) if trainer.kind.trains_by_steps else Stream(trainer)


class StreamBatches(Sequence):
    """Batches read as the trainer asks for them in order, from step ``first`` on (``steps`` in all)."""

    def __init__(self, rows: Iterator, steps: int, first: int) -> None:
        self.steps, self.next, self.last = steps, first, None
        self.rows = rows
        self.queue: queue.Queue = queue.Queue(PREFETCH)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for batch in self.rows:
                while not self.stop.is_set():
                    try:
                        self.queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
            self.queue.put(None)
        except BaseException as e:  # noqa: BLE001 (handed to the training thread, which raises it)
            self.queue.put(e)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        if step == self.next - 1:  # the trainer asks for a step's batch again to count it
            return self.last
        if step != self.next:
            raise IndexError(f"stream batches are read in order: asked for step {step}, next is {self.next}")
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is None:
            raise IndexError(f"the stream ended before step {step}")
        self.next, self.last = self.next + 1, item
        if self.next == self.steps:
            self.stop.set()
        return item

    def __iter__(self) -> Iterator:
        return (self[i] for i in range(self.next, self.steps))

    def __del__(self) -> None:
        self.stop.set()
