"""Micro-batching: concurrent requests are grouped into one forward pass on a worker thread.

The worker owns the backend. It takes the oldest waiting request, then everything else already
waiting (up to ``max_batch`` rows). It waits for more, until ``max_wait`` after the oldest one
arrived, only while other requests are on their way (the server announces each request it is
reading with :meth:`MicroBatcher.arriving`). So a lone request runs at once, and under load the
queue fills while the model runs: batches grow and throughput rises.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


class Overloaded(Exception):
    """More rows are waiting than the queue allows; the client should retry later."""


@dataclass
class _Item:
    batch: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.perf_counter)


_STOP = object()
SWITCH_INTERVAL_S = 0.0005


class MicroBatcher:
    def __init__(self, backend, max_batch: int = 64, max_wait_s: float = 0.002, max_queue_rows: int = 4096,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue_rows = max_queue_rows
        self.on_batch = on_batch  # (rows, seconds) after each forward pass, for metrics
        self._queue: queue.Queue = queue.Queue()
        self._waiting_rows = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._arriving = 0  # requests being read and checked that will be queued soon

    @property
    def waiting_rows(self) -> int:
        return self._waiting_rows

    def start(self, warmup: np.ndarray | None = None) -> None:
        """Start the worker; it runs ``warmup`` once so the first request pays no first-call cost."""
        # The worker takes Python's lock only at the edges of a batch, but each time it asked, the event
        # loop kept the lock for up to the default switch interval (5 ms): most of a small batch's time.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self._thread = threading.Thread(target=self._run, args=(warmup,), name="kiln-batcher", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Finish every request already queued, then end the worker."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None

    @contextlib.contextmanager
    def arriving(self):
        """Around reading and checking a request: tells the worker that waiting for it is worth it."""
        with self._lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._lock:
                self._arriving -= 1

    async def predict(self, batch: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._waiting_rows + len(batch) > self.max_queue_rows:
                raise Overloaded(f"{self._waiting_rows} rows are waiting (limit {self.max_queue_rows})")
            self._waiting_rows += len(batch)
        item = _Item(batch, loop.create_future(), loop)
        self._queue.put(item)
        return await item.future

    # ---- worker thread ----

    def _run(self, warmup: np.ndarray | None) -> None:
        try:
            self.backend.start(warmup)
            if warmup is not None:
                self.backend.predict(warmup)
        except BaseException as e:  # reported to start(), which raises it in the caller
            self._error = e
            self._started.set()
            return
        self._started.set()
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            items, rows = [first], len(first.batch)
            deadline = first.arrived + self.max_wait_s
            while rows < self.max_batch:
                try:
                    if self._arriving or not self._queue.empty():
                        nxt = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                    else:
                        nxt = self._queue.get_nowait()  # nobody else is coming: run now
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True  # finish this batch and anything queued before the stop
                    break
                items.append(nxt)
                rows += len(nxt.batch)
            self._run_batch(items, rows)
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                self._run_batch([item], len(item.batch))

    def _run_batch(self, items: list[_Item], rows: int) -> None:
        with self._lock:
            self._waiting_rows -= rows
        start = time.perf_counter()
        try:
            x = items[0].batch if len(items) == 1 else np.concatenate([it.batch for it in items])
            probs = self.backend.predict(x)
        except BaseException as e:  # a server fault: every request of the batch gets it
            for it in items:
                it.loop.call_soon_threadsafe(_set_exception, it.future, e)
            return
        if self.on_batch is not None:
            self.on_batch(rows, time.perf_counter() - start)
        offset = 0
        for it in items:
            n = len(it.batch)
            it.loop.call_soon_threadsafe(_set_result, it.future, probs[offset:offset + n])
            offset += n


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():  # a client that went away cancelled its request
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
