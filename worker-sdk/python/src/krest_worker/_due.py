"""Starts before reports (as the Rust SDK's `due.rs`): runs dispatched ahead of their time come
due together (a second's burst of fires), and the reports of runs that just finished — their
`finished` events and acks — wait until every run already due has started, at most
`MAX_REPORT_WAIT`.

A held run is counted from when it begins holding until its coroutine resumes at its time (the
`resumed` call), before it waits for a running slot, so runs waiting for slots held by long
handlers do not hold reports back."""

from __future__ import annotations

import asyncio
import math
import time

#: The longest a finished run's report waits for due runs to start, in seconds.
MAX_REPORT_WAIT = 0.05


class DueRuns:
    """Held runs by when they are due (monotonic seconds, down to the millisecond: a burst's
    runs, each held from when it arrived, share a few keys)."""

    def __init__(self) -> None:
        self._held: dict[float, int] = {}
        self._waiters: set[asyncio.Future[None]] = set()

    def hold(self, until: float) -> float:
        """Counts a run held until `until` (monotonic); returns the key to pass to `resumed`."""
        key = math.floor(until * 1000) / 1000
        self._held[key] = self._held.get(key, 0) + 1
        return key

    def resumed(self, key: float) -> None:
        """The run held under `key` resumed (its time came, or it ended early)."""
        n = self._held.get(key, 0) - 1
        if n > 0:
            self._held[key] = n
        else:
            self._held.pop(key, None)
        if not self.busy(time.monotonic()):
            waiters, self._waiters = self._waiters, set()
            for f in waiters:
                if not f.done():
                    f.set_result(None)

    def busy(self, now: float) -> bool:
        """Whether a run due by `now` has not resumed yet."""
        return bool(self._held) and min(self._held) <= now

    async def quiet(self) -> None:
        """Waits until every run due now has started, at most `MAX_REPORT_WAIT`."""
        deadline = time.monotonic() + MAX_REPORT_WAIT
        loop = asyncio.get_running_loop()
        while self.busy(time.monotonic()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            f: asyncio.Future[None] = loop.create_future()
            self._waiters.add(f)
            try:
                await asyncio.wait_for(f, left)
            except asyncio.TimeoutError:
                return
            finally:
                self._waiters.discard(f)
