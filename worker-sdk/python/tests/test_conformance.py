"""One conformance suite for every SDK: the same scenarios drive the Rust demo worker
(`krest worker demo`) and its Python port (demo_worker.py, on this SDK) against a real scheduler
and nats-server, each SDK in an app of its own, and the recorded histories must be the same —
statuses, attempts, willRetry, retryInMs, outputs, errors and log lines — modulo run ids, app
names and times."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import nats
import pytest

from conftest import HERE, Krest, Proc, eventually, krest_bin, stop_all

SDKS = ("rust", "python")
FAST = {"initial": "100ms", "factor": 1, "max": "100ms"}
POST = "service/demo-krestjob-post"
SHARDING = "service/demo-krestjob/sharding"
FLAKY = "service/demo-krestjob/flaky"
CRASH = "service/demo-krestjob/crash"
#: How each SDK names a handler bug in the attempt's error: a Rust panic, a Python exception
#: that is not a JobError (its type, then its message).
UNEXPECTED = {"rust": "handler panicked: ", "python": "RuntimeError: "}
_n = iter(range(1, 1_000_000))


class Sdk:
    """One SDK's side of a scenario: its app, its worker processes, its journal."""

    def __init__(self, krest: Krest, sdk: str, scenario: str):
        self.krest = krest
        self.sdk = sdk
        self.app = f"conf-{scenario}-{sdk}-{next(_n)}"
        self.journal = krest.dir / f"{self.app}.journal"
        self.procs: dict[str, Proc] = {}

    def start(self, instance: str, work_ms: int = 300, shutdown_timeout_s: int = 30) -> Proc:
        log = self.krest.dir / f"{self.app}-{instance}.log"
        common = {"KREST_JOURNAL": str(self.journal)}
        if self.sdk == "rust":
            args = [
                krest_bin(), "worker", "demo", "--nats-url", self.krest.url, "--app", self.app,
                "--instance", instance, "--work", f"{work_ms}ms", "--ack-wait", "3s",
                "--shutdown-timeout", f"{shutdown_timeout_s}s",
            ]
            p = Proc(instance, args, log, common)
        else:
            p = Proc(
                instance,
                [sys.executable, str(HERE / "demo_worker.py")],
                log,
                {
                    **common,
                    "NATS_URL": self.krest.url,
                    "KREST_APP": self.app,
                    "KREST_INSTANCE": instance,
                    "KREST_WORK_MS": str(work_ms),
                    "KREST_ACK_WAIT_S": "3",
                    "KREST_SHUTDOWN_TIMEOUT_S": str(shutdown_timeout_s),
                },
            )
        self.procs[instance] = p
        eventually(
            f"{self.sdk} worker {instance} registered",
            lambda: p.p.poll() is None
            and any(
                w["appName"] == self.app and w["instance"] == instance
                for w in self.krest.cli("workers", "list") or []
            ),
        )
        return p

    def job(self, name: str, path: str, **fields: Any) -> str:
        self.krest.apply({"appName": self.app, "jobGroup": self.app, "jobName": name, "path": path, **fields})
        return f"{self.app}.{name}"

    def executing(self, instance: str) -> None:
        """Waits until `instance` executes a handler."""
        eventually(
            f"{self.sdk} worker {instance} executing",
            lambda: self.journal.exists() and any(l.endswith(f" {instance}") for l in self.journal.read_text().splitlines()),
        )

    def stop(self) -> None:
        stop_all(list(self.procs.values()))


def history(d: dict[str, Any], sdk: Sdk, run_id: str) -> dict[str, Any]:
    """A run's recorded history without what differs between two apps: ids, names, times."""

    def norm(v: Any) -> Any:
        if isinstance(v, str):
            return v.replace(run_id, "<run>").replace(sdk.app, "<app>")
        return v

    r = d["run"]
    return {
        "status": r["status"],
        "shardTotal": r["shardTotal"],
        "output": norm(r.get("output")),
        "error": norm(r.get("error")),
        "attempts": sorted(
            (
                a["shard"],
                a["attempt"],
                a["status"],
                bool(a.get("willRetry")),
                a.get("retryInMs"),
                a.get("worker"),
                norm(a.get("output")),
                norm(a.get("error")),
                tuple((l["level"], norm(l["line"])) for l in a.get("logs", [])),
            )
            for a in d["attempts"]
        ),
    }


Scenario = Callable[[Krest, Sdk], dict[str, Any]]


def trigger_and_wait(krest: Krest, sdk: Sdk, job: str) -> dict[str, Any]:
    run_id = krest.trigger(job)
    return history(krest.wait_run(run_id), sdk, run_id)


def normal(krest: Krest, sdk: Sdk) -> dict[str, Any]:
    sdk.start("w1")
    return trigger_and_wait(krest, sdk, sdk.job("post", POST, args="hello"))


