"""Real components for the end-to-end tests: a nats-server (free port, temporary store) and a
`krest scheduler` (binary from $KREST_BIN, default $CARGO_TARGET_DIR/debug/krest) shared by the
session; each test runs its own worker processes under its own app name."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
DEADLINE = 60.0
_ids = itertools.count(1)


def krest_bin() -> str:
    if os.environ.get("KREST_BIN"):
        return os.environ["KREST_BIN"]
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    return str(target / "debug" / "krest")


def nats_server_bin() -> str:
    found = os.environ.get("NATS_SERVER") or shutil.which("nats-server") or "/usr/sbin/nats-server"
    return found


def eventually(what: str, f: Callable[[], Any], deadline: float = DEADLINE) -> Any:
    """Polls `f` until it returns something truthy; fails naming `what` at the deadline."""
    end = time.monotonic() + deadline
    last: Any = None
    while True:
        last = f()
        if last:
            return last
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {deadline} s (last: {last!r})")
        time.sleep(0.1)


class Proc:
    """A child process with its output in a log file."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log_path = log
        self._log = open(log, "ab")
        self.signalled = False
        self.p = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal_stop(self) -> None:
        """SIGTERM (once), without waiting (see `terminate`)."""
        if self.p.poll() is None and not self.signalled:
            self.p.send_signal(signal.SIGTERM)
            self.signalled = True

    def terminate(self, wait: float = 30.0) -> int:
        """SIGTERM, then waits (SIGKILL past `wait`); the exit code."""
        if self.p.poll() is None:
            self.signal_stop()
            try:
                self.p.wait(wait)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._log.close()
        return self.p.returncode

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self._log.close()


def stop_all(procs: list[Proc]) -> None:
    """Stops processes together (each graceful stop reads its open pull request to its end)."""
    for p in procs:
        p.signal_stop()
    for p in procs:
        p.terminate()


class Krest:
    """nats-server + one scheduler node, and the `krest` CLI against them."""

    def __init__(self, dir: Path, nats_args: list[str] = [], env: dict[str, str] = {}):
        self.dir = dir
        #: The environment of the scheduler and the CLI (NATS credentials).
        self.env = env
        log = dir / "nats-server.log"
        self.nats = Proc(
            "nats-server",
            [nats_server_bin(), "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", str(dir / "store"), *nats_args],
            log,
        )

        def port() -> int | None:
            m = re.search(r"client connections on 127\.0\.0\.1:(\d+)", self.nats.log())
            assert self.nats.p.poll() is None, f"nats-server exited:\n{self.nats.log()}"
            return int(m.group(1)) if m else None

        self.url = f"nats://127.0.0.1:{eventually('nats-server listening', port, 20)}"
        self.node = Proc(
            "scheduler",
            [
                krest_bin(),
                "scheduler",
                "--nats-url",
                self.url,
                "--db",
                f"sqlite://{dir / 'n1.db'}",
                "--node",
                "n1",
                "--http",
                "127.0.0.1:0",
            ],
            dir / "scheduler.log",
            {"KREST_LOG": "info", **env},
        )
        eventually("the scheduler answering", lambda: self.cli_rc("cluster", "status") == 0)

    def cli_rc(self, *args: str) -> int:
        return subprocess.run(
            [krest_bin(), "--nats-url", self.url, *args], capture_output=True, env={**os.environ, **self.env}
        ).returncode

    def cli(self, *args: str) -> Any:
        """Runs `krest -o json ARGS`; its JSON output."""
        out = subprocess.run(
            [krest_bin(), "--nats-url", self.url, "-o", "json", *args],
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
        )
        assert out.returncode == 0, f"krest {' '.join(args)}: {out.stderr}{out.stdout}"
        return json.loads(out.stdout) if out.stdout.strip() else None

    def apply(self, *jobs: dict[str, Any]) -> None:
        path = self.dir / f"jobs-{next(_ids)}.json"
        path.write_text(json.dumps(list(jobs)))
        self.cli("job", "apply", "-f", str(path))

    def trigger(self, job: str) -> str:
        return str(self.cli("job", "trigger", job)["runId"])

    def run(self, run_id: str) -> dict[str, Any]:
        """`runs get` (an empty run while none is recorded yet)."""
        out = subprocess.run(
            [krest_bin(), "--nats-url", self.url, "-o", "json", "runs", "get", run_id],
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
        )
        if out.returncode != 0 and "recorded (yet)" in out.stderr:
            return {"run": {"status": None}, "attempts": []}
        assert out.returncode == 0, f"krest runs get {run_id}: {out.stderr}{out.stdout}"
        detail: dict[str, Any] = json.loads(out.stdout)
        return detail

    def wait_run(self, run_id: str, statuses: tuple[str, ...] = ("SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT")) -> dict[str, Any]:
        """The run once its status is one of `statuses`."""
        seen: list[dict[str, Any]] = []

        def ended() -> dict[str, Any] | None:
            d = self.run(run_id)
            seen[:] = [d]
            return d if d["run"]["status"] in statuses else None

        try:
            return eventually(f"run {run_id} in {statuses}", ended)  # type: ignore[no-any-return]
        except AssertionError as e:
            # What the run had come to, and the node's last words: a run that never ends says
            # where it stopped.
            tail = "".join(self.node.log().splitlines(keepends=True)[-40:])
            raise AssertionError(f"{e}; last seen: {seen[-1] if seen else None}\nnode log tail:\n{tail}") from None

    def stop(self) -> None:
        self.node.terminate(20)
        self.nats.terminate(10)


