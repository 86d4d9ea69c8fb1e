"""Publishing run events (started, log, finished) to the events stream: in order, each
confirmed by JetStream, retried with the same ``Nats-Msg-Id`` so a retry never creates a
duplicate."""

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
        """Queues an event and waits until the events stream has stored it (after everything
        queued before it). Raises `PublishError` when it could not be stored."""
        done: asyncio.Future[None] = self._loop.create_future()
        self._queue.put_nowait((event, done))
        await done

    async def close(self) -> None:
        """Publishes what is queued, then stops."""
        self._queue.put_nowait(None)
        await self._task

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            event, done = item
            try:
                await self._publish(event)
            except PublishError as e:
                log.error("giving up publishing run event %s: %s", event_msg_id(event), e)
                if done is not None and not done.done():
                    done.set_exception(e)
                continue
            if done is not None and not done.done():
                done.set_result(None)

    async def _publish(self, event: dict[str, Any]) -> None:
        subject = event_subject(event)
        msg_id = event_msg_id(event)
        payload = json.dumps(event, separators=(",", ":")).encode()
        headers = {
            "Nats-Msg-Id": msg_id,
            "traceparent": attempt_traceparent(event["runId"], event["shard"], event["attempt"]),
        }
        attempt = 1
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
