"""What happens after an attempt, as one pure function (the Rust SDK's `decide.rs`):
`decide` takes how the attempt ended and what is known about the run and returns the
outcome, ``willRetry``, ``retryInMs``, the texts as stored, whether the retry is handed to the
leader's router, and the one reply to the run message. `attempt_number` and `handed_off` are
the rest of the decision: which attempt a delivery is, and the message a retry is handed to the
router as. Every SDK must agree with the shared test vectors in
``schemas/testdata/decide-vectors.json`` (tests/test_vectors.py here)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ._backoff import Backoff
from ._text import stored


class Kind(enum.Enum):
    """How an attempt ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the handler raised, or no handler
    FATAL = "fatal"  # JobError.fatal
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # the worker's shutdown deadline passed


@dataclass(frozen=True)
class Ending:
    kind: Kind
    #: The output (SUCCEEDED), the error (FAILED, FATAL) or the reason (CANCELLED).
    text: str | None = None


class Route(enum.Enum):
    QUEUE = "queue"  # the app's shared queue: retried by redelivery
    ADDRESSED = "addressed"  # addressed by a strategy: retried through the router
    BROADCAST = "broadcast"  # a BROADCAST shard: retried here

    @staticmethod
    def of(run: dict[str, Any]) -> Route:
        if run.get("target") is None:
            return Route.QUEUE
        if run.get("jobType") == "BROADCAST":
            return Route.BROADCAST
        return Route.ADDRESSED


@dataclass(frozen=True)
class Facts:
    attempt: int
    retry_times: int
    job_backoff: Backoff | None
    default_backoff: Backoff
    route: Route
    timeout_secs: int | None
    instance: str

    @staticmethod
    def of(run: dict[str, Any], attempt: int, default_backoff: Backoff, instance: str) -> Facts:
        timeout = run.get("timeoutSecs")
        return Facts(
            attempt=attempt,
            retry_times=int(run.get("retryTimes") or 0),
            job_backoff=Backoff.from_run(run.get("retryBackoff")),
            default_backoff=default_backoff,
            route=Route.of(run),
            timeout_secs=int(timeout) if isinstance(timeout, int) else None,
            instance=instance,
        )


class Reply(enum.Enum):
    ACK = "+ACK"
    NAK = "-NAK"  # with the decision's delay (none: at once)
    TERM = "+TERM"


@dataclass(frozen=True)
class Decision:
    outcome: str  # SUCCEEDED, FAILED, TIMED_OUT, CANCELLED
    will_retry: bool
    retry_in_ms: int | None
    output: str | None
    error: str | None
    #: Delay in nanoseconds of the nak (and of the hand-off), when retried.
    delay_ns: int | None
    #: Hand the retry to the router (due after `delay_ns`), then +TERM; `reply` if that fails.
    hand_off: bool
    reply: Reply

    def payload(self) -> bytes:
        """The acknowledgement's bytes."""
        if self.reply is Reply.NAK and self.delay_ns:
            return b'-NAK {"delay": %d}' % self.delay_ns
        return self.reply.value.encode()


def decide(ending: Ending, f: Facts) -> Decision:
    backoff = f.job_backoff or f.default_backoff
    retries_left = f.attempt < f.retry_times + 1
    later = round(backoff.delay(f.attempt) * 1e9)
    retry: int | None
    output: str | None = None
    error: str | None = None
    if ending.kind is Kind.SUCCEEDED:
        outcome, retry, output = "SUCCEEDED", None, ending.text
    elif ending.kind in (Kind.FAILED, Kind.FATAL):
        outcome = "FAILED"
        retry = later if ending.kind is Kind.FAILED and retries_left else None
        error = ending.text or ""
    elif ending.kind is Kind.TIMED_OUT:
        outcome, retry = "TIMED_OUT", later if retries_left else None
        error = (
            f"timed out after {f.timeout_secs or 0} s (timeoutSecs); the handler was cancelled"
        )
    elif ending.kind is Kind.CANCELLED:
        outcome, retry = "CANCELLED", None
        error = f"cancelled: {ending.text or 'cancelled'}"
    else:  # interrupted: not the handler's fault, handed back whatever the attempt number
        outcome, retry = "FAILED", 0
        error = (
            f"worker {f.instance} shut down before the handler finished; "
            "handed back for another attempt"
        )
    if outcome == "SUCCEEDED":
        reply, hand_off = Reply.ACK, False
    elif retry is None:
        reply, hand_off = Reply.TERM, False
    else:
        reply, hand_off = Reply.NAK, f.route is Route.ADDRESSED
    return Decision(
        outcome=outcome,
        will_retry=retry is not None,
        retry_in_ms=None if retry is None else retry // 1_000_000,
        output=None if output is None else stored(output),
        error=None if error is None else stored(error),
        delay_ns=retry,
        hand_off=hand_off,
        reply=reply,
    )


def attempt_number(run: dict[str, Any], delivered: int) -> int:
    """The attempt a delivery of `run` is: earlier attempts (retries and re-routes are new
    messages) are carried in ``attemptOffset``, this message's own in the delivery count."""
    return int(run.get("attemptOffset") or 0) + max(delivered, 1)


@dataclass(frozen=True)
class HandOff:
    """A retry handed to the leader's router: the message and where it is published."""

    #: ``krest.work.<app>.<group>.<name>.r``
    subject: str
    #: ``Nats-Msg-Id``: one hand-off per shard and attempt.
    msg_id: str
    #: The run message received, with the attempts so far in ``attemptOffset``, no target, due
    #: at ``retryAt``, avoiding this instance; every other field (known or not) unchanged.
    message: dict[str, Any]


def handed_off(run: dict[str, Any], attempt: int, instance: str, retry_at: datetime) -> HandOff:
    """The hand-off of attempt `attempt` of `run` on `instance`, due at `retry_at`."""
    nxt = dict(run)
    nxt["attemptOffset"] = attempt
    nxt.pop("target", None)
    at = retry_at.astimezone(timezone.utc)
    nxt["retryAt"] = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    nxt["avoid"] = [instance]
    shard = run.get("shard")
    index = int(shard["index"]) if isinstance(shard, dict) else 0
    return HandOff(
        subject=f"krest.work.{run.get('appName', '')}.{run['jobGroup']}.{run['jobName']}.r",
        msg_id=f"{run['runId']}/{index}/retry-{attempt}",
        message=nxt,
    )
