"""Pipelined pulls (the Rust SDK's ``pull.rs``): a pull loop keeps a pull request open at the
server for every free slot, so a slot freed while earlier requests are still open is offered
to the server at once instead of after the open request ends.

A source (the app's shared consumer, or this instance's own) has ``weight × slots`` slots. A
pull request asks for as many runs as it holds free slots; a delivered run takes one of them
until its handler ends, and the rest are free again when the request ends (filled, expired or
failed). So at most ``weight × slots`` runs are ever held, requested or running, per source,
which is what spreads an app's runs over its instances by weight.

When no request is open, freed slots are requested at once; while one is open, they are
gathered until a quarter of the capacity is free (or the open requests end), so a busy worker
sends few, larger requests rather than one per finished run. Each request is read on its own
subscription (JetStream delivers with the messages' own subjects: the subscription tells which
request a delivery answers)."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerInfo

from ._backoff import RECONNECT

log = logging.getLogger("krest_worker")

#: Beyond a request's expiry, how long (seconds) to wait for its end (a connection lost
#: meanwhile never delivers the server's end-of-request status).
END_SLACK = 2.0

#: Starts a run's task: (message, progress interval, release of its slot) → the task. The
#: slot is released by calling the function (at most once counts).
Start = Callable[[Msg, float, Callable[[], None]], "asyncio.Task[None]"]


@dataclass
class _Request:
    sub: Subscription | None
    #: Runs asked for, and delivered so far.
    asked: int
    got: int
    #: When the request is given up if the server has not ended it.
    deadline: float


class PullLoop:
    """Pulls runs from one consumer within its capacity until `stop`."""

    def __init__(
        self,
        nc: Client,
        stream: str,
        info: ConsumerInfo,
        capacity: int,
        expiry: float,
        ack_wait: float,
        stop: asyncio.Event,
        start: Start,
        hand_back: Callable[[Msg], Awaitable[None]],
        recreate: Callable[[], Awaitable[ConsumerInfo]],
    ) -> None:
        self.nc = nc
        self.stream = stream
        self.info = info
        self.capacity = capacity
        self.expiry = expiry
        self.ack_wait = ack_wait
        self.stop = stop
        self.start = start
        self.hand_back = hand_back
        self.recreate = recreate
        #: Free slots not held by an open request.
        self.spare = capacity
        self.tasks: set[asyncio.Task[None]] = set()
        self.open: dict[int, _Request] = {}
        #: Deliveries (request id, message), freed slots (-1, None), and the stop (-2, None).
        self.queue: asyncio.Queue[tuple[int, Msg | None]] = asyncio.Queue()
        self.inbox = nc.new_inbox()
        self.next_id = 0
        self.failures = 0
        self.not_before = 0.0

    def progress_every(self) -> float:
        """Progress-ack interval: a third of the consumer's ack wait as the server reports it
        (an existing consumer keeps the ack wait it was created with)."""
        return max((self.info.config.ack_wait or self.ack_wait) / 3.0, 0.5)

    def _release(self) -> None:
        self.queue.put_nowait((-1, None))

    async def run(self) -> set[asyncio.Task[None]]:
        """Pulls until stopped; returns the tasks still running."""
        gather = max(self.capacity // 4, 1)
        stopped = asyncio.ensure_future(self.stop.wait())
        stopped.add_done_callback(lambda _: self.queue.put_nowait((-2, None)))
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                await self._expire(now)
                if self.spare > 0 and now >= self.not_before and (not self.open or self.spare >= gather):
                    await self._ask(self.spare)
                    continue
                wake = min([r.deadline for r in self.open.values()], default=now + 3600.0)
                if now < self.not_before:
                    wake = min(wake, self.not_before)
                try:
                    item = await asyncio.wait_for(self.queue.get(), max(wake - now, 0.0))
                except asyncio.TimeoutError:
                    continue
                await self._handle(*item)
                # Everything already here, before deciding what to ask for.
                while not self.queue.empty() and not self.stop.is_set():
                    await self._handle(*self.queue.get_nowait())
            await self._drain()
        finally:
            stopped.cancel()
            for request in self.open.values():
                await _unsubscribe(request.sub)
            self.open.clear()
        return {t for t in self.tasks if not t.done()}

    async def _ask(self, n: int) -> None:
        """Opens a pull request for `n` runs with the spare slots."""
        self.next_id += 1
        rid = self.next_id
        reply = f"{self.inbox}.{rid}"
        sub: Subscription | None = None
        try:
            sub = await self.nc.subscribe(reply, cb=functools.partial(self._deliver, rid))
            request = {"batch": n, "expires": int(self.expiry * 1e9)}
            await self.nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.info.name}",
                json.dumps(request).encode(),
                reply=reply,
            )
        except Exception as e:  # noqa: BLE001 - retried after a pause
            log.warning("pulling runs failed: %s", e)
            await _unsubscribe(sub)
            await self._failed()
            return
        self.open[rid] = _Request(sub, n, 0, time.monotonic() + self.expiry + END_SLACK)
        self.spare -= n

    async def _deliver(self, rid: int, msg: Msg) -> None:
        self.queue.put_nowait((rid, msg))

    async def _handle(self, rid: int, msg: Msg | None) -> None:
        if rid == -1:
            self.spare += 1
            return
        if msg is None:
            return  # the stop
        request = self.open.get(rid)
        status = (msg.headers or {}).get("Status")
        if status is not None:
            if status == "100" or request is None:
                return  # an idle heartbeat, or the end of a request already given up
            # 408: the request expired (its normal end); anything else is a failure (the
            # consumer was deleted, too many requests waiting, ...).
            await self._end(rid)
            if status == "408" or request.got > 0:
                self.failures = 0
            else:
                log.debug("pull request ended with status %s: %s", status, msg.headers)
                await self._failed()
            return
        if request is None or request.got >= request.asked:
            # The request was given up (or the server sent more than asked): hand it back.
            await self.hand_back(msg)
            return
        request.got += 1
        self.failures = 0
        if request.got == request.asked:
            await self._end(rid)
        if self.stop.is_set():
            self.spare += 1
            await self.hand_back(msg)
            return
        task = self.start(msg, self.progress_every(), _once(self._release))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _end(self, rid: int) -> None:
        """Request `rid` ended: the slots it still holds are free again."""
        request = self.open.pop(rid, None)
        if request is not None:
            self.spare += request.asked - request.got
            await _unsubscribe(request.sub)

    async def _expire(self, now: float) -> None:
        """Gives up requests past their deadline (their end never arrived). One that got
        nothing counts as a failed request, as one the server ended with an error: the consumer
        behind an unanswered request may be gone, and every third failure looks it up."""
        for rid, request in list(self.open.items()):
            if now >= request.deadline:
                self.open.pop(rid)
                self.spare += request.asked - request.got
                asyncio.ensure_future(_unsubscribe(request.sub))
                if request.got == 0:
                    await self._failed()

    async def _failed(self) -> None:
        """Counts a failed request: the next waits the reconnect backoff's delay, and every
        third failure in a row the consumer is looked up or recreated (an instance's consumer
        may have been removed by the leader)."""
        self.failures += 1
        self.not_before = time.monotonic() + RECONNECT.delay(self.failures)
        if self.failures == 1 or self.failures % 10 == 0:
            log.warning(
                "pulling runs from %s failed (%d failures); retrying", self.info.name, self.failures
            )
        if self.failures % 3 == 0:
            try:
                self.info = await self.recreate()
            except Exception as e:  # noqa: BLE001
                log.warning("cannot recreate consumer %s: %s", self.info.name, e)

    async def _drain(self) -> None:
        """Reads the open requests to their end: the server may still deliver to them, and
        such runs are handed back (nak) instead of waiting out their ack wait. A request ends
        by itself when it expires; the extra bound covers a connection lost meanwhile."""
        end = time.monotonic() + self.expiry + END_SLACK
        while self.open:
            try:
                rid, msg = await asyncio.wait_for(self.queue.get(), max(end - time.monotonic(), 0))
            except asyncio.TimeoutError:
                return
            if msg is not None:
                await self._handle(rid, msg)


#: Runs a source may hold for their `notBefore` beyond its capacity, per unit of capacity,
#: whatever its rate (as the Rust SDK's `HOLD_FACTOR`): a worker taking runs dispatched a
#: second ahead holds the next second's runs while it runs this second's.
HOLD_FACTOR = 4
#: At most this many runs held beyond a source's capacity, however fast it starts them.
MAX_HELD = 16_384
#: At most this many bytes of run messages held beyond a source's capacity.
MAX_HELD_BYTES = 64 << 20


class HoldBudget:
    """How many runs a source holds beyond its intake (as the Rust SDK's `HoldBudget`): as many
    as it started in the last one to two seconds, at least `floor` (``HOLD_FACTOR ×
    capacity``), at most `MAX_HELD` runs and `MAX_HELD_BYTES` of messages."""

    def __init__(self, floor: int) -> None:
        self.floor = floor
        self.held = 0
        self.bytes = 0
        self._started = 0
        self._last = 0
        self._window_end = time.monotonic()

    def _roll(self, now: float) -> None:
        if now >= self._window_end:
            self._last = self._started if now < self._window_end + 1.0 else 0
            self._started = 0
            self._window_end = now + 1.0

    def budget(self) -> int:
        return min(max(self._started + self._last, self.floor), max(MAX_HELD, self.floor))

    def try_hold(self, nbytes: int, now: float | None = None) -> bool:
        """Holds a run whose message has `nbytes` if the budget has room; `release` it later."""
        self._roll(time.monotonic() if now is None else now)
        if self.held >= self.budget():
            return False
        if self.held > 0 and self.bytes + nbytes > MAX_HELD_BYTES:
            return False
        self.held += 1
        self.bytes += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.held -= 1
        self.bytes -= nbytes

    def started(self, now: float | None = None) -> None:
        """Counts a run started by the source."""
        self._roll(time.monotonic() if now is None else now)
        self._started += 1


class Slots:
    """A source's bounds besides its intake (the pull loop's slots): at most `capacity`
    handlers running, and runs held for their `notBefore` without an intake slot within a
    `HoldBudget` (a held run gives its intake slot back, so the pull loop asks for more, and
    takes a running slot at its time)."""

    def __init__(self, capacity: int) -> None:
        self.running = asyncio.Semaphore(capacity)
        self.holding = HoldBudget(capacity * HOLD_FACTOR)


class RunSlot:
    """One run's running slot: taken before its handler starts, freed once (when the handler
    has ended, at the latest when the run is done with)."""

    def __init__(self, slots: Slots) -> None:
        self._slots = slots
        self._held = False

    async def take(self) -> None:
        await self._slots.running.acquire()
        self._held = True
        self._slots.holding.started()

    def free(self) -> None:
        if self._held:
            self._held = False
            self._slots.running.release()


def _once(f: Callable[[], None]) -> Callable[[], None]:
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            f()

    return call


async def _unsubscribe(sub: Subscription | None) -> None:
    if sub is None:
        return
    try:
        await sub.unsubscribe()
    except Exception:  # noqa: BLE001
        pass


__all__ = ["PullLoop", "Start"]