def sharded(krest: Krest, sdk: Sdk) -> dict[str, Any]:
    sdk.start("w1")
    return trigger_and_wait(krest, sdk, sdk.job("shards", SHARDING, jobType="SHARDING", args=["a", {"b": 1}, 3]))


def retried_then_succeeded(krest: Krest, sdk: Sdk) -> dict[str, Any]:
    sdk.start("w1")
    job = sdk.job("flaky", FLAKY, args={"failures": 2}, retryTimes=3, retryBackoff=FAST)
    return trigger_and_wait(krest, sdk, job)


def always_failing(krest: Krest, sdk: Sdk) -> dict[str, Any]:
    sdk.start("w1")
    job = sdk.job("broken", FLAKY, args={"failures": 1000}, retryTimes=2,
                  retryBackoff={"initial": "100ms", "factor": 2, "max": "1s"})
    return trigger_and_wait(krest, sdk, job)


def fatal(krest: Krest, sdk: Sdk) -> dict[str, Any]:
    sdk.start("w1")
    return trigger_and_wait(krest, sdk, sdk.job("fatal", SHARDING, retryTimes=3))


def missing_handler(krest: Krest, sdk: Sdk) -> dict[str, Any]:
    sdk.start("w1")
    return trigger_and_wait(krest, sdk, sdk.job("missing", "service/none"))


def timed_out(krest: Krest, sdk: Sdk) -> dict[str, Any]:
    sdk.start("w1", work_ms=5000)
    job = sdk.job("slow", SHARDING, jobType="SHARDING", args=["x"], timeoutSecs=1, retryTimes=1, retryBackoff=FAST)
    return trigger_and_wait(krest, sdk, job)


def cancelled(krest: Krest, sdk: Sdk) -> dict[str, Any]:
    sdk.start("w1", work_ms=30_000)
    run_id = krest.trigger(sdk.job("cancel", SHARDING, jobType="SHARDING", args=["x"], retryTimes=2))
    sdk.executing("w1")
    eventually("the attempt recorded", lambda: krest.run(run_id)["attempts"])
    krest.cli("runs", "cancel", run_id)
    return history(krest.wait_run(run_id), sdk, run_id)


def killed_mid_run(krest: Krest, sdk: Sdk) -> dict[str, Any]:
    sdk.start("w1", work_ms=2000)
    run_id = krest.trigger(sdk.job("killed", SHARDING, jobType="SHARDING", args=["x"]))
    sdk.executing("w1")
    # Killed once its attempt is on record (the `started` event is sent without waiting).
    eventually("the attempt recorded", lambda: krest.run(run_id)["attempts"])
    sdk.procs["w1"].kill()
    sdk.start("w2", work_ms=100)  # redelivered to it after the ack wait (3 s)
    return history(krest.wait_run(run_id), sdk, run_id)


def shutdown_drains(krest: Krest, sdk: Sdk) -> dict[str, Any]:
    w1 = sdk.start("w1", work_ms=1500)
    run_id = krest.trigger(sdk.job("drain", SHARDING, jobType="SHARDING", args=["x"]))
    sdk.executing("w1")
    assert w1.terminate() == 0, w1.log()
    return history(krest.wait_run(run_id), sdk, run_id)


def shutdown_deadline_hands_back(krest: Krest, sdk: Sdk) -> dict[str, Any]:
    w1 = sdk.start("w1", work_ms=30_000, shutdown_timeout_s=1)
    run_id = krest.trigger(sdk.job("deadline", SHARDING, jobType="SHARDING", args=["x"]))
    sdk.executing("w1")
    assert w1.terminate() == 0, w1.log()
    sdk.start("w2", work_ms=100)
    return history(krest.wait_run(run_id), sdk, run_id)


def panicking(krest: Krest, sdk: Sdk) -> dict[str, Any]:
    """A handler bug (a Rust panic, a Python exception): each attempt fails with an error
    naming it, the run is retried as the job says, and the worker survives to run the next
    job."""
    w1 = sdk.start("w1")
    crashed = trigger_and_wait(krest, sdk, sdk.job("crash", CRASH, retryTimes=2, retryBackoff=FAST))
    # Each SDK names the bug its language's way; the rest of the text is the handler's own.
    prefix = UNEXPECTED[sdk.sdk]
    assert (crashed["status"], len(crashed["attempts"])) == ("FAILED", 3), (sdk.sdk, crashed)
    for a in crashed["attempts"]:
        assert a[7].startswith(prefix), (sdk.sdk, a)
    crashed["attempts"] = [a[:7] + (a[7].replace(prefix, "<bug>: ", 1),) + a[8:] for a in crashed["attempts"]]
    if crashed["error"] is not None:
        crashed["error"] = crashed["error"].replace(prefix, "<bug>: ", 1)
    assert w1.p.poll() is None, w1.log()
    after = trigger_and_wait(krest, sdk, sdk.job("next", POST, args="still here"))
    assert after["status"] == "SUCCEEDED" and after["attempts"][0][5] == "w1", (sdk.sdk, after)
    return {"crashed": crashed, "next": after}