@pytest.fixture(scope="session")
def krest() -> Iterator[Krest]:
    dir = Path(tempfile.mkdtemp(prefix="krest-py-"))
    k = Krest(dir)
    try:
        yield k
    finally:
        k.stop()
        if os.environ.get("KREST_KEEP_TEST_DIR"):
            print(f"test files in {dir}", file=sys.stderr)
        else:
            shutil.rmtree(dir, ignore_errors=True)


class Workers:
    """Worker processes of one test (stopped at its end)."""

    def __init__(self, krest: Krest, name: str, app: str | None = None):
        self.krest = krest
        self.app = app or re.sub(r"[^A-Za-z0-9_-]", "-", name)[:50] + f"-{next(_ids)}"
        self.procs: list[Proc] = []
        self.journal = krest.dir / f"{self.app}.journal"

    def start(self, instance: str, script: Path = HERE / "scenario_worker.py", **env: str) -> Proc:
        p = Proc(
            instance,
            [sys.executable, str(script)],
            self.krest.dir / f"{self.app}-{instance}.log",
            {
                "NATS_URL": self.krest.url,
                "KREST_APP": self.app,
                "KREST_INSTANCE": instance,
                "KREST_JOURNAL": str(self.journal),
                **env,
            },
        )
        self.procs.append(p)
        # Registered: the heartbeat shows in `krest workers list`.
        eventually(
            f"worker {instance} registered",
            lambda: p.p.poll() is None
            and any(
                w["instance"] == instance and w["appName"] == self.app
                for w in self.krest.cli("workers", "list") or []
            ),
        )
        return p

    def job(self, name: str, path: str, **fields: Any) -> str:
        """Applies job `<app>.<name>` of this app; its key."""
        self.krest.apply({"appName": self.app, "jobGroup": self.app, "jobName": name, "path": path, **fields})
        return f"{self.app}.{name}"

    def journal_lines(self) -> list[str]:
        return self.journal.read_text().splitlines() if self.journal.exists() else []

    def stop_all(self) -> None:
        stop_all(self.procs)


@pytest.fixture
def workers(krest: Krest, request: pytest.FixtureRequest) -> Iterator[Workers]:
    w = Workers(krest, request.node.name)
    try:
        yield w
    finally:
        w.stop_all()
        # Shown by pytest only when the test fails: what its workers said.
        for p in w.procs:
            tail = "".join(p.log().splitlines(keepends=True)[-30:])
            print(f"--- worker {p.name} ({p.log_path.name}), last lines:\n{tail}", file=sys.stderr)
