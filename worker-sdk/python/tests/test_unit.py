"""The SDK's pure parts, against the Rust SDK's expectations (decide.rs, backoff.rs, redact.rs,
text.rs)."""

from __future__ import annotations

import time

import pytest

from krest_worker._backoff import RECONNECT, Backoff
from krest_worker._decide import Ending, Facts, Kind, Reply, Route, decide
from krest_worker._nats import ConfigError, NatsConfig
from krest_worker._text import MAX_OUTPUT, redact, truncate
from krest_worker._worker import MAX_HOLD, ack_info, hold_seconds, parse_time, read_run

S = 1_000_000_000


def facts(attempt: int, retry_times: int, route: Route, job: Backoff | None = None, default: Backoff = Backoff()) -> Facts:
    return Facts(attempt, retry_times, job, default, route, 7, "w1")


Q, A, B = Route.QUEUE, Route.ADDRESSED, Route.BROADCAST
ok = Ending(Kind.SUCCEEDED, "fine")
fail = Ending(Kind.FAILED, "x")
fatal = Ending(Kind.FATAL, "bad args")
timeout = Ending(Kind.TIMED_OUT)
cancelled = Ending(Kind.CANCELLED, "replaced")
interrupted = Ending(Kind.INTERRUPTED)

# The decision table itself is pinned by the shared vectors (test_vectors.py).


def test_replies_and_texts() -> None:
    f = facts(1, 3, Q)
    assert decide(fail, f).payload() == b'-NAK {"delay": 1000000000}'
    assert decide(interrupted, f).payload() == b"-NAK"
    assert decide(ok, f).payload() == b"+ACK"
    assert decide(fatal, f).payload() == b"+TERM"
    assert decide(timeout, f).error == "timed out after 7 s (timeoutSecs); the handler was cancelled"
    assert decide(cancelled, f).error == "cancelled: replaced"
    assert decide(interrupted, f).error == (
        "worker w1 shut down before the handler finished; handed back for another attempt"
    )
    d = decide(Ending(Kind.FAILED, "GET https://user:secret@example.com/x failed"), f)
    assert d.error == "GET https://<redacted>@example.com/x failed"
    long = "x" * (MAX_OUTPUT - 20) + " https://user:secret@example.com/"
    out = decide(Ending(Kind.SUCCEEDED, long), f).output
    assert out is not None and len(out.encode()) <= MAX_OUTPUT and out.endswith("...")
    assert "secret" not in out and "user:" not in out


def test_routes() -> None:
    assert Route.of({}) is Q
    assert Route.of({"target": "w1", "jobType": "NORMAL"}) is A
    assert Route.of({"target": "w1", "jobType": "BROADCAST"}) is B
    assert Route.of({"jobType": "BROADCAST"}) is Q


def test_backoff_like_rust() -> None:
    ms = lambda b, n: int(round(b.delay(n) * 1000))  # noqa: E731
    assert [ms(Backoff(), n) for n in [0, 1, 2, 3, 7, 2**32 - 1]] == [1000, 1000, 2000, 4000, 60000, 60000]
    assert [ms(RECONNECT, n) for n in [0, 1, 2, 3, 7]] == [250, 250, 500, 1000, 5000]
    assert Backoff(3, 0.5, 10).delay(5) == 3
    assert Backoff.from_run({"initialMs": 500, "factor": 3.0, "maxMs": 4000}) == Backoff(0.5, 3.0, 4.0)


def test_redaction_and_truncation_like_rust() -> None:
    assert redact("request to https://u:pw@h/x failed (https://u:pw@h/x)") == (
        "request to https://<redacted>@h/x failed (https://<redacted>@h/x)"
    )
    assert redact("nats://a@h1,nats://b@h2") == "nats://<redacted>@h1,nats://<redacted>@h2"
    assert redact("https://h/p@x") == "https://h/p@x"
    assert truncate("abc", 10) == "abc"
    assert truncate("abcdefghij", 6) == "abc..."
    s = truncate("ééééé", 6)
    assert s.endswith("...") and len(s.encode()) <= 6


