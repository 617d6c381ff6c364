"""Dynamic batching for the guard service: images of concurrent requests gathered into one backend call.

    batcher = DynamicBatcher(run_batch, executor, max_batch=32, max_wait=0.0)
    batcher.start()
    result = await batcher.submit(image)     # from many request handlers at once
    await batcher.stop()                     # runs what is still queued, then ends

One worker task takes the first queued image, waits up to `max_wait` seconds for more
until `max_batch` are gathered (Triton's max_queue_delay), and runs `run_batch(images)`
in the executor, off the event loop. While a batch runs, new images queue up, so under
load the next batch is gathered without waiting. `run_batch` returns one outcome per
image, in order: its result, or an exception that belongs to that image alone; an
exception raised by `run_batch` itself goes to every image of the batch.

`Unbatched` has the same interface and runs one call per image, concurrently in the
executor: the service without dynamic batching, for comparison.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from concurrent.futures import Executor
from typing import Any, Callable, Sequence

from ..errors import ClosedError, InputError

log = logging.getLogger(__name__)

RunBatch = Callable[[list], Sequence[Any]]


def _settle(future: asyncio.Future, outcome) -> None:
    if future.done():  # the request went away (client disconnected): nobody waits for it
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class DynamicBatcher:
    """Gathers submitted items into calls of run_batch (see the module docstring)."""

    def __init__(self, run_batch: RunBatch, executor: Executor, max_batch: int = 32, max_wait: float = 0.0):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not max_wait >= 0:
            raise InputError(f"max_wait must be >= 0 seconds, got {max_wait!r}")
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait = float(max_wait)
        self._queue: collections.deque[tuple[Any, asyncio.Future]] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._stopping = False

    @property
    def queued(self) -> int:
        """Items waiting for a batch (not counting the batch that is running)."""
        return len(self._queue)

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._arrived = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="guard-batcher")

    async def submit(self, item) -> Any:
        """The outcome of run_batch for this item, once its batch has run."""
        if self._worker is None or self._stopping:
            raise ClosedError("the batcher is not running (the service is starting or shutting down)")
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._arrived.set()
        return await future

    async def stop(self) -> None:
        """Refuse new items, run the queued ones, and end the worker."""
        self._stopping = True
        if self._worker is not None:
            self._arrived.set()
            await self._worker

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                if self._stopping:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self.max_wait
            # Wait for more only while the batch is not full; once stopping, run what is here.
            while len(self._queue) < self.max_batch and not self._stopping:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
                    break
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            await self._run(batch)

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        items = [item for item, _ in batch]
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(self.executor, self.run_batch, items)
        except Exception as error:  # noqa: BLE001 - handed to every request of the batch, which answers it
            outcomes = [error] * len(batch)
        for (_, future), outcome in zip(batch, outcomes):
            _settle(future, outcome)


class Unbatched:
    """One run_batch call per item, run concurrently in the executor: no dynamic batching."""

    max_batch = 1
    max_wait = 0.0
    queued = 0

    def __init__(self, run_batch: RunBatch, executor: Executor):
        self.run_batch = run_batch
        self.executor = executor
        self._running = False

    def start(self) -> None:
        self._running = True

    async def submit(self, item) -> Any:
        if not self._running:
            raise ClosedError("the service is starting or shutting down")
        [outcome] = await asyncio.get_running_loop().run_in_executor(self.executor, self.run_batch, [item])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def stop(self) -> None:
        self._running = False
