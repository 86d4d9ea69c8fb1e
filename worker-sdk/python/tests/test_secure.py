"""The Python worker as a least-privilege NATS user: Krest's own nats/accounts.conf (the
`billing` entry made for this test's app), the scheduler as user `scheduler`, the worker as
the app's user with a password. Every subject the SDK uses must be one the config allows."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO, Krest, Workers, eventually

APP = "pysecure"


@pytest.fixture(scope="module")
def secure() -> Iterator[Krest]:
    dir = Path(tempfile.mkdtemp(prefix="krest-py-secure-"))
    accounts = (REPO / "nats" / "accounts.conf").read_text().replace("billing", APP)
    (dir / "accounts.conf").write_text(accounts)
    (dir / "nats.conf").write_text("include accounts.conf\n")
    passwords = {
        f"KREST_{role}_PASSWORD": f"pw-{role.lower()}"
        for role in ["SCHEDULER", "OPERATOR", "VIEWER", "BILLING", "SYS"]
    }
    import os

    os.environ.update(passwords)  # read by nats-server for the config's $VARIABLES
    k = Krest(
        dir,
        nats_args=["-c", str(dir / "nats.conf")],
        env={"NATS_USER": "scheduler", "NATS_PASSWORD": passwords["KREST_SCHEDULER_PASSWORD"]},
    )
    try:
        yield k
    finally:
        k.stop()
        shutil.rmtree(dir, ignore_errors=True)


def test_a_least_privilege_worker_runs_retries_hands_off_and_sees_cancellations(secure: Krest) -> None:
    workers = Workers(secure, "secure", app=APP)
    env = {"NATS_USER": APP, "NATS_PASSWORD": "pw-billing"}
    try:
        # A cancel marker, found before executing (a direct get on KV_krest-cancels).
        waiting = workers.job("wait", "py/wait")
        cancelled = secure.trigger(waiting)
        eventually("the run recorded", lambda: secure.run(cancelled)["run"]["status"] == "PENDING")
        secure.cli("runs", "cancel", cancelled)
        w = workers.start("w1", **env)
        assert secure.wait_run(cancelled)["run"]["status"] == "CANCELLED"
        # A run, with a log line and an output.
        d = secure.wait_run(secure.trigger(workers.job("echo", "py/echo", args={"say": "hi"})))
        assert (d["run"]["status"], d["run"]["output"]) == ("SUCCEEDED", "echo hi"), d
        # An addressed run's retry, handed to the router.
        job = workers.job(
            "rr",
            "py/flaky",
            args={"failures": 1},
            retryTimes=1,
            loadBalanceType="ROUND_ROBIN",
            retryBackoff={"initial": "100ms", "factor": 1, "max": "100ms"},
        )
        d = secure.wait_run(secure.trigger(job))
        assert d["run"]["status"] == "SUCCEEDED", d
        assert sorted((a["attempt"], a["status"]) for a in d["attempts"]) == [(1, "FAILED"), (2, "SUCCEEDED")]
        assert "Permissions Violation" not in w.log() and "permission" not in w.log().lower(), w.log()
    finally:
        workers.stop_all()