def test_run_messages_are_read_strictly() -> None:
    good = (
        b'{"runId":"g.j.1","jobGroup":"g","jobName":"j","appName":"a","path":"p","jobType":"NORMAL",'
        b'"args":null,"scheduledAt":"2026-11-29T08:43:40Z","dispatchedAt":"2026-11-29T08:43:40.001Z",'
        b'"trigger":"SCHEDULE","retryTimes":3,"revision":1,"someFutureField":true}'
    )
    assert read_run(good)["runId"] == "g.j.1"
    for bad, why in [
        (b"nope", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"not":"a run"}', "missing field `runId`"),
        (good.replace(b'"retryTimes":3', b'"retryTimes":"3"'), "field `retryTimes` is not a int"),
        (good.replace(b'"revision":1', b'"revision":1,"notBefore":5'), "field `notBefore` is not a time"),
        (good.replace(b'"revision":1', b'"revision":1,"notBefore":"soon"'), "not an RFC 3339 time"),
    ]:
        with pytest.raises(ValueError, match=why):
            read_run(bad)


def test_a_run_is_held_until_its_not_before_and_at_most_max_hold() -> None:
    now = parse_time("2026-11-29T08:43:39.250Z")
    run = {"notBefore": "2026-11-29T08:43:40Z"}
    assert hold_seconds(run, now) == 0.75
    # Any number of fractional digits, as chrono writes them; offsets too.
    assert parse_time("2026-11-29T08:43:40.123456789Z") == parse_time("2026-11-29T08:43:40.123456Z")
    assert parse_time("2026-11-29T09:43:40+01:00") == parse_time("2026-11-29T08:43:40Z")
    assert hold_seconds({"notBefore": "2026-11-29T08:43:39Z"}, now) == 0.0, "passed: no hold"
    assert hold_seconds({}, now) == 0.0
    assert hold_seconds({"notBefore": "2126-01-01T00:00:00Z"}, now) == MAX_HOLD, "bounded"


def test_ack_subjects() -> None:
    assert ack_info("$JS.ACK.KREST_WORK.krest-app-a.3.17.9.1700000000000000000.0") == (3, 17)
    assert ack_info("$JS.ACK.dom.acchash.KREST_WORK.krest-app-a.2.18.9.1700000000000000000.0.tok") == (2, 18)
    assert ack_info("_INBOX.x") == (1, 0)


def test_nats_settings_like_rust() -> None:
    o = NatsConfig(url="nats://u:p%40ss@h1:4222,nats://h2").connect_options("n")
    assert (o["servers"], o["user"], o["password"]) == (["nats://h1:4222", "nats://h2"], "u", "p@ss")
    o = NatsConfig(url="nats://tok@h").connect_options("n")
    assert (o["servers"], o["token"]) == (["nats://h"], "tok")
    o = NatsConfig(url="nats://u:p@h", user="x", password="y").connect_options("n")
    assert (o["user"], o["password"]) == ("x", "y"), "explicit settings win over the URL"
    with pytest.raises(ConfigError, match="conflicting NATS credentials: user/password, token"):
        NatsConfig(user="u", token="t").connect_options("n")
    with pytest.raises(ConfigError, match="password is set without a user"):
        NatsConfig(password="p").connect_options("n")
    with pytest.raises(ConfigError, match="cannot read the NATS credentials file"):
        NatsConfig(creds="/nonexistent.creds").connect_options("n")
    assert "p@ss" not in repr(NatsConfig(url="nats://h", user="u", password="p@ss"))
    assert NatsConfig(url="nats://u:pw@h").shown_url() == "nats://<redacted>@h"


class _Sink:
    def __init__(self) -> None:
        self.events: list[dict[str, object]] = []

    def send(self, event: dict[str, object]) -> None:
        self.events.append(event)


