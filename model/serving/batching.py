"""Forward passes through BentoML's adaptive batching, with per-request isolation, admission by
predicted wait, and answers in arrival order.

``/classify`` is a plain async API; the forward pass is a ``batchable`` API of the same service.
``/classify`` hands its call to that API's BentoML dispatcher, which merges the items of concurrent
requests, of any mix of tasks, into shared passes (and records
``bentoml_service_adaptive_batch_size``). It does so in-process, as BentoML's own route for the
API does (model/bentoml_internals.py ``call_batched``: through ``self.to_async`` every call would
cross the worker's whole HTTP stack a second time). The call carries one unguessable ticket per
item, not the items: ``/classify`` leaves them in this worker's ``Tickets`` and the forward pass
looks them up. The HTTP route BentoML gives the forward pass, as every API, answers 404
(model/serving/routes.py): nothing reaches the dispatcher past admission and the gate.

Isolation: inside a merged batch the request boundaries are gone, so one exception would fail
every request in it. ``ForwardPass`` catches it, re-runs the items one by one and returns an
outcome per item: only a request whose own item fails gets an error (422, naming the item); if
every item fails and even known-good input fails, the service is broken (500 for all).

Admission: BentoML's queue is unbounded and its ``max_latency_ms`` cancels queued requests only
later. ``Admission`` decides at once instead: a request is refused (503 with Retry-After) when the
wait it would see, predicted from the items this worker already holds and the measured seconds per
item of recent passes, exceeds ``CTT_MAX_WAIT_S``. A burst the worker can clear within the deadline
is answered in full; past saturation, refusals take microseconds. Behind it, ``max_latency_ms``
still cancels what BentoML's estimate puts too late inside its dispatcher, and BentoML's request
timeout (504) ends a request that waited in the gate below for any longer.

Turns: BentoML's dispatcher holds a lone request back for the average wait of the batches it saw
recently (its "cork"), a figure it forgets only slowly: after a busy minute, every lone request
would wait about one full pass with nothing else queued. ``DispatcherGate`` lets requests into
the dispatcher only while it has no pass in flight, a pass's worth at a time in arrival order (a
request larger than a pass takes several turns: ``through_the_gate``); the rest wait in the gate,
where admission counts them. The dispatcher then never sees a request wait, so it never learns to
hold one, and each pass takes what arrived during the last. The price: the gate never splits a
request, so a pass is short when the next request does not fit in it (requests of 17 items make
passes of 17).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from bentoml.exceptions import BentoMLException

from model.serving.schemas import PassOutcome, Prediction

logger = logging.getLogger("ctt")


class Overloaded(Exception):
    """The wait this request would see is above the deadline: retry after ``retry_after_s``."""

    def __init__(self, predicted_s: float, deadline_s: float, retry_after_s: int):
        super().__init__(f"overloaded: this worker would answer in about {predicted_s:.1f} s, above the "
                         f"{deadline_s:g} s limit; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Tickets:
    """Items of this worker's admitted requests, by ticket, until their request is answered."""

    def __init__(self):
        self._items: dict[str, Any] = {}

    def issue(self, items: Sequence[Any]) -> list[str]:
        tickets = [secrets.token_urlsafe(16) for _ in items]
        self._items.update(zip(tickets, items))
        return tickets

    def redeem(self, tickets: Sequence[str]) -> list[Any | None]:
        return [self._items.get(ticket) for ticket in tickets]

    def release(self, tickets: Sequence[str]) -> None:
        for ticket in tickets:
            self._items.pop(ticket, None)

    def __len__(self) -> int:
        return len(self._items)


class Admission:
    """Predicts the wait of a new request in this worker and refuses it above ``deadline_s``.

    The wait is the items this worker holds (admitted, not yet answered) plus the request's own,
    times the seconds per item of recent passes: an exponentially weighted mean, weighted by the
    items of each pass, so under load it follows the full passes that decide how fast a queue
    drains. While the worker stays busy from one pass to the next, a pass's items are charged the
    time since the previous pass ended rather than the pass's own: that also counts what serving
    them costs besides the forward pass (HTTP, the dispatcher, the event loop sharing the core),
    about as much again under load. Before any pass is measured, ``prior_seconds_per_item`` (the
    warm-up's) stands in."""

    def __init__(self, deadline_s: float, retry_after_s: int, prior_seconds_per_item: float = 0.05,
                 weight: float = 0.2):
        self.deadline_s = deadline_s
        self.retry_after_s = retry_after_s
        self.seconds_per_item = prior_seconds_per_item
        self.weight = weight
        self.held_items = 0
        self._last_pass_end: float | None = None
        self._busy_after_last_pass = False
        self._lock = threading.Lock()  # passes are measured in BentoML's thread, admission runs in the loop

    def predicted_wait_s(self, items: int) -> float:
        return (self.held_items + items) * self.seconds_per_item

    def admit(self, items: int) -> None:
        """Hold ``items`` or raise Overloaded. An idle worker admits any request: one request
        within the item limit is never refused for its own size."""
        predicted = self.predicted_wait_s(items)
        if self.held_items and predicted > self.deadline_s:
            raise Overloaded(predicted, self.deadline_s, self.retry_after_s)
        self.held_items += items

    def done(self, items: int) -> None:
        self.held_items -= items

    def measured(self, items: int, seconds: float, ended_at: float | None = None) -> None:
        """One pass of ``items`` took ``seconds`` and ended at ``ended_at`` (monotonic; now)."""
        if items <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        ended_at = time.monotonic() if ended_at is None else ended_at
        with self._lock:
            if self._busy_after_last_pass and self._last_pass_end is not None:
                seconds = max(seconds, ended_at - self._last_pass_end)
            self._last_pass_end = ended_at
            # Items beyond this pass's were waiting: the next pass follows at once.
            self._busy_after_last_pass = self.held_items > items
            # A pass of 8 items moves the mean by ``weight``; a full pass of 32 by four times that.
            share = min(1.0, self.weight * items / 8)
            self.seconds_per_item += share * (seconds / items - self.seconds_per_item)


