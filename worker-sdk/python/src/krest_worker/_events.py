"""Publishing run events (started, log, finished) to the events stream: in order, pipelined
(acknowledgements are awaited off the send path), retried with the same ``Nats-Msg-Id`` so a
retry never creates a duplicate. Also `StartReport`, an attempt's ``started`` event sent late or folded into
``finished`` (the Rust SDK's ``events.rs``)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any

from nats.aio.client import Client
from nats.errors import MaxPayloadError
from nats.js.client import JetStreamContext

from ._backoff import RECONNECT
from ._trace import attempt_traceparent

log = logging.getLogger("krest_worker")

#: Tries of one publish before it is given up (about 28 s of waiting in all).
PUBLISH_ATTEMPTS = 10
#: How long (seconds) an event's acknowledgement is awaited before it is sent again.
PUBLISH_TIMEOUT = 5.0


class PublishError(Exception):
    """An event or message could not be stored."""


def event_subject(event: dict[str, Any]) -> str:
    return f"krest.events.{event.get('appName', '')}.{event['jobGroup']}.{event['jobName']}"


def event_msg_id(event: dict[str, Any]) -> str:
    kind = event["type"]
    if kind == "log":
        kind = f"log/{event['seq']}"
    token = event.get("deliveryToken", "")
    return f"{event['runId']}/{event['shard']}/{event['attempt']}/{token}/{kind}"


async def store(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    headers: dict[str, str],
    timeout: float = 5.0,
) -> None:
    """Publishes and waits until JetStream has stored the message (or answered that it is a
    duplicate of a stored one)."""
    try:
        await js.publish(subject, payload, timeout=timeout, headers=headers)
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        raise PublishError(f"cannot publish to {subject}: {type(e).__name__}: {e}") from e


class StartReport:
    """An attempt's ``started`` event, sent at most once: when the attempt has run for the
    worker's ``report_start_after``, or before its first log line, or never, when the attempt
    ends first: its ``finished`` event then carries the start (``startedAt``,
    ``scheduledAt``), one stored message instead of two for a short handler. Safe to use
    from handler threads."""

    def __init__(self, event: dict[str, Any], events: EventSink, after: float) -> None:
        self._event: dict[str, Any] | None = event
        self._events = events
        self._lock = threading.Lock()
        #: Seconds after the attempt's start at which the event is sent.
        self.after = after
        if after <= 0:
            self.send()

    def send(self) -> None:
        """Sends the ``started`` event unless it was sent or folded already."""
        event = self._take()
        if event is not None:
            self._events.send(event)

    def fold(self) -> tuple[str, str | None] | None:
        """When the attempt started and the fire time it belongs to, if the ``started`` event
        was not sent; after this it never is."""
        event = self._take()
        if event is None:
            return None
        due = event.get("scheduledAt")
        return str(event["at"]), str(due) if due is not None else None

    def _take(self) -> dict[str, Any] | None:
        with self._lock:
            event, self._event = self._event, None
            return event


class EventSink:
    """The worker's event publisher. `send` may be called from any thread."""

    def __init__(self, nc: Client, js: JetStreamContext) -> None:
        self._nc = nc
        self._js = js
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[None] | None] | None]
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="krest-events")

    def send(self, event: dict[str, Any]) -> None:
        """Queues an event; failures are logged, not reported."""
        if threading.get_ident() == self._loop_thread:
            self._queue.put_nowait((event, None))
        else:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, (event, None))
            except RuntimeError:
                pass  # the worker has stopped (a thread abandoned past its grace logs on)

    async def send_confirmed(self, event: dict[str, Any]) -> None:
        """Queues an event and waits until the events stream has stored it (everything queued
        before it was sent before it). Raises `PublishError` when it could not be stored."""
        done: asyncio.Future[None] = self._loop.create_future()
        self._queue.put_nowait((event, done))
        await done

    async def close(self) -> None:
        """Publishes what is queued, then stops."""
        self._queue.put_nowait(None)
        await self._task

    async def _run(self) -> None:
        # Each event is written at once, in order; its acknowledgement is awaited in the
        # background (pipelined, as the Rust SDK does), so one slow round trip does not hold
        # up the events behind it.
        acks: set[asyncio.Task[None]] = set()
        while True:
            item = await self._queue.get()
            if item is None:
                break
            event, done = item
            message = _message(event)
            first: asyncio.Future[Any] | None = None
            publish_async = getattr(self._js, "publish_async", None)  # nats-py 2.7+
            if publish_async is not None:
                try:
                    first = await publish_async(message[0], message[1], headers=message[2])
                except Exception:  # noqa: BLE001 - tried again, and reported, below
                    first = None
            task = asyncio.create_task(self._confirm(event, message, first, done))
            acks.add(task)
            task.add_done_callback(acks.discard)
        if acks:
            await asyncio.wait(set(acks))

    async def _confirm(
        self,
        event: dict[str, Any],
        message: tuple[str, bytes, dict[str, str]],
        first: asyncio.Future[Any] | None,
        done: asyncio.Future[None] | None,
    ) -> None:
        try:
            await self._publish(message, first)
        except PublishError as e:
            log.error("giving up publishing run event %s: %s", event_msg_id(event), e)
            if done is not None and not done.done():
                done.set_exception(e)
            return
        if done is not None and not done.done():
            done.set_result(None)

    async def _publish(
        self, message: tuple[str, bytes, dict[str, str]], first: asyncio.Future[Any] | None
    ) -> None:
        """Waits for the acknowledgement of the `first` publish (if it was sent), then tries
        again with the same message id while it fails."""
        subject, payload, headers = message
        msg_id = headers["Nats-Msg-Id"]
        attempt = 1
        if first is not None:
            try:
                await asyncio.wait_for(first, PUBLISH_TIMEOUT)
                return
            except Exception as e:  # noqa: BLE001 - every failure is retried the same way
                log.warning(
                    "publishing run event %s failed (try 1); retrying: %s: %s",
                    msg_id,
                    type(e).__name__,
                    e,
                )
            await asyncio.sleep(RECONNECT.delay(attempt))
            attempt += 1
        while True:
            try:
                await store(self._js, subject, payload, headers)
                return
            except PublishError as e:
                if attempt >= PUBLISH_ATTEMPTS or isinstance(e.__cause__, MaxPayloadError):
                    raise
                log.warning(
                    "publishing run event %s failed (try %d); retrying: %s", msg_id, attempt, e
                )
                await asyncio.sleep(RECONNECT.delay(attempt))
                attempt += 1


def _message(event: dict[str, Any]) -> tuple[str, bytes, dict[str, str]]:
    """An event's subject, payload and headers."""
    headers = {
        "Nats-Msg-Id": event_msg_id(event),
        "traceparent": attempt_traceparent(event["runId"], event["shard"], event["attempt"]),
    }
    return event_subject(event), json.dumps(event, separators=(",", ":")).encode(), headers