def _ctx(sink: _Sink) -> object:
    from krest_worker import JobContext

    run = {"runId": "g.j.1", "jobGroup": "g", "jobName": "j", "appName": "a", "path": "p",
           "retryTimes": 2, "deliveryToken": "tok", "shard": {"index": 1, "total": 3, "item": "b"}}
    return JobContext(run, 2, "w1", sink)  # type: ignore[arg-type]


def test_log_lines_are_bounded_per_attempt() -> None:
    from krest_worker import JobContext

    sink = _Sink()
    ctx = _ctx(sink)
    assert isinstance(ctx, JobContext)
    assert (ctx.shard_index, ctx.shard_total, ctx.shard_item, ctx.max_attempts) == (1, 3, "b", 3)
    ctx.log("see https://u:pw@h/x")
    ctx.log("x" * 5000)
    first, long = sink.events
    assert first["line"] == "see https://<redacted>@h/x" and first["seq"] == 1
    assert (first["shard"], first["attempt"], first["deliveryToken"], first["level"]) == (1, 2, "tok", "INFO")
    assert len(str(long["line"]).encode()) == 4096 and str(long["line"]).endswith("...")
    for _ in range(10_100):
        ctx.warn("y")
    assert len(sink.events) == 10_001
    cut = sink.events[-1]
    assert cut["seq"] == 10_001 and cut["level"] == "WARN"
    assert str(cut["line"]).startswith("log cut: an attempt keeps at most 10000 lines and 1024 KiB")


def test_log_bytes_are_bounded_per_attempt() -> None:
    sink = _Sink()
    ctx = _ctx(sink)
    for _ in range(300):
        ctx.log("z" * 4000)  # type: ignore[attr-defined]
    assert sink.events[-1]["line"].startswith("log cut:")  # type: ignore[union-attr]
    assert sum(len(str(e["line"])) for e in sink.events[:-1]) <= 1024 * 1024
    assert len(sink.events) == 263


def test_a_source_holds_its_floor_then_what_it_started_in_the_last_second_or_two() -> None:
    from krest_worker._pull import MAX_HELD, MAX_HELD_BYTES, HoldBudget

    def hold_all(b: HoldBudget, nbytes: int, now: float) -> int:
        n = 0
        while b.try_hold(nbytes, now):
            n += 1
        for _ in range(n):
            b.release(nbytes)
        return n

    b = HoldBudget(8)
    t0 = time.monotonic()
    assert hold_all(b, 100, t0) == 8, "the floor, before any start"
    for _ in range(1000):
        b.started(t0)
    assert hold_all(b, 100, t0 + 0.1) == 1000, "the next second's burst is held whole"
    assert hold_all(b, 100, t0 + 1.5) == 1000, "the window before still counts"
    assert hold_all(b, 100, t0 + 4.0) == 8, "back to the floor"

    for _ in range(MAX_HELD * 2):
        b.started(t0 + 4.0)
    assert hold_all(b, 1, t0 + 4.0) == MAX_HELD
    assert hold_all(b, MAX_HELD_BYTES // 3, t0 + 4.0) == 3
    assert hold_all(b, MAX_HELD_BYTES * 2, t0 + 4.0) == 1, "one run is held whatever its size"


def test_reports_wait_for_the_runs_due_to_start_and_no_longer() -> None:
    import asyncio

    from krest_worker._due import MAX_REPORT_WAIT, DueRuns

    async def scenario() -> None:
        due = DueRuns()
        now = time.monotonic() - 0.01
        await due.quiet()  # nothing due: no wait
        later = due.hold(now + 60)
        await due.quiet()  # held for later: not due yet

        a, b = due.hold(now), due.hold(now)
        waiting = asyncio.create_task(due.quiet())
        await asyncio.sleep(0)
        assert not waiting.done()
        due.resumed(a)
        await asyncio.sleep(0)
        assert not waiting.done(), "one run due is still unstarted"
        due.resumed(b)
        await asyncio.wait_for(waiting, 5)
        due.resumed(later)

        due.hold(now)  # a run due that never starts
        started = time.monotonic()
        await due.quiet()
        assert time.monotonic() - started >= MAX_REPORT_WAIT * 0.9

    asyncio.run(scenario())
