"""Continuous batching of text generation on a worker thread (``POST /v1/completions``).

Each request is a job: its prompt's token ids and its sampling settings. The worker reads a new job's prompt
alone (prefill), then decodes it together with every other active job, one token per job per step
(:class:`kiln.nn.batch_decode.BatchDecoder`, each with its own key/value cache); jobs join between steps and
leave when done, so a long generation never holds up a short one. A model that cannot be batched (a recurrent
one) still takes turns: each step advances every job by one token, one job after another.

The queue limit counts tokens, not requests: a job costs its prompt's tokens plus ``max_tokens`` from the
moment it is accepted until it ends, and a job that would take the total over ``max_queue_tokens`` is refused
(503, retry later) at once.

Text goes back to the event loop as it is written (deltas, for server-sent events). Text that could be the
start of a stop string is held back until it is known not to be one. A job whose client went away is
cancelled: the worker drops it at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.data.requests import objects
from kiln.nn.batch_decode import BatchDecoder, batchable
from kiln.nn.generate import Sampling, generate_ids, next_token
from kiln.serve.batcher import Overloaded


@dataclass
class Event:
    """What the worker tells a request about one of its jobs: new text, or the end (``finish`` set)."""

    index: int  # the job's place in its request (the choice's index)
    text: str = ""
    finish: str | None = None  # "stop" (a stop string), "length" (max_tokens), "error"
    tokens: int = 0  # completion tokens, with the end
    error: BaseException | None = None


@dataclass
class Job:
    index: int
    prompt: list[int]
    sampling: Sampling
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    cost: int = 0  # tokens this job holds in the queue: prompt + max_tokens
    out: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the text already sent
    cancelled: bool = False  # set from the event loop when the client went away
    # worker-side state
    gen: torch.Generator | None = None
    logits: torch.Tensor | None = None  # the logits of the next token (batched jobs)
    solo: Any = None  # the token iterator of a job decoded alone

    def cancel(self) -> None:
        self.cancelled = True

    def tell(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


_STOP = object()


class GenerationEngine:
    def __init__(self, run, max_rows: int = 64, max_queue_tokens: int = 65536,
                 on_step: Callable[[int, float], None] | None = None, threads: int | None = None) -> None:
        self.run, self.threads = run, threads
        self.model = run.model
        self.tokenizer = run.kind.tokenizer
        self.context = self.model.input_shape[0]
        self.max_rows = max_rows
        self.max_queue_tokens = max_queue_tokens
        self.on_step = on_step  # (tokens written, seconds) after each decoding step, for metrics
        self.batched = batchable(self.model)
        self.mode = ("continuous batching with per-request key/value caches" if self.batched else
                     "continuous, one request after another each step (this model cannot be batched)")
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._tokens = 0  # held by accepted jobs that have not ended
        self._thread: threading.Thread | None = None
        self.active = 0  # jobs being decoded (read by tests and metrics)
        self.cancelled = 0  # jobs dropped because their client went away
        self.generated = 0  # tokens written, all jobs
        self.most_rows = 0  # the most texts that one step has written a token for

    @property
    def queued_tokens(self) -> int:
        return self._tokens

    def start(self, warmup=None) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="kiln-generate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._inbox.put(_STOP)
            self._thread.join()
            self._thread = None

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's jobs, or raise :class:`Overloaded` (none queued) when their tokens do not fit."""
        cost = sum(j.cost for j in jobs)
        with self._lock:
            if self._tokens + cost > self.max_queue_tokens:
                raise Overloaded(f"{self._tokens} tokens are queued or being written and this request needs "
                                 f"{cost} (limit {self.max_queue_tokens})")
            self._tokens += cost
        for job in jobs:
            self._inbox.put(job)

    # ---- worker thread ----

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        decoder = BatchDecoder(self.model) if self.batched else None
        rows: list[Job] = []  # batched jobs, in the decoder's row order
        solo: list[Job] = []
        stopping = False
        while True:
            # Take new jobs: wait for one when idle, else only those already waiting (between steps).
            while len(rows) + len(solo) < self.max_rows:
                try:
                    item = self._inbox.get(block=not (rows or solo) and not stopping)
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    continue
                try:
                    self._begin(item, decoder, rows, solo)
                except BaseException as e:  # noqa: BLE001 - a server fault: that request gets it
                    self._end(item, "error", error=e)
            if not (rows or solo):
                if stopping:
                    return
                continue
            start, before = time.perf_counter(), self.generated
            try:
                rows = self._step_batched(decoder, rows) if rows else rows
                solo = [job for job in solo if self._advance_solo(job)]
            except BaseException as e:  # noqa: BLE001 - every active job gets the fault; the server goes on
                for job in rows + solo:
                    self._end(job, "error", error=e)
                rows, solo = [], []
                decoder = BatchDecoder(self.model) if self.batched else None
            self.active = len(rows) + len(solo)
            self.most_rows = max(self.most_rows, self.generated - before)
            if self.on_step is not None:
                self.on_step(self.generated - before, time.perf_counter() - start)

    def _begin(self, job: Job, decoder: BatchDecoder | None, rows: list[Job], solo: list[Job]) -> None:
        if job.cancelled:
            self._end(job, None)
            return
        s = job.sampling
        prompt = torch.tensor(job.prompt, dtype=torch.int64)
        if decoder is not None and len(job.prompt) + s.max_new_tokens <= self.context:
            gen = torch.Generator(decoder.device)
            gen.manual_seed(s.seed) if s.seed is not None else gen.seed()
            caches, logits = decoder.prefill(prompt)
            decoder.add(caches, len(job.prompt))
            job.gen, job.logits = gen, logits
            rows.append(job)
        else:  # past the context (kiln's own route windows it) or a model that cannot be batched
            job.solo = generate_ids(self.model, prompt, s)
            solo.append(job)
        self.active = len(rows) + len(solo)

    def _step_batched(self, decoder: BatchDecoder, rows: list[Job]) -> list[Job]:
        """Each row's next token from its logits; the rows that go on are decoded one step further."""
        logits = torch.stack([job.logits for job in rows])
        tokens = [next_token(logits[i: i + 1], job.sampling, job.gen) for i, job in enumerate(rows)]
        keep = [i for i, (job, token) in enumerate(zip(rows, tokens, strict=True)) if self._took(job, int(token))]
        if len(keep) != len(rows):
            decoder.keep(keep)
        rows = [rows[i] for i in keep]
        if rows:
            out = decoder.step(torch.cat([tokens[i] for i in keep]).view(-1))
            for job, row in zip(rows, out, strict=True):
                job.logits = row
        return rows

    def _advance_solo(self, job: Job) -> bool:
        if job.cancelled:
            self._end(job, None)
            return False
        try:
            token = next(job.solo)
        except StopIteration:
            self._end(job, "length")
            return False
        return self._took(job, token)

    def _took(self, job: Job, token: int) -> bool:
        """A job's new token: the text it makes is sent, less what might start a stop string. Whether it goes on."""
        if job.cancelled:
            self._end(job, None)
            return False
        job.out.append(token)
        self.generated += 1
        text = self.tokenizer.decode(job.out)
        stops = job.sampling.stop
        found = [text.find(s) for s in stops if s in text]
        if found:
            end = min(found)
            if end > job.sent:
                job.tell(Event(job.index, text[job.sent: end]))
            self._end(job, "stop")
            return False
        done = len(job.out) >= job.sampling.max_new_tokens
        safe = len(text) if done else len(text) - max((len(s) - 1 for s in stops), default=0)
        while safe > job.sent and text[safe - 1] == "\ufffd" and not done:  # bytes of a character still coming
            safe -= 1
        if safe > job.sent:
            job.tell(Event(job.index, text[job.sent: safe]))
            job.sent = safe
        if done:
            self._end(job, "length")
            return False
        return True

    def _end(self, job: Job, finish: str | None, error: BaseException | None = None) -> None:
        with self._lock:
            self._tokens -= job.cost
        if finish is None:  # cancelled: nobody is listening
            self.cancelled += 1
            return
        job.tell(Event(job.index, finish=finish, tokens=len(job.out), error=error))


