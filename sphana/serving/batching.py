"""Dynamic batching: requests to one model that arrive while it is busy run together.

A request submits its inputs (:meth:`Batcher.submit`) and awaits their results. One worker per
model takes every request queued (waiting up to ``max_wait_ms`` for more when the batch is not
full: 0, the default, never waits, so a lone request runs at once), drops requests whose client
has gone (asked once, as the batch forms: :class:`ClientGone`), sorts the inputs by length and
cuts them into batches of at most ``max_batch_requests`` inputs and ``max_batch_tokens`` padded
tokens, so similar lengths pad together. Batches run one at a time on the model's own thread, so
the event loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

RunFn = Callable[[Sequence[Any]], Sequence[Any]]
GoneFn = Callable[[], Awaitable[bool]]  # whether the request's client has disconnected


class ClientGone(Exception):
    """The request's client disconnected before its batch ran: it was dropped."""


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int = 16384  # padded tokens (inputs x longest) in one batch
    max_batch_requests: int = 64  # inputs in one batch; 1 turns batching off
    max_wait_ms: float = 0.0  # how long a batch that is not full waits for more

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_batch_requests < 1 or self.max_wait_ms < 0:
            raise ValueError("max_batch_tokens and max_batch_requests >= 1, max_wait_ms >= 0")


@dataclass
class _Job:
    items: Sequence[Any]
    future: asyncio.Future
    queued_at: float
    gone: GoneFn | None


@dataclass(frozen=True)
class Timing:
    """Where a request's time went (seconds)."""

    queue: float
    inference: float
    batch_size: int


class Batcher:
    """Batches ``run`` calls for one model. ``cost(item)`` is an item's length in tokens.

    ``observe(batch_size, seconds)`` (optional) is told of every batch that runs.
    """

    def __init__(
        self,
        name: str,
        run: RunFn,
        cost: Callable[[Any], int],
        limits: BatchLimits,
        observe: Callable[[int, float], None] | None = None,
    ) -> None:
        self.name = name
        self.run = run
        self.cost = cost
        self.limits = limits
        self.observe = observe
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self.worker: asyncio.Task | None = None
        self.dropped = 0  # requests whose client left before they ran

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return self.queue.qsize()

    async def submit(
        self, items: Sequence[Any], gone: GoneFn | None = None
    ) -> tuple[list[Any], Timing]:
        """The results of ``items`` (in order) and the request's timing; :class:`ClientGone`
        when ``gone()`` says, as its batch forms, that the client has left."""
        if self.worker is None or self.worker.done():
            self.worker = asyncio.get_running_loop().create_task(self._work())
        loop = asyncio.get_running_loop()
        job = _Job(items, loop.create_future(), time.perf_counter(), gone)
        self.queue.put_nowait(job)
        return await job.future

    def close(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _collect(self) -> list[_Job]:
        jobs = [await self.queue.get()]
        count = len(jobs[0].items)
        deadline = time.perf_counter() + self.limits.max_wait_ms / 1000
        while count < self.limits.max_batch_requests:
            if not self.queue.empty():
                job = self.queue.get_nowait()
            else:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            jobs.append(job)
            count += len(job.items)
        return jobs

    def _batches(self, items: list[tuple[int, Any]]) -> list[list[tuple[int, Any]]]:
        """Items sorted by length, cut where a batch would break a limit."""
        items.sort(key=lambda pair: self.cost(pair[1]))
        batches: list[list[tuple[int, Any]]] = [[]]
        for pair in items:
            batch = batches[-1]
            longest = self.cost(pair[1])  # sorted: the newest item is the longest
            if batch and (
                len(batch) >= self.limits.max_batch_requests
                or (len(batch) + 1) * longest > self.limits.max_batch_tokens
            ):
                batch = []
                batches.append(batch)
            batch.append(pair)
        return batches

    def _run_all(self, batches: list[list[tuple[int, Any]]]) -> tuple[list[Any], float]:
        """Runs on the model's thread: every batch; results by flat index."""
        results: list[Any] = [None] * sum(len(b) for b in batches)
        start = time.perf_counter()
        for batch in batches:
            t0 = time.perf_counter()
            outputs = self.run([item for _, item in batch])
            for (index, _), output in zip(batch, outputs, strict=True):
                results[index] = output
            if self.observe is not None:
                self.observe(len(batch), time.perf_counter() - t0)
        return results, time.perf_counter() - start

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            live = []
            for job in jobs:
                if job.future.done():  # the request was cancelled
                    continue
                if job.gone is not None and await job.gone():
                    job.future.set_exception(ClientGone())
                    continue
                live.append(job)
            self.dropped += len(jobs) - len(live)
            if not live:
                continue
            flat = [(i, item) for i, item in enumerate(it for j in live for it in j.items)]
            started = time.perf_counter()
            try:
                results, seconds = await loop.run_in_executor(
                    self.executor, self._run_all, self._batches(flat)
                )
            except Exception as e:  # the model failed: every request of the batch learns why
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            offset = 0
            for job in live:
                n = len(job.items)
                if not job.future.done():
                    timing = Timing(started - job.queued_at, seconds, len(flat))
                    job.future.set_result((results[offset : offset + n], timing))
                offset += n
