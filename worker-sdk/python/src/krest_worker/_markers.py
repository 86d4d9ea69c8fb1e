"""Cancel markers (``krest-cancels``) mirrored in memory by a KV watch, so checking a run for
a marker before its handler starts costs no round trip to the server (the Rust SDK's
``markers.rs``).

The mirror answers only while it is known to be complete: after the watch has delivered the
bucket's current markers, and while it keeps up with the bucket (checked every few seconds; a
watch that falls behind is restarted). Otherwise, and when the bucket holds more markers than
the mirror keeps, a run's check asks the bucket, as it always did. A marker written an
instant before its run arrives may not be mirrored yet; its cancellation broadcast, which
follows the marker, is remembered by the worker for runs not yet here."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.client import JetStreamContext

from ._backoff import RECONNECT

log = logging.getLogger("krest_worker")

CANCELS_BUCKET = "krest-cancels"
#: Most markers mirrored; beyond this, checks go to the bucket.
MAX_MARKERS = 100_000
#: How often (seconds) the watch is checked against the bucket's last revision.
CHECK_EVERY = 5.0
#: How long (seconds) an overflowing mirror waits before it tries again.
OVERFLOW_PAUSE = 60.0


class Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


#: `Markers.lookup`'s answer when the mirror cannot tell: ask the bucket.
UNKNOWN = Unknown()


def reason_of(value: bytes | None) -> str:
    """A marker's reason (``"cancelled"`` when it is not a readable CancelRequest)."""
    try:
        return str(json.loads(value or b"")["reason"])
    except (ValueError, KeyError, TypeError):
        return "cancelled"


class Markers:
    """The mirrored markers: run id → reason."""

    def __init__(self) -> None:
        self._map: dict[str, str] = {}
        self.complete = False

    def lookup(self, run_id: str) -> str | None | Unknown:
        """The reason of `run_id`'s marker, None when it has none, or `UNKNOWN` while the
        mirror is not complete."""
        if not self.complete:
            return UNKNOWN
        return self._map.get(run_id)

    def apply(self, key: str, operation: str | None, value: bytes | None) -> bool:
        """Applies one bucket entry; False once the mirror is over its bound."""
        if operation in ("DEL", "PURGE"):
            self._map.pop(key, None)
        else:
            self._map[key] = reason_of(value)
        return len(self._map) <= MAX_MARKERS

    def clear(self) -> None:
        self._map.clear()
        self.complete = False


async def _bucket_state(js: JetStreamContext) -> tuple[int, int] | None:
    """The bucket's stream state: (messages, last sequence)."""
    try:
        info = await js.stream_info(f"KV_{CANCELS_BUCKET}")
    except Exception:  # noqa: BLE001 - unknown state: no conclusion drawn
        return None
    return int(info.state.messages or 0), int(info.state.last_seq or 0)


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleeps `seconds`; False if `stop` is set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
        return False
    except asyncio.TimeoutError:
        return True


async def mirror(js: JetStreamContext, markers: Markers, stop: asyncio.Event) -> None:
    """Mirrors the bucket into `markers` until `stop` (then the mirror answers no more)."""
    try:
        await _mirror_until_stopped(js, markers, stop)
    finally:
        markers.complete = False


async def _mirror_until_stopped(js: JetStreamContext, markers: Markers, stop: asyncio.Event) -> None:
    failures = 0
    overflowed = False
    while not stop.is_set():
        markers.clear()
        if overflowed:
            overflowed = False
            # Checks go to the bucket meanwhile; try again once markers may have expired.
            if not await _wait(stop, OVERFLOW_PAUSE):
                return
        # An empty bucket's watch delivers nothing until the first marker: complete at once.
        state = await _bucket_state(js)
        entries: asyncio.Queue[Msg] = asyncio.Queue()

        async def entry(msg: Msg) -> None:
            entries.put_nowait(msg)

        try:
            # The watch: an ordered consumer on the bucket from the latest entry of each key.
            # (Not nats-py's `KeyValue.watch`, which asks for its consumer's info: a request
            # the least-privilege worker users of nats/accounts.conf may not make.)
            sub = await js.subscribe(
                f"$KV.{CANCELS_BUCKET}.>",
                stream=f"KV_{CANCELS_BUCKET}",
                cb=entry,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            )
            failures = 0
        except Exception as e:  # noqa: BLE001 - retried; each run asks the bucket meanwhile
            failures += 1
            log.debug("cannot watch cancel markers; checking each run instead: %s", e)
            if not await _wait(stop, RECONNECT.delay(failures)):
                return
            continue
        if state is not None and state[0] == 0:
            markers.complete = True
        try:
            overflowed = await _follow(js, entries, markers, stop)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001
                pass


async def _follow(
    js: JetStreamContext, entries: asyncio.Queue[Msg], markers: Markers, stop: asyncio.Event
) -> bool:
    """Applies the watch's entries until it falls behind or `stop`; True if the mirror
    overflowed."""
    seen = 0
    behind_checks = 0
    next_check = time.monotonic() + CHECK_EVERY
    while not stop.is_set():
        try:
            msg = await asyncio.wait_for(entries.get(), max(next_check - time.monotonic(), 0.01))
        except asyncio.TimeoutError:
            msg = None
        if msg is not None:
            meta = msg.metadata
            seen = max(seen, int(meta.sequence.stream))
            key = msg.subject[len(f"$KV.{CANCELS_BUCKET}.") :]
            operation = (msg.headers or {}).get("KV-Operation")
            if not markers.apply(key, operation, msg.data):
                log.warning(
                    "too many cancel markers to mirror (%d); checking each run instead", MAX_MARKERS
                )
                return True
            if meta.num_pending == 0:
                # Caught up with the bucket.
                markers.complete = True
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + CHECK_EVERY
            # A watch that stopped delivering is restarted.
            state = await _bucket_state(js)
            if state is not None:
                messages, last = state
                if messages > 0 and last > seen:
                    behind_checks += 1
                    if behind_checks >= 2:
                        log.debug("cancel marker watch is behind (%d < %d); restarting it", seen, last)
                        return False
                else:
                    behind_checks = 0
    return False