def poison_message(krest: Krest, sdk: Sdk) -> dict[str, Any]:
    sdk.start("w1")
    subject = f"krest.work.{sdk.app}.{sdk.app}.junk.q"

    async def publish() -> None:
        nc = await nats.connect(krest.url)
        await nc.jetstream().publish(subject, b'{"runId": 7}')
        await nc.close()

    asyncio.run(publish())

    def parked() -> list[dict[str, Any]]:
        return [d for d in krest.cli("dlq", "list") if subject in json.dumps(d)]

    [d] = eventually("the message parked", parked)
    # Which problem a reader names first is its own (serde reports missing fields before wrong
    # types); the rest of the parked copy must be the same.
    return {
        "subject": d["subject"],
        "source": d["source"].replace(sdk.app, "<app>"),
        "payload": d["payload"],
        "reason": d["reason"].split(":")[0],
    }


def addressed_retry(krest: Krest, sdk: Sdk) -> dict[str, Any]:
    sdk.start("w1")
    sdk.start("w2")
    job = sdk.job("rr", FLAKY, args={"failures": 1}, retryTimes=2, loadBalanceType="ROUND_ROBIN", retryBackoff=FAST)
    h = trigger_and_wait(krest, sdk, job)
    # Which instance the strategy picks first is its own; that the retry went to the other is
    # the point.
    first = h["attempts"][0][5]
    h["attempts"] = [a[:5] + ("first" if a[5] == first else "other",) + a[6:] for a in h["attempts"]]
    return h


def broadcast(krest: Krest, sdk: Sdk) -> dict[str, Any]:
    sdk.start("w1")
    sdk.start("w2")
    h = trigger_and_wait(krest, sdk, sdk.job("all", POST, jobType="BROADCAST", args="to all"))
    # One shard per live instance, each executed where it was addressed. How many instances the
    # leader saw is the scheduler's affair (under load it may address from a registry view a
    # moment old), so the sides are compared shard by shard.
    assert h["shardTotal"] == len(h["attempts"]) == len({a[5] for a in h["attempts"]}) >= 1, h
    h["attempts"] = sorted({(a[1], a[2], a[3], a[4]) + a[6:] for a in h["attempts"]})
    h["shardTotal"] = "n"
    return h


SCENARIOS: list[Scenario] = [
    addressed_retry, broadcast,
    normal, sharded, retried_then_succeeded, always_failing, fatal, missing_handler, timed_out,
    cancelled, killed_mid_run, shutdown_drains, poison_message, panicking,
    shutdown_deadline_hands_back,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_same_history_from_every_sdk(krest: Krest, scenario: Scenario) -> None:
    sides = {name: Sdk(krest, name, scenario.__name__.replace("_", "-")) for name in SDKS}
    try:
        with ThreadPoolExecutor(len(sides)) as pool:
            futures = {name: pool.submit(scenario, krest, side) for name, side in sides.items()}
            got = {name: f.result() for name, f in futures.items()}
    finally:
        stop_all([p for side in sides.values() for p in side.procs.values()])
    assert got["python"] == got["rust"]


def test_one_app_with_workers_of_both_sdks(krest: Krest) -> None:
    """The SDKs of one app agree: a retry handed off by one SDK's instance is taken by the
    other's, with the attempt numbers, backoff and history continuing."""
    rust = Sdk(krest, "rust", "mixed")
    python = Sdk(krest, "python", "mixed")
    python.app = rust.app
    python.journal = rust.journal
    try:
        rust.start("rs")
        python.start("py")
        job = rust.job("rr", FLAKY, args={"failures": 1}, retryTimes=2, loadBalanceType="ROUND_ROBIN", retryBackoff=FAST)
        for _ in range(2):
            run_id = krest.trigger(job)
            d = krest.wait_run(run_id)
            assert d["run"]["status"] == "SUCCEEDED", d
            first, second = sorted(d["attempts"], key=lambda a: a["attempt"])
            assert (first["attempt"], first["status"], second["attempt"]) == (1, "FAILED", 2)
            assert {first["worker"], second["worker"]} == {"rs", "py"}, d["attempts"]
            assert first["retryInMs"] == 100
            assert second["output"] == "succeeded at attempt 2"
    finally:
        stop_all([*rust.procs.values(), *python.procs.values()])
