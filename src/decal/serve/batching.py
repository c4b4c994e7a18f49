"""A batching queue: concurrent requests' inputs are scored together, one batch at a time.

`BatchQueue.submit` puts a request's inputs in a FIFO queue and waits for their answers. One
worker task takes up to `max_batch_size` inputs (from any requests) as soon as the batch is full,
or it has waited `max_wait_s` for more, or no input has come for a tenth of that (so a lone
request waits a tenth of `max_wait_s`), runs the blocking batch function on a dedicated
thread (so the event loop keeps answering health checks and rejecting overload), and hands each
answer back to its request. While a batch runs, new inputs queue up and form the next batch, so
under load batches fill without waiting.

Limits: more than `max_queue` waiting inputs raises `QueueFull` (with a Retry-After estimate from
the recent seconds per input); a request not answered within its timeout raises
`DeadlineExceeded`, and its inputs that have not started are dropped from the queue. `close`
stops taking requests, answers everything already queued, then stops the worker.
`run_exclusive` runs a function on the batch thread between batches (a reload's swap).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = ["QueueFull", "DeadlineExceeded", "BatchQueue"]

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue cannot take the request now; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    """The request was not answered within its timeout."""


@dataclass(eq=False)
class _Item:
    payload: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class BatchQueue:
    """FIFO of inputs scored in batches by `run_batch` on one worker thread (module docstring).

    Args:
        run_batch: blocking function, payloads (B,) -> results (B,), in order.
        max_batch_size: inputs per batch.
        max_wait_s: how long the worker waits at most for a batch to fill.
        max_queue: waiting inputs (not counting the batch that runs) before `QueueFull`.
        on_batch: called on the event loop after each batch with (size, seconds).
    """

    def __init__(
        self, run_batch: Callable[[list], Sequence], *, max_batch_size: int, max_wait_s: float, max_queue: int,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        self.run_batch = run_batch
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.on_batch = on_batch
        self._items: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decal-engine")
        self._closing = False
        self._seconds_per_input = 0.0  # moving average, for Retry-After
        self.running = 0  # inputs in the batch that runs now

    @property
    def depth(self) -> int:
        """Inputs waiting (not yet in a running batch)."""
        return len(self._items)

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="decal-batcher")

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: waiting inputs x recent seconds per input."""
        seconds = (self.depth + self.running) * self._seconds_per_input
        return int(min(60, max(1, math.ceil(seconds))))

    async def submit(self, payloads: Sequence, *, timeout: float) -> list:
        """Queue `payloads` and wait for their results, in order.

        Raises:
            QueueFull: the queue holds too many inputs, or the server is shutting down.
            DeadlineExceeded: no answer within `timeout` seconds.
            Exception: whatever `run_batch` raised for their batch.
        """
        if self._closing:
            raise QueueFull("the server is shutting down", retry_after=1)
        if self.depth + len(payloads) > self.max_queue:
            raise QueueFull(
                f"the queue holds {self.depth} inputs and takes at most {self.max_queue}; retry later",
                retry_after=self.retry_after(),
            )
        loop = asyncio.get_running_loop()
        items = [_Item(p, loop.create_future()) for p in payloads]
        self._items.extend(items)
        self._wakeup.set()
        gathered = asyncio.gather(*(it.future for it in items), return_exceptions=True)
        try:
            results = await asyncio.wait_for(gathered, timeout)
        except asyncio.TimeoutError:
            # gather was cancelled, and with it every item future; those still waiting leave the
            # queue now, so they neither count against its size nor get scored.
            for it in items:
                try:
                    self._items.remove(it)
                except ValueError:  # already taken into a batch
                    pass
            raise DeadlineExceeded(f"no answer within {timeout:g} s") from None
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return list(results)

    async def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread between two batches (no batch runs meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def close(self) -> None:
        """Refuse new inputs, answer the queued ones, stop the worker and its thread."""
        self._closing = True
        if self._task is not None:
            self._wakeup.set()
            await self._task
        self._executor.shutdown(wait=True)

    def _take(self) -> list[_Item]:
        batch = []
        while self._items and len(batch) < self.max_batch_size:
            item = self._items.popleft()
            if not item.future.done():  # cancelled by its request's deadline
                batch.append(item)
        return batch

    async def _wait_to_fill(self) -> None:
        """Until the batch is full, or `max_wait_s` has passed, or no input came for a tenth of it.

        The pause rule lets a lone request go at once (a tenth of the wait) while a burst of
        requests, such as the clients of the previous batch sending again, joins one batch.
        """
        start = last_arrival = time.monotonic()
        count = len(self._items)
        while self._items and len(self._items) < self.max_batch_size and not self._closing:
            remaining = min(start + self.max_wait_s, last_arrival + self.max_wait_s / 10) - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return
            if len(self._items) != count:
                count, last_arrival = len(self._items), time.monotonic()

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._items:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_to_fill()
            batch = self._take()
            if not batch:
                continue
            await self._run(loop, batch)

    async def _run(self, loop, batch: list[_Item]) -> None:
        start = time.perf_counter()
        self.running = len(batch)
        try:
            results = await loop.run_in_executor(self._executor, self.run_batch, [it.payload for it in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the engine returned {len(results)} results for {len(batch)} inputs")
        except Exception as e:  # one failed batch fails its own requests, never the server
            logger.error("a batch of %d inputs failed: %s: %s", len(batch), type(e).__name__, e)
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(e)
        else:
            for it, result in zip(batch, results):
                if not it.future.done():
                    it.future.set_result(result)
        finally:
            self.running = 0
        seconds = time.perf_counter() - start
        per_input = seconds / len(batch)
        self._seconds_per_input = per_input if not self._seconds_per_input else 0.8 * self._seconds_per_input + 0.2 * per_input
        if self.on_batch is not None:
            self.on_batch(len(batch), seconds)
