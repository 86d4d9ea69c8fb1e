"""What the SDK no longer waits for before a handler starts, and what must not change with it:
the folded start (``started`` sent after ``report_start_after`` or before the first log line,
else carried by ``finished``), the cancel markers mirrored by a KV watch (a marker written
before its run arrives still cancels it), and pipelined pulls (never more runs in hand than
slots)."""

from __future__ import annotations

import asyncio
import datetime
import json
from typing import Any

import nats
import nats.errors
from nats.js.api import ConsumerConfig, ConsumerInfo, DeliverPolicy

from conftest import Krest, Workers, eventually
from krest_worker import _pull
from krest_worker._markers import CANCELS_BUCKET, Markers, Unknown, mirror

WORKER_EVENTS = ("started", "log", "finished")


def worker_events(krest: Krest, app: str, run_id: str) -> list[dict[str, Any]]:
    """The `started`, `log` and `finished` events of `run_id` in the events stream, in order."""

    async def read() -> list[dict[str, Any]]:
        nc = await nats.connect(krest.url)
        try:
            sub = await nc.jetstream().subscribe(
                f"krest.events.{app}.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
            )
            found: list[dict[str, Any]] = []
            while True:
                msg = await sub.next_msg(timeout=20)
                event = json.loads(msg.data)
                if event.get("runId") == run_id and event.get("type") in WORKER_EVENTS:
                    found.append(event)
                if msg.metadata.num_pending == 0:
                    return found
        finally:
            await nc.close()

    return asyncio.run(read())


def test_a_short_attempt_folds_its_start_into_finished(krest: Krest, workers: Workers) -> None:
    workers.start("w1")
    run_id = krest.trigger(workers.job("quiet", "py/quiet"))
    d = krest.wait_run(run_id)
    assert d["run"]["status"] == "SUCCEEDED", d
    [finished] = worker_events(krest, workers.app, run_id)
    assert finished["type"] == "finished", finished
    assert finished["startedAt"] <= finished["at"], finished
    assert finished["scheduledAt"], finished
    [a] = d["attempts"]
    assert a["startedAt"] and a["finishedAt"], "the recorder takes the start from `finished`"


def test_a_longer_attempt_reports_its_start_after_the_delay(krest: Krest, workers: Workers) -> None:
    workers.start("w1", KREST_REPORT_START_AFTER="0.1")
    run_id = krest.trigger(workers.job("sleepy", "py/quiet-sleep", args={"seconds": 3}))
    # Shown as running while the handler runs (the `started` event was sent on its own).
    eventually("the run RUNNING", lambda: krest.run(run_id)["run"]["status"] == "RUNNING")
    d = krest.wait_run(run_id)
    assert d["run"]["status"] == "SUCCEEDED", d
    started, finished = worker_events(krest, workers.app, run_id)
    assert (started["type"], finished["type"]) == ("started", "finished")
    assert "startedAt" not in finished, finished


def test_the_first_log_line_reports_the_start_first(krest: Krest, workers: Workers) -> None:
    # A handler that logs at once and ends within the delay: `started` goes before its line.
    workers.start("w1", KREST_REPORT_START_AFTER="60")
    run_id = krest.trigger(workers.job("echo", "py/echo", args={"say": "hi"}))
    d = krest.wait_run(run_id)
    assert d["run"]["status"] == "SUCCEEDED", d
    types = [e["type"] for e in worker_events(krest, workers.app, run_id)]
    assert types == ["started", "log", "finished"], types


def test_a_zero_delay_reports_every_start(krest: Krest, workers: Workers) -> None:
    workers.start("w1", KREST_REPORT_START_AFTER="0")
    run_id = krest.trigger(workers.job("quiet0", "py/quiet"))
    assert krest.wait_run(run_id)["run"]["status"] == "SUCCEEDED"
    types = [e["type"] for e in worker_events(krest, workers.app, run_id)]
    assert types == ["started", "finished"], types


def test_a_marker_written_before_the_run_arrives_cancels_it(krest: Krest, workers: Workers) -> None:
    """The run waits in the stream while the only slot is busy; its marker is written straight
    into the bucket (no broadcast), so only the mirror or the bucket can tell the worker."""
    workers.start("w1", KREST_SLOTS="1")
    busy = krest.trigger(workers.job("busy", "py/wait"))
    eventually("the slot busy", lambda: any(l.startswith(busy) for l in workers.journal_lines()))
    waiting = krest.trigger(workers.job("later", "py/quiet"))
    eventually("the run recorded", lambda: krest.run(waiting)["run"]["status"] == "PENDING")

    async def put_marker() -> None:
        nc = await nats.connect(krest.url)
        try:
            kv = await nc.jetstream().key_value(CANCELS_BUCKET)
            await kv.put(waiting, json.dumps({"runId": waiting, "reason": "no longer needed"}).encode())
        finally:
            await nc.close()

    asyncio.run(put_marker())
    krest.cli("runs", "cancel", busy)  # frees the slot
    d = krest.wait_run(waiting)
    assert d["run"]["status"] == "CANCELLED", d
    assert "no longer needed" in d["run"]["error"], d
    assert not any(l.startswith(waiting) for l in workers.journal_lines()), "not executed"