class DispatcherGate:
    """Lets requests into BentoML's dispatcher only while none is in it, in arrival order, up to
    ``pass_items`` items at a time (a turn for more items than that goes in alone; ``through_the_gate``
    never asks for one). One per worker, used from its event loop."""

    def __init__(self, pass_items: int):
        self.pass_items = pass_items
        self._inside = 0
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def inside(self) -> int:
        return self._inside

    @asynccontextmanager
    async def turn(self, items: int) -> AsyncIterator[None]:
        """Inside the block, the request's call may go to the dispatcher."""
        if self._inside or self._waiting:
            let_in = asyncio.get_running_loop().create_future()
            self._waiting.append((items, let_in))
            try:
                await let_in
            except asyncio.CancelledError:
                if let_in.done() and not let_in.cancelled():
                    self._leave()  # let in just as it was cancelled: pass its turn on
                elif (items, let_in) in self._waiting:
                    self._waiting.remove((items, let_in))
                raise
        else:
            self._inside += 1
        try:
            yield
        finally:
            self._leave()

    def _leave(self) -> None:
        self._inside -= 1
        if self._inside:
            return
        room = self.pass_items
        while self._waiting:
            items, let_in = self._waiting[0]
            if let_in.done():  # its request was cancelled while it waited
                self._waiting.popleft()
                continue
            if self._inside and items > room:
                break
            self._waiting.popleft()
            room -= items
            self._inside += 1
            let_in.set_result(None)


async def through_the_gate(gate: DispatcherGate, call: Callable[[list[str]], Awaitable[list[PassOutcome]]],
                           tickets: list[str]) -> list[PassOutcome]:
    """``call`` (BentoML's dispatcher) for ``tickets``, a pass's worth at a time, each in its own
    turn at ``gate``: a request larger than a pass never makes the dispatcher split it and queue the
    rest, which would teach it to hold again. Raises what ``call`` raises, except that BentoML's
    dispatcher answers a caller cancelled while it waited (BentoML's request timeout, which has
    answered 504 already) with its "overloaded" error: that is a cancellation, not a refusal."""
    outcomes: list[PassOutcome] = []
    for start in range(0, len(tickets), gate.pass_items):
        chunk = tickets[start:start + gate.pass_items]
        try:
            async with gate.turn(len(chunk)):
                outcomes += await call(chunk)
        except BentoMLException:
            if asyncio.current_task().cancelling():
                raise asyncio.CancelledError from None
            raise
    return outcomes


class ForwardPass:
    """Runs ``predict(items) -> predictions`` over a merged batch with per-item isolation."""

    def __init__(self, predict: Callable[[list[Any]], list[Prediction]], healthy: Callable[[], bool],
                 on_pass: Callable[[list[Any], float], None] = lambda items, seconds: None):
        self.predict = predict
        self.healthy = healthy
        self.on_pass = on_pass

    def __call__(self, items: Sequence[Any | None]) -> list[PassOutcome]:
        outcomes = [PassOutcome(failure="unknown") for _ in items]
        known = [(index, item) for index, item in enumerate(items) if item is not None]
        if not known:
            return outcomes
        started = time.perf_counter()
        try:
            predictions = self.predict([item for _, item in known])
        except Exception:
            self._run_apart(known, outcomes)
        else:
            for (index, _), prediction in zip(known, predictions):
                outcomes[index] = PassOutcome(prediction=prediction)
        self.on_pass([item for _, item in known], time.perf_counter() - started)
        return outcomes

    def _run_apart(self, known: list[tuple[int, Any]], outcomes: list[PassOutcome]) -> None:
        """The merged pass failed: find out which items fail on their own."""
        failed = []
        for index, item in known:
            try:
                prediction = self.predict([item])[0]
            except Exception as exc:
                failed.append((index, type(exc).__name__))
                continue
            outcomes[index] = PassOutcome(prediction=prediction)
        if not failed:
            return
        # An item that fails alone is the item's fault only if the model still works.
        if len(failed) < len(known) or self._healthy():
            for index, reason in failed:
                logger.warning(f"an item failed on its own: {reason}")
                outcomes[index] = PassOutcome(failure="item")
        else:
            for index, _ in failed:
                outcomes[index] = PassOutcome(failure="service")

    def _healthy(self) -> bool:
        try:
            if self.healthy():
                return True
        except Exception:
            pass
        logger.error("the forward pass fails even on known-good input", exc_info=True)
        return False