class EngineBatcher:
    """kiln's own ``POST /v1/predict`` on a language-model run, through the same engine (in the place of the
    micro-batcher): each instance, a prompt with ``Run.generate``'s settings, is one job, answered with its whole
    text. A prompt and ``max_new_tokens`` past the context are windowed as ``Run.generate`` windows them (such a
    job takes its turn at each step without being batched)."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = self.backend = engine

    @property
    def waiting_rows(self) -> int:
        return self.engine._inbox.qsize()

    def start(self, warmup=None) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    def arriving(self):
        return contextlib.nullcontext()  # the engine never waits for requests still being read

    async def predict(self, batch) -> Any:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        for i, r in enumerate(batch):
            ids = self.engine.tokenizer.encode(r["prompt"])
            sampling = Sampling(r["max_new_tokens"], r["temperature"], r["top_k"], r["top_p"], r["seed"], r["stop"])
            jobs.append(Job(i, ids, sampling, events, loop, cost=len(ids) + r["max_new_tokens"]))
        self.engine.submit(jobs)
        texts, remaining = [""] * len(jobs), len(jobs)
        try:
            while remaining:
                event = await events.get()
                texts[event.index] += event.text
                if event.error is not None:
                    raise event.error
                remaining -= event.finish is not None
        finally:
            for job in jobs:
                job.cancel()
        return objects(texts)
