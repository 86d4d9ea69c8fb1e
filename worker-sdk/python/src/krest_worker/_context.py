"""What a handler receives (`JobContext`) and raises (`JobError`)."""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from . import _text
from ._trace import attempt_traceparent, trace_id

if TYPE_CHECKING:
    from ._events import EventSink, StartReport


class JobError(Exception):
    """Why a handler failed, and whether retrying can help.

    Raise ``JobError("...")`` (or any other exception) for a failure that is retried while the
    job's ``retryTimes`` allow; raise ``JobError.fatal("...")`` for one no retry can fix (bad
    arguments): the run fails at once.
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable

    @classmethod
    def fatal(cls, message: str) -> JobError:
        """A failure no retry can fix: the run is marked FAILED without further attempts."""
        return cls(message, retryable=False)

    def __str__(self) -> str:
        return self.message


def now_rfc3339() -> str:
    """The current time as Krest writes it: UTC, milliseconds, ``Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobContext:
    """Everything a handler knows about the run it executes.

    Safe to use from the handler's thread (plain ``def`` handlers) and from the event loop
    (``async def`` handlers).
    """

    def __init__(
        self,
        run: dict[str, Any],
        attempt: int,
        worker: str,
        events: EventSink,
        start: StartReport | None = None,
    ) -> None:
        self._run = run
        self._attempt = attempt
        self._worker = worker
        self._events = events
        #: The attempt's ``started`` event, sent before the first log line at the latest.
        self._start = start
        # Set on the event loop, read from any thread (a plain flag: the GIL orders it; a
        # `threading.Event` per run cost ~5 % of a busy worker's CPU).
        self._stop_requested = False
        self._cancel_async: asyncio.Event | None = None
        self._lock = threading.Lock()
        self._log_seq = 0
        self._log_bytes = 0

    # -- the run ---------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """The run id: stable across attempts and shards, so use it as an idempotency key."""
        return str(self._run["runId"])

    @property
    def job_group(self) -> str:
        return str(self._run["jobGroup"])

    @property
    def job_name(self) -> str:
        return str(self._run["jobName"])

    @property
    def path(self) -> str:
        """The handler name the run was addressed to."""
        return str(self._run["path"])

    @property
    def args(self) -> Any:
        """The job's arguments, any JSON value (``None`` when the job has none). For SHARDING
        jobs the whole array; see `shard_item`."""
        return self._run.get("args")

    @property
    def shard_index(self) -> int:
        """0-based shard index (0 for unsharded runs)."""
        shard = self._run.get("shard")
        return int(shard["index"]) if isinstance(shard, dict) else 0

    @property
    def shard_total(self) -> int:
        """Number of shards (1 for unsharded runs)."""
        shard = self._run.get("shard")
        return int(shard["total"]) if isinstance(shard, dict) else 1

    @property
    def shard_item(self) -> Any:
        """This shard's element of `args` for SHARDING runs, else ``None``."""
        shard = self._run.get("shard")
        return shard.get("item") if isinstance(shard, dict) else None

    @property
    def attempt(self) -> int:
        """1-based attempt number (earlier attempts on any instance count). It can exceed
        `max_attempts`: a run held by a worker that died, or handed back by one shutting down,
        is delivered again whatever its count."""
        return self._attempt

    @property
    def max_attempts(self) -> int:
        """Attempts allowed in all (``retryTimes + 1``)."""
        return int(self._run.get("retryTimes") or 0) + 1

    @property
    def scheduled_at(self) -> str:
        """The fire time the run belongs to (RFC 3339)."""
        return str(self._run.get("scheduledAt", ""))

    @property
    def trigger(self) -> str:
        """Why the run exists: ``SCHEDULE``, ``MANUAL``, ``CHILD``, ..."""
        return str(self._run.get("trigger", ""))

    @property
    def worker(self) -> str:
        """This worker instance's id."""
        return self._worker

    @property
    def run(self) -> dict[str, Any]:
        """The whole run message (treat ``http`` values as secrets)."""
        return self._run

    @property
    def traceparent(self) -> str:
        """The W3C ``traceparent`` of this attempt; pass it on to what the handler calls."""
        return attempt_traceparent(self.run_id, self.shard_index, self._attempt)

    @property
    def trace_id(self) -> str:
        """The run's trace id (32 hex digits), the same on every node and worker."""
        return trace_id(self.run_id)

    # -- stopping ----------------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """Whether the handler has been asked to stop: the run was cancelled, the job's
        ``timeoutSecs`` passed, or the worker's shutdown deadline passed. Check it in long
        loops and return (or raise) soon after it turns true: an ``async`` handler that does
        not return within the worker's ``cancel_grace`` is cancelled; a thread is abandoned."""
        return self._stop_requested

    async def wait_cancelled(self) -> None:
        """Completes when the handler is asked to stop (see `cancelled`)."""
        if self._cancel_async is None:
            self._cancel_async = asyncio.Event()
            if self._stop_requested:
                self._cancel_async.set()
        await self._cancel_async.wait()

    def _request_stop(self) -> None:
        """Asks the handler to stop; called on the event loop."""
        self._stop_requested = True
        if self._cancel_async is not None:
            self._cancel_async.set()

    # -- logging -----------------------------------------------------------------------------

    def log(self, line: str) -> None:
        """Logs an INFO line into the run's history."""
        self.log_at("INFO", line)

    def warn(self, line: str) -> None:
        """Logs a WARN line into the run's history."""
        self.log_at("WARN", line)

    def error(self, line: str) -> None:
        """Logs an ERROR line into the run's history."""
        self.log_at("ERROR", line)

    def log_at(self, level: str, line: str) -> None:
        """Logs `line` at `level` (``DEBUG``, ``INFO``, ``WARN``, ``ERROR``) into the run's
        history. Lines are sent in order without waiting and are stored before the attempt's
        result; URL credentials are redacted. An attempt keeps at most 10,000 lines and 1 MiB
        (each line at most 4 KiB): the first line past a bound becomes a WARN ``log cut:``
        marker and later lines are dropped."""
        line = _text.truncate(_text.redact(str(line)), _text.MAX_LOG_LINE)
        limit = _text.MAX_LOG_LINES_PER_ATTEMPT
        with self._lock:
            if self._log_seq > limit:
                return
            self._log_seq += 1
            self._log_bytes += len(line.encode("utf-8", "replace"))
            seq = self._log_seq
            if seq == limit + 1 or self._log_bytes > _text.MAX_LOG_BYTES_PER_ATTEMPT:
                # The marker takes this line's place; nothing is logged after it.
                self._log_seq = limit + 1
                level = "WARN"
                line = (
                    f"log cut: an attempt keeps at most {limit} lines and "
                    f"{_text.MAX_LOG_BYTES_PER_ATTEMPT // 1024} KiB; later lines were dropped"
                )
            event: dict[str, Any] = {
                "type": "log",
                "runId": self.run_id,
                "jobGroup": self.job_group,
                "jobName": self.job_name,
                "appName": str(self._run.get("appName", "")),
                "shard": self.shard_index,
                "attempt": self._attempt,
                "seq": seq,
                "at": now_rfc3339(),
                "level": level.upper(),
                "line": line,
            }
            token = self._run.get("deliveryToken")
            if token:
                event["deliveryToken"] = token
            # Sent under the lock, so lines are queued in the order of their seq, after the
            # attempt's `started` event.
            if self._start is not None:
                self._start.send()
            self._events.send(event)
