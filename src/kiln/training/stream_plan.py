"""The ``stream`` plan: epochs whose batches come from a kind's stream of rows (data bigger than memory) instead of
indexing tensors held in memory.

It is the epoch plan (evaluation, best weights and early stopping after each epoch) with another source of
batches. A batch of step ``i`` of an epoch is the reader's rows ``[i * b, (i + 1) * b)`` of that epoch's stream
(``b``: this process's share of ``train.batch_size``), and the stream's order is a function of (seed, epoch,
rank) alone, so the data position of a checkpoint is the trainer's ``step_in_epoch``: a resumed run asks the
kind for the stream from row ``step_in_epoch * b`` and draws the same batches as the run it continues.

Several processes (``kiln train --nproc N``): the training shards are divided among the N ranks x
``data.workers`` readers (:func:`kiln.data.shards.reader_shards`); each rank reads only its own shards and trains on
batches of ``train.batch_size / N`` of its own rows (the batch is already this rank's share: the trainer does not
slice it, ``local_batches``). Every rank takes the same number of steps an epoch, fixed before reading from the
shards' known row counts: the fewest whole batches any reader's shards give (so no rank waits in a collective for
one that has run out); the rows a reader holds beyond that are left out of that epoch (others next epoch: each
epoch shuffles the order of a reader's shards and rows).

Readers (``data.workers``, default 1): each is a background thread with its own shards and its own stream (Arrow
and NumPy release the GIL while they read and convert, so reading overlaps the training step and several readers
read at once). Step ``i``'s batch comes from reader ``i % workers``, whatever the threads' timing, so the order is
a function of the seed alone and a resumed run restarts every reader at its own row: reader ``w`` has given
``ceil((i - w) / workers)`` batches before step ``i``.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator, Sequence

from kiln.data.table_stream import rebatch
from kiln.errors import ConfigError
from kiln.training.plans import Epochs, Steps

PREFETCH = 8  # batches read ahead by each reader


def given(step: int, reader: int, readers: int) -> int:
    """Batches reader ``reader`` of ``readers`` has given before step ``step`` (step ``i`` takes reader
    ``i % readers``'s next batch)."""
    return max(0, (step - reader + readers - 1) // readers)


def process_group() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed's when a process group is up, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Stream(Epochs):
    local_batches = True  # a batch is this rank's own rows, not a global batch to slice

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
        self.workers = trainer.kind.workers
        # Every reader gives the same number of batches: the fewest whole batches any reader's shards give (one
        # process with one reader also takes the last, smaller batch).
        rows = [trainer.kind.reader_rows(r, world_size, w, self.workers)
                for r in range(world_size) for w in range(self.workers)]
        per_reader = math.ceil(rows[0] / self.local_batch) if len(rows) == 1 else min(rows) // self.local_batch
        if per_reader == 0:
            raise ConfigError(f"data: a reader's training shards hold {min(rows)} rows, fewer than its share of "
                              f"train.batch_size ({self.local_batch} rows a step with {world_size} process(es)); "
                              "lower train.batch_size or data.workers, or use fewer processes")
        self.steps_per_epoch = per_reader * self.workers
        self.rows_per_epoch = self.steps_per_epoch * t.batch_size if len(rows) > 1 else sum(rows)
        self.total_steps = self.steps_per_epoch * t.epochs
        self.eval_size = t.eval_batch_size
        self.periods = t.epochs

    def describe(self) -> str:
        data = self.tr.data
        shared = "" if self.rows_per_epoch == len(data.train_x) else f", {self.rows_per_epoch:,} of them an epoch"
        readers = f", {self.workers} readers a process" if self.workers > 1 else ""
        return (f"{len(data.train_x):,} train rows streamed from shards ({self.steps_per_epoch:,} steps an epoch"
                f"{shared}{readers}) / {len(data.val_x):,} val samples")

    def batches(self) -> Sequence:
        s, tr, b = self.tr.state, self.tr, self.local_batch
        readers = [tr.kind.stream(start=given(s.step_in_epoch, w, self.workers) * b, batch_size=b, seed=tr.cfg.seed,
                                  epoch=s.epoch, rank=self.rank, world_size=self.world_size, worker=w,
                                  workers=self.workers) for w in range(self.workers)]
        return StreamBatches(readers, self.steps_per_epoch, s.step_in_epoch)


class StreamSteps(Steps):
    """The step plan (text) with batches of windows from the kind's stream. The stream is read in passes over the
    training data, each with its own order (pass p is the stream's "epoch" p); step i's batch is rows
    ``[i * b, (i + 1) * b)`` of this process's passes one after another, so a resumed run starts at the pass and
    row its step gives. With ``data.workers`` readers, each reads its own shards in its own passes, and step i's
    batch is reader ``i % workers``'s next one."""

    local_batches = True

    def __init__(self, trainer, rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__(trainer)
        if rank is None or world_size is None:
            rank, world_size = process_group()
        self.rank, self.world_size = rank, world_size
        if self.t.batch_size % self.world_size:
            raise ConfigError(f"train.batch_size {self.t.batch_size} must divide among {self.world_size} processes")
        self.local_batch = self.t.batch_size // self.world_size
        self.workers = trainer.kind.workers
        rows = {(r, w): trainer.kind.reader_rows(r, self.world_size, w, self.workers)
                for r in range(self.world_size) for w in range(self.workers)}
        if min(rows.values()) == 0:  # checked for every rank alike, so that all of them stop here
            r, w = min(rows, key=rows.get)
            raise ConfigError(f"data: the training files of process {r}" + (f", reader {w}," if self.workers > 1 else "")
                              + " hold no whole window of data.context + 1 tokens; use fewer processes or "
                              "data.workers, or larger files")
        self.pass_rows = [rows[self.rank, w] for w in range(self.workers)]

    def describe(self) -> str:
        return (f"{self.t.steps} steps of {self.t.batch_size} windows of {self.tr.kind.input_shape[0]} tokens, "
                f"streamed ({sum(self.pass_rows):,} windows a pass"
                + (" over this process's own files" if self.world_size > 1 else "") + ")")

    def batches(self) -> Sequence:
        tr, first = self.tr, self.tr.state.global_step

        def blocks(worker: int):
            where = {"seed": tr.cfg.seed, "rank": self.rank, "world_size": self.world_size, "worker": worker,
                     "workers": self.workers}
            epoch, start = divmod(given(first, worker, self.workers) * self.local_batch, self.pass_rows[worker])
            while True:
                yield from tr.kind.stream_blocks(epoch=epoch, start=start, **where)
                epoch, start = epoch + 1, 0

        readers = [rebatch(blocks(w), self.local_batch) for w in range(self.workers)]
        return StreamBatches(readers, self.t.steps, first)


def stream_plan(trainer) -> Stream | StreamSteps:
    """The plan of a kind that streams: epochs (tables) or steps (text), as the kind trains."""
    return StreamSteps(trainer) if trainer.kind.trains_by_steps else Stream(trainer)


class StreamBatches(Sequence):
    """Batches read as the trainer asks for them in order, from step ``first`` on (``steps`` in all): step ``i``'s
    from reader ``i % len(readers)``, each reader an iterator of batches read ahead on its own thread."""

    def __init__(self, readers: list[Iterator], steps: int, first: int) -> None:
        self.steps, self.next, self.last = steps, first, None
        self.stop = threading.Event()
        self.queues: list[queue.Queue] = [queue.Queue(PREFETCH) for _ in readers]
        self.threads = [threading.Thread(target=self._read, args=(rows, q), daemon=True)
                        for rows, q in zip(readers, self.queues, strict=True)]
        for thread in self.threads:
            thread.start()

    def _read(self, rows: Iterator, out: queue.Queue) -> None:
        try:
            for batch in rows:
                if not self._put(out, batch):
                    return
            self._put(out, None)
        except BaseException as e:  # noqa: BLE001 (handed to the training thread, which raises it)
            self._put(out, e)

    def _put(self, out: queue.Queue, item) -> bool:
        while not self.stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        if step == self.next - 1:  # the trainer asks for a step's batch again to count it
            return self.last
        if step != self.next or step >= self.steps:
            raise IndexError(f"stream batches are read in order, {self.steps} of them: asked for step {step}, next is "
                             f"{self.next}")
        item = self.queues[step % len(self.queues)].get()
        if isinstance(item, BaseException):
            self.stop.set()
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