def test_a_cancellation_broadcast_before_the_run_arrives_cancels_it(krest: Krest, workers: Workers) -> None:
    workers.start("w1", KREST_SLOTS="1")
    busy = krest.trigger(workers.job("busy", "py/wait"))
    eventually("the slot busy", lambda: any(l.startswith(busy) for l in workers.journal_lines()))
    waiting = krest.trigger(workers.job("later", "py/quiet"))
    eventually("the run recorded", lambda: krest.run(waiting)["run"]["status"] == "PENDING")
    krest.cli("runs", "cancel", waiting)
    krest.cli("runs", "cancel", busy)
    d = krest.wait_run(waiting)
    assert d["run"]["status"] == "CANCELLED", d
    assert not any(l.startswith(waiting) for l in workers.journal_lines()), "not executed"


async def test_the_marker_mirror_follows_the_bucket_and_says_when_it_cannot_tell(krest: Krest) -> None:
    nc = await nats.connect(krest.url)
    js = nc.jetstream()
    kv = await js.key_value(CANCELS_BUCKET)
    body = lambda reason: json.dumps({"runId": "x", "reason": reason}).encode()  # noqa: E731
    await kv.put("mirror-test.j.1", body("before"))
    markers = Markers()
    assert isinstance(markers.lookup("mirror-test.j.1"), Unknown)
    stop = asyncio.Event()
    task = asyncio.create_task(mirror(js, markers, stop))

    async def until(what: str, ok: Any) -> None:
        def check() -> bool:
            assert not task.done(), task
            return bool(ok())

        for _ in range(200):
            if check():
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{what}: not within 20 s")

    try:
        await until("the bucket mirrored", lambda: markers.lookup("mirror-test.j.1") == "before")
        assert markers.lookup("mirror-test.j.2") is None
        await kv.put("mirror-test.j.2", b"not json")
        await until("a new marker mirrored", lambda: markers.lookup("mirror-test.j.2") == "cancelled")
        await kv.delete("mirror-test.j.1")
        await until("a deleted marker gone", lambda: markers.lookup("mirror-test.j.1") is None)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await nc.close()
    assert isinstance(markers.lookup("mirror-test.j.2"), Unknown), "a stopped mirror cannot tell"


def test_pipelined_pulls_never_hold_more_runs_than_slots(krest: Krest, workers: Workers) -> None:
    workers.start("w1", KREST_WEIGHT="2", KREST_SLOTS="2")
    job = workers.job("count", "py/slots", jobType="SHARDING", args=[0.2] * 24)
    d = krest.wait_run(krest.trigger(job))
    assert d["run"]["status"] == "SUCCEEDED", d
    most = [int(a["output"]) for a in d["attempts"]]
    assert len(most) == 24 and max(most) <= 4, f"more than weight × slots = 4 at once: {most}"


async def test_pull_requests_never_answered_look_the_consumer_up(
    krest: Krest, monkeypatch: Any
) -> None:
    # A pull request whose end never comes (its consumer gone without a word, a connection
    # lost) is given up at its deadline; three in a row look the consumer up, as three that
    # the server ended with an error do.
    monkeypatch.setattr(_pull, "END_SLACK", 0.1)
    nc = await nats.connect(krest.url)
    swallowed: list[bytes] = []

    async def swallow(msg: Any) -> None:
        swallowed.append(msg.data)

    await nc.subscribe("$JS.API.CONSUMER.MSG.NEXT.KREST_NOPE.swallow", cb=swallow)
    info = ConsumerInfo(
        name="swallow",
        stream_name="KREST_NOPE",
        config=ConsumerConfig(name="swallow", ack_wait=30.0),
        created=datetime.datetime.now(datetime.timezone.utc),
    )
    stop = asyncio.Event()
    looked_up = asyncio.Event()

    async def recreate() -> ConsumerInfo:
        looked_up.set()
        return info

    def start(msg: Any, every: float, release: Any) -> asyncio.Task[None]:
        raise AssertionError("nothing is delivered")

    async def hand_back(msg: Any) -> None:
        raise AssertionError("nothing is delivered")

    loop = _pull.PullLoop(nc, "KREST_NOPE", info, 4, 0.1, 30.0, stop, start, hand_back, recreate)
    task = asyncio.create_task(loop.run())
    try:
        await asyncio.wait_for(looked_up.wait(), 30)
        assert len(swallowed) >= 3, swallowed
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await nc.close()
