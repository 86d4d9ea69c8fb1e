"""The Python SDK end to end: a real nats-server, a real `krest scheduler`, the `krest` CLI,
and the scenario worker as a process. Assertions are on the recorded history
(`krest -o json runs get`)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import nats

from conftest import Krest, Workers, eventually
from krest_worker import trace_id
from krest_worker._worker import parse_time


def attempts(detail: dict[str, Any]) -> list[tuple[int, int, str, bool]]:
    """(shard, attempt, status, willRetry) of every attempt, in order."""
    return sorted(
        (a["shard"], a["attempt"], a["status"], bool(a.get("willRetry")))
        for a in detail["attempts"]
    )


def test_normal_run_records_output_logs_and_trace(krest: Krest, workers: Workers) -> None:
    workers.start("w1")
    job = workers.job("echo", "py/echo", args={"say": "hello"})
    run_id = krest.trigger(job)
    d = krest.wait_run(run_id)
    assert d["run"]["status"] == "SUCCEEDED", d
    assert d["run"]["output"] == "echo hello"
    assert d["run"]["traceId"] == trace_id(run_id), "the trace id is the same as Krest's"
    [a] = d["attempts"]
    assert (a["attempt"], a["worker"], a["output"]) == (1, "w1", "echo hello")
    assert [line["line"] for line in a["logs"]] == [f"run {run_id} attempt 1"]
    info = [w for w in krest.cli("workers", "list") if w["appName"] == workers.app]
    assert info[0]["sdk"] == "python" and info[0]["handlers"] == sorted(info[0]["handlers"])


def test_runs_dispatched_ahead_start_at_their_time_and_never_before(krest: Krest, workers: Workers) -> None:
    # The node dispatches ALLOW jobs' fires a second ahead (the default): the SDK holds them.
    workers.start("w1")
    job = workers.job("on-time", "py/on-time", every="1s")

    def finished() -> list[dict[str, Any]] | None:
        runs = krest.cli("runs", "list", "--job", job, "--limit", "0")
        done = [r for r in runs if r["status"] in ("SUCCEEDED", "FAILED")]
        return done if len(done) >= 4 else None

    done = eventually("4 runs of the job ended", finished)
    krest.cli("job", "pause", job)
    for r in done:
        assert r["status"] == "SUCCEEDED", r
        [a] = krest.run(r["runId"])["attempts"]
        out = json.loads(a["output"])
        assert parse_time(out["scheduledAt"]) == parse_time(r["scheduledAt"]), (out, r)
        started, due = parse_time(out["startedAt"]), parse_time(r["scheduledAt"])
        assert started >= due, f"{r['runId']} started at {started}, before its time {due}"
    # On the bus before their time (a dispatch later than the 1 s lead each time would mean
    # nothing was sent ahead).
    assert any(parse_time(r["dispatchedAt"]) < parse_time(r["scheduledAt"]) for r in done), done


def test_sharded_run_in_threads(krest: Krest, workers: Workers) -> None:
    workers.start("w1")
    job = workers.job("shard", "py/shard", jobType="SHARDING", args=["a", "b", "c"])
    d = krest.wait_run(krest.trigger(job))
    assert d["run"]["status"] == "SUCCEEDED", d
    assert d["run"]["shardTotal"] == 3
    outputs = sorted(json.loads(a["output"])["item"] for a in d["attempts"])
    assert outputs == ["a", "b", "c"]
    for a in d["attempts"]:
        out = json.loads(a["output"])
        assert (out["shard"], out["of"]) == (a["shard"], 3)
        assert a["logs"][0]["line"].startswith(f"shard {a['shard']} of 3 processing ")


def test_retried_then_succeeded(krest: Krest, workers: Workers) -> None:
    workers.start("w1")
    job = workers.job(
        "flaky",
        "py/flaky",
        args={"failures": 2},
        retryTimes=3,
        retryBackoff={"initial": "100ms", "factor": 2, "max": "1s"},
    )
    d = krest.wait_run(krest.trigger(job))
    assert d["run"]["status"] == "SUCCEEDED", d
    assert attempts(d) == [(0, 1, "FAILED", True), (0, 2, "FAILED", True), (0, 3, "SUCCEEDED", False)]
    a1, a2, _ = sorted(d["attempts"], key=lambda a: a["attempt"])
    # The job's backoff: 100 ms after attempt 1, 200 ms after attempt 2.
    assert (a1.get("retryInMs"), a2.get("retryInMs")) == (100, 200), d["attempts"]
    assert a1["error"] == "upstream unavailable (attempt 1)"
    assert a1["logs"][0]["level"] == "WARN"
    assert d["run"]["output"] == "succeeded at attempt 3"


def test_always_failing_ends_failed(krest: Krest, workers: Workers) -> None:
    workers.start("w1")
    job = workers.job(
        "broken",
        "py/flaky",
        args={"failures": 1000},
        retryTimes=2,
        retryBackoff={"initial": "100ms", "factor": 1, "max": "100ms"},
    )
    d = krest.wait_run(krest.trigger(job))
    assert d["run"]["status"] == "FAILED", d
    assert attempts(d) == [(0, 1, "FAILED", True), (0, 2, "FAILED", True), (0, 3, "FAILED", False)]
    assert d["run"]["error"] == "upstream unavailable (attempt 3)"


def test_fatal_error_is_not_retried(krest: Krest, workers: Workers) -> None:
    workers.start("w1")
    job = workers.job("fatal", "py/fatal", args=[1], retryTimes=3)
    d = krest.wait_run(krest.trigger(job))
    assert d["run"]["status"] == "FAILED", d
    assert attempts(d) == [(0, 1, "FAILED", False)]
    assert d["run"]["error"] == "bad args: [1]"


def test_raising_handler_fails_with_the_exception(krest: Krest, workers: Workers) -> None:
    workers.start("w1")
    job = workers.job("raise", "py/raise", retryTimes=1, retryBackoff={"initial": "100ms", "factor": 1, "max": "100ms"})
    d = krest.wait_run(krest.trigger(job))
    assert d["run"]["status"] == "FAILED", d
    assert attempts(d) == [(0, 1, "FAILED", True), (0, 2, "FAILED", False)]
    assert d["run"]["error"] == "ValueError: boom"


def test_missing_handler_names_it(krest: Krest, workers: Workers) -> None:
    workers.start("w1")
    job = workers.job("nohandler", "py/none")
    d = krest.wait_run(krest.trigger(job))
    assert d["run"]["status"] == "FAILED", d
    assert d["run"]["error"].startswith(f"no handler `py/none` on worker {workers.app}/w1 (it has: py/echo, ")


def test_cancelled_while_running(krest: Krest, workers: Workers) -> None:
    workers.start("w1")
    job = workers.job("wait", "py/wait", retryTimes=3)
    run_id = krest.trigger(job)
    eventually(
        "the handler running",
        lambda: any(a.get("logs") for a in krest.run(run_id)["attempts"]),
    )
    krest.cli("runs", "cancel", run_id)
    d = krest.wait_run(run_id)
    assert d["run"]["status"] == "CANCELLED", d
    [a] = d["attempts"]
    assert (a["status"], bool(a.get("willRetry"))) == ("CANCELLED", False)
    assert a["error"].startswith("cancelled: ")
    assert [line["line"] for line in a["logs"]] == ["waiting", "asked to stop"]


def test_cancelled_before_it_runs(krest: Krest, workers: Workers) -> None:
    # No worker yet: the run waits; cancelled, it leaves a marker the worker finds.
    job = workers.job("waitlater", "py/wait")
    run_id = krest.trigger(job)
    eventually("the run recorded", lambda: krest.run(run_id)["run"]["status"] == "PENDING")
    krest.cli("runs", "cancel", run_id)
    workers.start("w1")
    d = krest.wait_run(run_id)
    assert d["run"]["status"] == "CANCELLED", d
    assert workers.journal_lines() == [], "not executed"


def test_timed_out_async_and_thread(krest: Krest, workers: Workers) -> None:
    workers.start("w1")
    for name, path in [("slow", "py/wait"), ("slowthread", "py/wait-thread")]:
        job = workers.job(name, path, timeoutSecs=1, retryTimes=1, retryBackoff={"initial": "100ms", "factor": 1, "max": "100ms"})
        d = krest.wait_run(krest.trigger(job))
        assert d["run"]["status"] == "TIMED_OUT", d
        assert attempts(d) == [(0, 1, "TIMED_OUT", True), (0, 2, "TIMED_OUT", False)], path
        assert d["run"]["error"] == "timed out after 1 s (timeoutSecs); the handler was cancelled"


def test_shutdown_hands_back_a_run_in_flight(krest: Krest, workers: Workers) -> None:
    a = workers.start("w1", KREST_SHUTDOWN_TIMEOUT="1", KREST_CANCEL_GRACE="1")
    job = workers.job("hold", "py/hold-first", retryTimes=0)
    run_id = krest.trigger(job)
    eventually("w1 holding the run", lambda: any(l.endswith(" 1 w1") for l in workers.journal_lines()))
    workers.start("w2")
    assert a.terminate() == 0, a.log()
    d = krest.wait_run(run_id)
    assert d["run"]["status"] == "SUCCEEDED", d
    first, second = sorted(d["attempts"], key=lambda x: x["attempt"])
    assert (first["worker"], first["status"], first.get("willRetry")) == ("w1", "FAILED", True)
    assert first["error"] == "worker w1 shut down before the handler finished; handed back for another attempt"
    assert second["worker"] == "w2" and second["output"] == f"finished attempt {second['attempt']} on w2"
    assert "worker w1 stopped" in a.log()
    # The heartbeat entry is removed on a clean stop (it would otherwise stay 10 s).
    eventually("w1 gone from the registry", lambda: not any(
        w["instance"] == "w1" and w["appName"] == workers.app for w in krest.cli("workers", "list")
    ), 8)


def test_shutdown_waits_for_a_short_run(krest: Krest, workers: Workers) -> None:
    a = workers.start("w1")
    job = workers.job("short", "py/wait", args={"seconds": 1})
    run_id = krest.trigger(job)
    eventually("the handler running", lambda: workers.journal_lines())
    assert a.terminate() == 0, a.log()
    d = krest.wait_run(run_id)
    assert d["run"]["status"] == "SUCCEEDED" and d["run"]["output"] == "waited 1.0 s", d


def test_retry_of_an_addressed_run_goes_through_the_router(krest: Krest, workers: Workers) -> None:
    workers.start("w1")
    workers.start("w2")
    job = workers.job(
        "rr",
        "py/flaky",
        args={"failures": 1},
        retryTimes=2,
        loadBalanceType="ROUND_ROBIN",
        retryBackoff={"initial": "100ms", "factor": 1, "max": "100ms"},
    )
    d = krest.wait_run(krest.trigger(job))
    assert d["run"]["status"] == "SUCCEEDED", d
    first, second = sorted(d["attempts"], key=lambda x: x["attempt"])
    assert (first["attempt"], second["attempt"]) == (1, 2)
    assert first["worker"] != second["worker"], "the router avoids the instance that failed"


def test_malformed_message_is_parked(krest: Krest, workers: Workers) -> None:
    workers.start("w1")
    subject = f"krest.work.{workers.app}.{workers.app}.junk.q"

    async def publish() -> None:
        nc = await nats.connect(krest.url)
        await nc.jetstream().publish(subject, b'{"not":"a run"}')
        await nc.close()

    asyncio.run(publish())

    def parked() -> Any:
        return [
            d for d in krest.cli("dlq", "list") if json.dumps(d).find(subject) >= 0
        ]

    [d] = eventually("the message parked", parked)
    assert "malformed run message: missing field `runId`" in json.dumps(d), d


def test_long_handlers_keep_their_run_with_progress_acks(krest: Krest, workers: Workers) -> None:
    # The consumer's ack wait is 2 s; the handler takes 4.5 s: without progress acks the server
    # would redeliver the run meanwhile (a second execution in the journal).
    workers.start("w1", KREST_ACK_WAIT="2")
    job = workers.job("long", "py/wait", args={"seconds": 4.5})
    d = krest.wait_run(krest.trigger(job))
    assert d["run"]["status"] == "SUCCEEDED", d
    assert len(workers.journal_lines()) == 1, workers.journal_lines()
    assert [a["attempt"] for a in d["attempts"]] == [1]


def test_weight_times_slots_bounds_runs_in_flight(krest: Krest, workers: Workers) -> None:
    workers.start("w1", KREST_WEIGHT="1", KREST_SLOTS="1")
    job = workers.job("one-at-a-time", "py/wait", jobType="SHARDING", args=[0.5, 0.5, 0.5])
    d = krest.wait_run(krest.trigger(job))
    assert d["run"]["status"] == "SUCCEEDED", d
    spans = sorted((a["startedAt"], a["finishedAt"]) for a in d["attempts"])
    assert len(spans) == 3
    for (_, finished), (started, _) in zip(spans, spans[1:]):
        assert started >= finished, f"two runs at once on a capacity of 1: {spans}"


def test_runs_held_for_their_time_run_within_the_slots(krest: Krest, workers: Workers) -> None:
    # Three shards due together, dispatched ahead: a worker of capacity 1 holds them beyond its
    # slot, and runs them one at a time from their fire time on.
    workers.start("w1", KREST_WEIGHT="1", KREST_SLOTS="1")
    # Far enough ahead that the apply (a CLI process) is done before it.
    at = datetime.now(timezone.utc) + timedelta(seconds=8)
    job = workers.job(
        "held", "py/wait", jobType="SHARDING", args=[0.3, 0.3, 0.3], at=at.isoformat().replace("+00:00", "Z")
    )

    def ended() -> dict[str, Any] | None:
        runs = krest.cli("runs", "list", "--job", job, "--limit", "0")
        return runs[0] if runs and runs[0]["status"] in ("SUCCEEDED", "FAILED") else None

    run = eventually("the run ended", ended)
    d = krest.run(run["runId"])
    assert d["run"]["status"] == "SUCCEEDED", d
    due = parse_time(d["run"]["scheduledAt"])
    spans = sorted((parse_time(a["startedAt"]), parse_time(a["finishedAt"])) for a in d["attempts"])
    assert len(spans) == 3
    assert spans[0][0] >= due, (spans, due)
    for (_, finished), (started, _) in zip(spans, spans[1:]):
        assert started >= finished, f"two runs at once on a capacity of 1: {spans}"


def test_the_example_worker_runs_its_jobs(krest: Krest, workers: Workers) -> None:
    from conftest import REPO

    example = REPO / "examples" / "python-worker"
    workers.app = "demo-python"  # the example's app
    workers.start("example", script=example / "worker.py")
    jobs = json.loads((example / "jobs.json").read_text())
    for job in jobs:
        job.pop("cron", None)  # triggered here instead
    krest.apply(*jobs)
    post = krest.wait_run(krest.trigger("python.post"))
    assert (post["run"]["status"], post["run"]["output"]) == ("SUCCEEDED", "post ok: {'customer': 42}"), post
    shards = krest.wait_run(krest.trigger("python.sharding"))
    assert shards["run"]["status"] == "SUCCEEDED" and shards["run"]["shardTotal"] == 3, shards
    flaky = krest.wait_run(krest.trigger("python.flaky"))
    assert flaky["run"]["status"] == "SUCCEEDED" and flaky["run"]["attempts"] == 3, flaky


def test_a_thread_ignoring_cancellation_does_not_keep_the_worker_from_stopping(krest: Krest, workers: Workers) -> None:
    a = workers.start("w1", KREST_SHUTDOWN_TIMEOUT="0.5", KREST_CANCEL_GRACE="0.5")
    run_id = krest.trigger(workers.job("stubborn", "py/stubborn-thread"))
    eventually("the handler running", lambda: workers.journal_lines())
    assert a.terminate() == 0, a.log()

    def first_attempt_ended() -> Any:
        return [x for x in krest.run(run_id)["attempts"] if x["attempt"] == 1 and x["status"] != "RUNNING"]

    [attempt] = eventually("the attempt reported", first_attempt_ended)
    assert (attempt["status"], attempt.get("willRetry")) == ("FAILED", True), attempt
    assert "shut down before the handler finished" in attempt["error"]


async def test_a_graceful_stop_ends_the_heartbeat_even_when_its_cancellation_is_lost(krest: Krest) -> None:
    """Stopping while a heartbeat publish is in flight. Before Python 3.12, asyncio.wait_for
    (inside nats-py's publish) swallows the cancellation of its task when the awaited call
    completes at the same moment, so a heartbeat loop stopped only by cancelling its task
    carried on heartbeating and the stop never ended. Heartbeats back to back make that moment
    likely; every stop must end, and remove the instance's heartbeat."""
    from krest_worker import Worker

    app = "hb-stop"
    for i in range(60):
        w = Worker(app, nats_url=krest.url, instance=f"hb-{i}", heartbeat_interval=0.0, pull_expiry=0.2)

        @w.handler("none")
        async def none(ctx: Any) -> None:
            return None

        stop = asyncio.Event()
        serving = asyncio.create_task(w.serve(stop))

        def registered(instance: str = f"hb-{i}") -> bool:
            assert not serving.done(), serving
            return any(x["instance"] == instance for x in krest.cli("workers", "list") or [])

        await asyncio.to_thread(eventually, f"worker hb-{i} registered", registered)
        stop.set()
        done, _ = await asyncio.wait({serving}, timeout=60)
        assert done, f"worker hb-{i} did not stop"
        serving.result()

    def all_gone() -> bool:
        return not any(x["appName"] == app for x in krest.cli("workers", "list") or [])

    await asyncio.to_thread(eventually, "every heartbeat removed", all_gone)
