"""Continuous batching with per-request isolation and a bounded queue, for one worker.

Requests wait in a queue; whenever the model is idle, every waiting request (up to
``max_batch_items`` items) goes into one forward pass. Nothing waits on a timer: at low load a
request runs at once, under load the queue fills while the model works and batches grow by
themselves. Why not BentoML's batchable APIs: inside a merged batch the request boundaries are
gone, so one exception fails every request in it; here a failed merged pass is re-run request by
request, and only a request whose own items fail gets an error, naming its item. The queue is
bounded: past ``max_queued_items`` a request is refused at once (503 with Retry-After) instead of
waiting for seconds it would probably time out in anyway.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

logger = logging.getLogger("ctt")


class Overloaded(Exception):
    """The queue is full: the client should retry after ``retry_after_s``."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"overloaded: more than the queue bound is waiting; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ItemFailed(Exception):
    """One item of a request could not be processed although the same pass worked for others."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"item {index} could not be classified: {reason}")
        self.index = index


class BatchFailed(Exception):
    """The forward pass fails whatever it is given: a fault of the service, not of a client."""


@dataclass
class _Request:
    items: Sequence[Any]
    future: asyncio.Future


class ContinuousBatcher:
    """``run(items) -> results`` is called in one worker thread, never concurrently with itself."""

    def __init__(self, run: Callable[[list[Any]], list[Any]], max_batch_items: int, max_queued_items: int,
                 retry_after_s: int = 1, healthy: Callable[[], bool] = lambda: True):
        """``healthy()`` runs known-good input: when a request fails on its own, it tells a bad
        item (the model still works) from a broken service (it does not)."""
        self.run = run
        self.healthy = healthy
        self.max_batch_items = max_batch_items
        self.max_queued_items = max_queued_items
        self.retry_after_s = retry_after_s
        self._queue: list[_Request] = []
        self._queued_items = 0
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        # One thread: the model is not re-entrant, and the event loop must stay free to answer
        # probes and refuse excess requests while a pass runs.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctt-forward")

    @property
    def queued_items(self) -> int:
        return self._queued_items

    def _ensure_running(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._dispatch_forever())

    async def submit(self, items: Sequence[Any]) -> list[Any]:
        self._ensure_running()
        # An empty queue always admits, so a request as large as the item limit is never refused
        # on an idle worker.
        if self._queued_items and self._queued_items + len(items) > self.max_queued_items:
            raise Overloaded(self.retry_after_s)
        request = _Request(items, asyncio.get_running_loop().create_future())
        self._queue.append(request)
        self._queued_items += len(items)
        assert self._wakeup is not None
        self._wakeup.set()
        return await request.future

    def _take_batch(self) -> list[_Request]:
        batch, count = [], 0
        while self._queue and (not batch or count + len(self._queue[0].items) <= self.max_batch_items):
            request = self._queue.pop(0)
            batch.append(request)
            count += len(request.items)
        self._queued_items -= count
        return batch

    async def _dispatch_forever(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch = self._take_batch()
                outcomes = await loop.run_in_executor(self._executor, self._run_isolated, batch)
                for request, outcome in zip(batch, outcomes):
                    if request.future.done():  # the client went away
                        continue
                    if isinstance(outcome, BaseException):
                        request.future.set_exception(outcome)
                    else:
                        request.future.set_result(outcome)

    def _run_isolated(self, batch: list[_Request]) -> list[list[Any] | BaseException]:
        """Run the merged batch; if it fails, find out whose items fail and answer the others."""
        items = [item for request in batch for item in request.items]
        try:
            results = self.run(items)
        except Exception:
            return self._run_apart(batch)
        outcomes, start = [], 0
        for request in batch:
            outcomes.append(results[start:start + len(request.items)])
            start += len(request.items)
        return outcomes

    def _run_apart(self, batch: list[_Request]) -> list[list[Any] | BaseException]:
        outcomes: list[list[Any] | BaseException] = []
        service_ok: bool | None = None
        for request in batch:
            try:
                outcomes.append(self.run(list(request.items)))
                continue
            except Exception:
                pass
            if service_ok is None:
                service_ok = self._healthy()
            outcomes.append(self._culprit(request) if service_ok else BatchFailed("the forward pass failed"))
        return outcomes

    def _healthy(self) -> bool:
        try:
            if self.healthy():
                return True
        except Exception:
            pass
        logger.error("the forward pass fails even on known-good input", exc_info=True)
        return False

    def _culprit(self, request: _Request) -> BaseException:
        """The first item of ``request`` that fails alone, or BatchFailed if none does."""
        for index, item in enumerate(request.items):
            try:
                self.run([item])
            except Exception as exc:
                logger.warning(f"item {index} of a request failed on its own: {type(exc).__name__}")
                return ItemFailed(index, "the model could not process this text")
        return BatchFailed("the forward pass failed")

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
