"""The worker runtime (the Rust SDK's `worker.rs` and `attempt.rs`): connect, wait for the
streams and buckets, heartbeat, pull runs within capacity from the app's shared consumer and
this instance's own, execute each (progress acks, timeout, cancellation, shutdown), report,
acknowledge, and shut down gracefully."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import os
import random
import re
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import AuthorizationError
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from . import __version__
from ._backoff import RECONNECT, Backoff
from ._context import JobContext, JobError, now_rfc3339
from ._decide import Decision, Ending, Facts, Kind, attempt_number, decide, handed_off
from ._due import DueRuns
from ._events import EventSink, PublishError, StartReport, store
from ._markers import Markers, Unknown, mirror, reason_of
from ._nats import ConfigError, NatsConfig
from ._pull import PullLoop, RunSlot, Slots
from ._text import header_value, redact
from ._trace import attempt_traceparent

log = logging.getLogger("krest_worker")

WORK_STREAM = "KREST_WORK"
EVENTS_STREAM = "KREST_EVENTS"
WORKERS_BUCKET = "krest-workers"
CANCELS_BUCKET = "krest-cancels"
#: Deliveries after which the server stops redelivering a run.
MAX_DELIVER = 30
#: Bound on each step of the final clean-up.
CLEANUP_STEP = 3.0
#: How long (seconds) a cancellation of a run not executing here is remembered, and how many
#: at most: its run may arrive an instant later, before the marker mirror has the marker.
EARLY_KEPT = 60.0
EARLY_MAX = 10_000

Handler = Callable[[JobContext], Any]
H = TypeVar("H", bound=Handler)
_T = TypeVar("_T")

_REQUIRED = {
    "runId": str,
    "jobGroup": str,
    "jobName": str,
    "path": str,
    "jobType": str,
    "scheduledAt": str,
    "dispatchedAt": str,
    "trigger": str,
    "retryTimes": int,
    "revision": int,
}


def _is_token(s: str) -> bool:
    return 0 < len(s) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_") for c in s)


def _host_name() -> str:
    return os.environ.get("HOSTNAME") or socket.gethostname() or "localhost"


def _default_instance() -> str:
    host = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "-" for c in _host_name())
    return f"{host[:40] or 'unnamed'}-{os.getpid()}-{random.getrandbits(16):04x}"


def _output(value: Any) -> str | None:
    """A handler's return value as the run's output."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def read_run(payload: bytes) -> dict[str, Any]:
    """The RunMessage in `payload`; raises ValueError naming what is wrong."""
    try:
        run = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from e
    if not isinstance(run, dict):
        raise ValueError("not a JSON object")
    for name, kind in _REQUIRED.items():
        if name not in run:
            raise ValueError(f"missing field `{name}`")
        if not isinstance(run[name], kind) or isinstance(run[name], bool):
            raise ValueError(f"field `{name}` is not a {kind.__name__}")
    if "args" not in run:
        raise ValueError("missing field `args`")
    shard = run.get("shard")
    if shard is not None and not (
        isinstance(shard, dict)
        and isinstance(shard.get("index"), int)
        and isinstance(shard.get("total"), int)
    ):
        raise ValueError("field `shard` is not a ShardInfo")
    if not isinstance(run.get("attemptOffset", 0), int):
        raise ValueError("field `attemptOffset` is not an int")
    nb = run.get("notBefore")
    if nb is not None:
        if not isinstance(nb, str):
            raise ValueError("field `notBefore` is not a time")
        parse_time(nb)
    return run


# The longest a run is held for its `notBefore` (the protocol's bound: a skewed clock or a
# forged message cannot keep a slot longer).
MAX_HOLD = 10.0

# What this SDK supports beyond the base protocol, declared in every heartbeat.
CAPABILITIES = ["notBefore"]

_TIME = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(?:([Zz])|([+-])(\d\d):(\d\d))\Z"
)


def parse_time(text: str) -> datetime:
    """An RFC 3339 time as Krest writes it (any number of fractional digits); ValueError if
    it is not one. (Not `datetime.fromisoformat`: before 3.11 it refuses `Z` and most
    fractions.)"""
    m = _TIME.match(text)
    if m is None:
        raise ValueError(f"not an RFC 3339 time: {text[:40]!r}")
    y, mo, d, h, mi, sec = (int(m.group(i)) for i in range(1, 7))
    micros = int((m.group(7) or "")[:6].ljust(6, "0"))
    offset = timedelta(0)
    if m.group(9):
        offset = timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
        if m.group(9) == "-":
            offset = -offset
    return datetime(y, mo, d, h, mi, sec, micros, tzinfo=timezone(offset))


def hold_seconds(run: dict[str, Any], now: datetime) -> float:
    """How long to hold `run` before its handler starts: until its `notBefore` (set when the
    leader dispatched it ahead of its fire time), at most MAX_HOLD; 0 when it has none."""
    nb = run.get("notBefore")
    if not isinstance(nb, str):
        return 0.0
    return min(max((parse_time(nb) - now).total_seconds(), 0.0), MAX_HOLD)


def ack_info(reply: str) -> tuple[int, int]:
    """(delivery count, stream sequence) from a JetStream message's reply subject."""
    t = reply.split(".")
    try:
        if len(t) == 9:
            return max(int(t[4]), 1), int(t[5])
        if len(t) >= 11:
            return max(int(t[6]), 1), int(t[7])
    except ValueError:
        pass
    return 1, 0


@dataclass
class _Registration:
    """One shard of a run executing here."""

    #: The run was cancelled.
    cancelled: bool = False
    #: Done once the handler must be asked to stop (cancelled, or the shutdown deadline).
    wake: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def interrupt(self) -> None:
        if not self.wake.done():
            self.wake.set_result(None)


class _Cancellable:
    """Runs executing here that a cancellation can reach. A cancellation of a run not
    executing here is remembered for a while (`EARLY_KEPT`, at most `EARLY_MAX` of them): its
    run may arrive an instant later, before the marker mirror has seen the marker."""

    def __init__(self) -> None:
        self._runs: dict[str, tuple[list[_Registration], list[str]]] = {}
        self._early: dict[str, tuple[str, float]] = {}

    def register(self, run_id: str) -> _Registration:
        reg = _Registration()
        self._runs.setdefault(run_id, ([], []))[0].append(reg)
        return reg

    def unregister(self, run_id: str, reg: _Registration) -> None:
        entry = self._runs.get(run_id)
        if entry is None:
            return
        entry[0][:] = [r for r in entry[0] if r is not reg]
        if not entry[0]:
            del self._runs[run_id]

    def cancel(self, run_id: str, reason: str) -> None:
        """Cancels every shard of `run_id` executing here; remembers the cancellation of a
        run that is not."""
        entry = self._runs.get(run_id)
        if entry is None:
            now = time.monotonic()
            self._early = {k: v for k, v in self._early.items() if now - v[1] < EARLY_KEPT}
            if len(self._early) < EARLY_MAX:
                self._early[run_id] = (reason, now)
            return
        entry[1][:] = [reason]
        for r in entry[0]:
            r.cancelled = True
            r.interrupt()

    def interrupt_all(self) -> None:
        """Wakes every run executing here (the shutdown deadline passed)."""
        for regs, _ in self._runs.values():
            for r in regs:
                r.interrupt()

    def cancelled_early(self, run_id: str) -> str | None:
        """The reason of a recent cancellation of `run_id` received before it arrived here."""
        early = self._early.get(run_id)
        if early is None or time.monotonic() - early[1] >= EARLY_KEPT:
            return None
        return early[0]

    def reason(self, run_id: str) -> str | None:
        entry = self._runs.get(run_id)
        return entry[1][0] if entry and entry[1] else None


class Worker:
    """A Krest worker of app `app` (Krest-Job's ``appName``).

    Register handlers with `handler`, then `run` (blocking; SIGINT/SIGTERM stop it
    gracefully) or ``await serve()``. NATS settings come from the environment like every
    Krest process (``NATS_URL``, ``NATS_USER``/``NATS_PASSWORD``, ``NATS_TOKEN``,
    ``NATS_CREDS``, ``NATS_NKEY``, ``NATS_CERT``/``NATS_KEY``, ``NATS_CA``), with the keyword
    arguments winning over them, or from `nats` as a whole.
    """

    def __init__(
        self,
        app: str,
        *,
        nats_url: str | None = None,
        weight: int = 1,
        slots: int = 4,
        instance: str | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        creds: str | None = None,
        nkey: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        nats: NatsConfig | None = None,
        retry_backoff: Backoff | None = None,
        ack_wait: float = 30.0,
        shutdown_timeout: float = 30.0,
        cancel_grace: float = 5.0,
        heartbeat_interval: float = 3.0,
        pull_expiry: float = 2.0,
        report_start_after: float = 0.1,
        version: str = __version__,
    ) -> None:
        if not _is_token(app):
            raise ConfigError(f"app name `{app}` is invalid: use 1 to 64 letters, digits, `-` or `_`")
        if instance is not None and not _is_token(instance):
            raise ConfigError(
                f"instance id `{instance}` is invalid: use 1 to 64 letters, digits, `-` or `_`"
            )
        if weight < 1 or slots < 1:
            raise ConfigError("weight and slots must be at least 1")
        if weight * slots > 10_000:
            raise ConfigError("weight × slots must be at most 10000")
        if ack_wait < 1:
            raise ConfigError("ack_wait must be at least 1 s")
        if not report_start_after >= 0:
            raise ConfigError("report_start_after must be at least 0 s")
        base = nats if nats is not None else NatsConfig.from_env(nats_url)
        if nats is not None and nats_url is not None:
            base = base.with_(url=nats_url)
        self.nats = base.with_(
            user=user,
            password=password,
            token=token,
            creds=creds,
            nkey=nkey,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_ca=tls_ca,
        )
        self.app = app
        self.instance = instance or _default_instance()
        self.weight = weight
        self.slots = slots
        self.retry_backoff = retry_backoff or Backoff()
        self.ack_wait = ack_wait
        self.shutdown_timeout = shutdown_timeout
        self.cancel_grace = cancel_grace
        self.heartbeat_interval = heartbeat_interval
        self.pull_expiry = pull_expiry
        #: How long an attempt runs before its ``started`` event is sent (seconds). An attempt
        #: that ends sooner without logging sends no ``started`` event: its ``finished`` event
        #: carries the start (``startedAt``), one message stored and recorded instead of two.
        #: The run shows as RUNNING this much later; 0 sends ``started`` at once.
        self.report_start_after = report_start_after
        self.version = version
        self._handlers: dict[str, Handler] = {}
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- configuration -----------------------------------------------------------------------

    def handler(self, path: str) -> Callable[[H], H]:
        """Registers the decorated function under `path`, the name jobs refer to. ``async def``
        handlers run on the worker's event loop; plain ``def`` handlers in threads. The
        return value is the run's output (``None``: none; a ``str`` as is; anything else as
        JSON); an exception fails the attempt (retried, unless it is `JobError.fatal`)."""

        def register(f: H) -> H:
            self.add_handler(path, f)
            return f

        return register

    def add_handler(self, path: str, f: Handler) -> None:
        """Registers `f` under `path` (see `handler`)."""
        if not path or any(c.isspace() for c in path):
            raise ConfigError(f"handler path `{path}` is invalid: it must be non-empty, without spaces")
        self._handlers[path] = f

    @property
    def capacity(self) -> int:
        """Runs held at once from each consumer: ``weight × slots``."""
        return self.weight * self.slots

    # -- running -----------------------------------------------------------------------------

    def run(self) -> None:
        """Connects and works until SIGINT or SIGTERM, then shuts down gracefully (see
        `serve`). Configures logging to stderr at INFO if the program has not configured it."""
        if not logging.getLogger().handlers:
            logging.basicConfig(
                level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
        asyncio.run(self._run_until_signal())

    async def _run_until_signal(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):
                pass
        try:
            await self.serve(stop)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def stop(self) -> None:
        """Asks a running worker to shut down gracefully (from any thread)."""
        if self._stop is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        """Works until `stop` is set (or `stop()` is called), then shuts down gracefully: stops
        pulling (runs still arriving on the open pull request are handed back unexecuted),
        keeps heartbeating while running handlers finish up to `shutdown_timeout`, cancels the
        rest and hands them back for another attempt at once (reporting the attempt FAILED
        with ``willRetry`` first; runs addressed to this instance go to the leader's router),
        then removes its heartbeat.

        NATS being unreachable, or the streams and buckets a scheduler node creates not
        existing yet, is not an error: the worker logs what it waits for and keeps trying.
        Raises `ConfigError` for unusable settings or a refused login."""
        if not self._handlers:
            raise ConfigError("no handlers registered: use @worker.handler(path) at least once")
        self._stop = stop if stop is not None else asyncio.Event()
        self._loop = asyncio.get_running_loop()
        run = _Run(self, self._stop)
        await run.main()


class _Run:
    """One `Worker.serve`."""

    def __init__(self, w: Worker, stop: asyncio.Event) -> None:
        self.w = w
        self.stop = stop
        self.hard_stop = asyncio.Event()
        #: Ends the heartbeat loop (see `finish`).
        self.heartbeat_done = asyncio.Event()
        self.cancellable = _Cancellable()
        #: Held runs by when they are due: reports wait for the due ones to start.
        self.due = DueRuns()
        self.markers = Markers()
        self.mirror: asyncio.Task[None] | None = None
        self.in_flight = 0
        self.started_at = now_rfc3339()
        self.nc: Client | None = None
        self.closing = False
        self.js: JetStreamContext | None = None
        self.events: EventSink | None = None

    # -- start -------------------------------------------------------------------------------

    async def main(self) -> None:
        w = self.w
        try:
            nc = await self.connect()
            if nc is None:
                return
            self.nc = nc
            js = nc.jetstream(timeout=5.0)
            self.js = js
            for what, stream in [
                (f"stream {WORK_STREAM}", WORK_STREAM),
                (f"stream {EVENTS_STREAM}", EVENTS_STREAM),
                (f"bucket {WORKERS_BUCKET}", f"KV_{WORKERS_BUCKET}"),
                (f"bucket {CANCELS_BUCKET}", f"KV_{CANCELS_BUCKET}"),
            ]:
                if await self.wait_for(what, functools.partial(self.find_stream, stream, what)) is None:
                    return
            await nc.subscribe(f"krest.cancel.{w.app}", cb=self.on_cancel)
            self.mirror = asyncio.create_task(
                mirror(js, self.markers, self.stop), name="krest-cancel-markers"
            )
            app_source = self.app_source()
            app_consumer = await self.wait_for("the app's consumer", app_source)
            if app_consumer is None:
                return
            self.events = EventSink(nc, js)
            log.info(
                "worker started: app %s, instance %s, capacity %d, handlers %s",
                w.app,
                w.instance,
                w.capacity,
                ", ".join(sorted(w._handlers)),
            )
            # This instance's own consumer exists before its first heartbeat: the leader
            # addresses runs to instances it sees heartbeating.
            inst = self.instance_source()
            inst_consumer = await self.wait_for("this instance's consumer", inst)
            if inst_consumer is None:
                await self.finish(None)
                return
            heartbeat = asyncio.create_task(self.heartbeat_loop(), name="krest-heartbeat")
            tasks = await asyncio.gather(
                self.pull(app_consumer, app_source).run(),
                self.pull(inst_consumer, inst).run(),
            )
            running = tasks[0] | tasks[1]
            await self.drain(running)
            await self.finish(heartbeat)
        finally:
            if self.mirror is not None:
                self.mirror.cancel()
            if self.nc is not None and not self.nc.is_closed:
                self.closing = True
                try:
                    await asyncio.wait_for(self.nc.close(), CLEANUP_STEP)
                except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                    pass
            log.info("worker %s stopped", w.instance)

    def app_source(self) -> Callable[[], Awaitable[ConsumerInfo]]:
        """Finds or creates the app's shared consumer."""
        w = self.w
        return lambda: self.consumer(
            f"krest-app-{w.app}",
            f"krest.work.{w.app}.*.*.q",
            f"Krest work queue of app {w.app}",
            None,
        )

    def instance_source(self) -> Callable[[], Awaitable[ConsumerInfo]]:
        """Finds or creates this instance's own consumer (removed by the server after an hour
        without the instance; the leader normally drains and deletes it first)."""
        w = self.w
        return lambda: self.consumer(
            f"krest-inst-{w.app}-{w.instance}",
            f"krest.work.{w.app}.*.*.i.{w.instance}",
            f"Krest runs addressed to {w.app}/{w.instance}",
            3600.0,
        )

    async def connect(self) -> Client | None:
        """Connects (named ``krest-worker <app>/<instance>``, replies under ``_INBOX_<app>``
        unless set), waiting out an unreachable server; a refused login ends the worker."""
        w = self.w
        cfg = w.nats
        if cfg.inbox_prefix is None:
            cfg = cfg.with_(inbox_prefix=f"_INBOX_{w.app}")
        opts = cfg.connect_options(f"krest-worker {w.app}/{w.instance}")
        failures = 0
        refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
        connected = False

        async def on_error(e: Exception) -> None:
            nonlocal failures
            if isinstance(e, AuthorizationError) or "authorization" in str(e).lower():
                if not connected and not refused.done():
                    refused.set_result(e)
                else:
                    log.warning("NATS error: %s", redact(str(e)))
                return
            if connected:
                log.warning("NATS error: %s", redact(str(e)))
                return
            failures += 1
            if failures == 1 or failures % 10 == 0:
                log.warning(
                    "cannot connect to NATS at %s (%d failures); retrying: %s",
                    cfg.shown_url(),
                    failures,
                    redact(f"{type(e).__name__}: {e}"),
                )

        async def on_disconnect() -> None:
            if connected and not self.closing:
                log.warning("disconnected from NATS")

        async def on_reconnect() -> None:
            log.info("reconnected to NATS")

        attempt = asyncio.ensure_future(
            nats.connect(
                **opts,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                connect_timeout=2,
            )
        )
        stop_wait = asyncio.ensure_future(self.stop.wait())
        waiters: set[asyncio.Future[Any]] = {attempt, stop_wait, refused}
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if attempt in done:
            connected = True
            nc = attempt.result()
            if failures:
                log.info("connected to NATS")
            return nc
        attempt.cancel()
        try:
            await attempt
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            pass
        if refused in done:
            raise ConfigError(
                f"NATS at {cfg.shown_url()} refused the login: {redact(str(refused.result()))}"
            )
        return None

    async def pause(self, failures: int) -> bool:
        """Sleeps the reconnect backoff; False if stopping meanwhile."""
        try:
            await asyncio.wait_for(self.stop.wait(), RECONNECT.delay(failures))
            return False
        except asyncio.TimeoutError:
            return True

    async def wait_for(self, what: str, f: Callable[[], Awaitable[_T]]) -> _T | None:
        """Retries `f` until it succeeds (its value) or the worker is stopped (None)."""
        failures = 0
        while not self.stop.is_set():
            try:
                v = await f()
            except Exception as e:  # noqa: BLE001 - everything is retried, and logged
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.warning("waiting for %s (%d failures): %s", what, failures, e)
                if not await self.pause(failures):
                    return None
                continue
            if failures:
                log.info("%s is ready", what)
            return v
        return None

    async def find_stream(self, name: str, what: str) -> bool:
        assert self.js is not None
        try:
            await self.js.stream_info(name)
            return True
        except NotFoundError as e:
            raise RuntimeError(
                f"{what} does not exist yet: is a `krest scheduler` running against this NATS?"
            ) from e
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(
                f"cannot look up {what} ({type(e).__name__}: {e}): "
                "is JetStream enabled on this NATS server?"
            ) from e

    async def consumer(
        self, name: str, filter_subject: str, description: str, inactive: float | None
    ) -> ConsumerInfo:
        """The durable consumer `name`, created if missing (an existing one keeps its
        settings, ack wait included); one with another filter is replaced."""
        js = self.js
        assert js is not None
        # Named, so the create request carries the filter in its subject
        # (`$JS.API.CONSUMER.CREATE.KREST_WORK.<name>.<filter>`): what worker users may send.
        config = ConsumerConfig(
            name=name,
            durable_name=name,
            description=description,
            filter_subject=filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.w.ack_wait,
            max_deliver=MAX_DELIVER,
            max_ack_pending=20_000,
            inactive_threshold=inactive,
        )
        info: ConsumerInfo
        try:
            info = await js.consumer_info(WORK_STREAM, name)
        except NotFoundError:
            info = await js.add_consumer(WORK_STREAM, config)
        if info.config.filter_subject == filter_subject:
            return info
        log.warning(
            "replacing consumer %s whose filter %s is not Krest's (%s)",
            name,
            info.config.filter_subject,
            filter_subject,
        )
        await js.delete_consumer(WORK_STREAM, name)
        return await js.add_consumer(WORK_STREAM, config)

    # -- registry and cancellations ------------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        w = self.w
        assert self.js is not None
        subject = f"$KV.{WORKERS_BUCKET}.{w.app}.{w.instance}"
        host = _host_name()
        # Ended by `heartbeat_done`, not only by cancelling the task: before Python 3.12,
        # asyncio.wait_for (inside nats-py's publish) swallows the cancellation of its task
        # when the awaited reply arrives at the same moment, and the loop would carry on.
        while not self.heartbeat_done.is_set():
            info = {
                "appName": w.app,
                "instance": w.instance,
                "handlers": sorted(w._handlers),
                "weight": w.weight,
                "slots": w.slots,
                "inFlight": self.in_flight,
                "version": w.version,
                "sdk": "python",
                "host": host,
                "startedAt": self.started_at,
                "heartbeatAt": now_rfc3339(),
                "capabilities": CAPABILITIES,
            }
            try:
                await self.js.publish(subject, json.dumps(info).encode(), timeout=5.0)
            except Exception as e:  # noqa: BLE001
                log.warning("heartbeat failed: %s", e)
            if self.heartbeat_done.is_set():
                break
            try:
                await asyncio.wait_for(self.heartbeat_done.wait(), w.heartbeat_interval)
            except asyncio.TimeoutError:
                pass

    async def on_cancel(self, msg: Msg) -> None:
        try:
            req = json.loads(msg.data)
            self.cancellable.cancel(str(req["runId"]), str(req.get("reason", "cancelled")))
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring a malformed cancellation: %s", e)

    async def cancel_marker(self, run_id: str) -> str | None:
        """The reason of the run's marker in ``krest-cancels``, if it has one. A failed look-up
        counts as none (the run executes; a broadcast still reaches it)."""
        assert self.js is not None
        try:
            m = await self.js.get_last_msg(
                f"KV_{CANCELS_BUCKET}", f"$KV.{CANCELS_BUCKET}.{run_id}", direct=True
            )
        except NotFoundError:
            return None
        except Exception as e:  # noqa: BLE001
            log.warning("cannot check run %s for a cancellation; executing it: %s", run_id, e)
            return None
        op = (m.headers or {}).get("KV-Operation")
        if op in ("DEL", "PURGE") or not m.data:
            return None
        return reason_of(m.data)

    # -- pulling -----------------------------------------------------------------------------

    def pull(self, info: ConsumerInfo, recreate: Callable[[], Awaitable[ConsumerInfo]]) -> PullLoop:
        """The pull loop of one consumer (see `_pull`): `weight × slots` slots."""
        assert self.nc is not None
        w = self.w
        slots = Slots(w.capacity)
        return PullLoop(
            self.nc,
            WORK_STREAM,
            info,
            w.capacity,
            w.pull_expiry,
            w.ack_wait,
            self.stop,
            lambda msg, every, release: asyncio.create_task(self.process(msg, every, release, slots)),
            lambda msg: self.reply(msg, b"-NAK"),
            recreate,
        )

    async def drain(self, running: set[asyncio.Task[None]]) -> None:
        """Graceful shutdown: waits for running handlers up to the shutdown timeout, then
        cancels the rest (they hand their runs back)."""
        if not running:
            return
        log.info(
            "waiting up to %.0f s for %d running handlers", self.w.shutdown_timeout, len(running)
        )
        _, pending = await asyncio.wait(running, timeout=self.w.shutdown_timeout)
        if pending:
            log.warning(
                "shutdown timeout reached; cancelling %d handlers and handing their runs back",
                len(pending),
            )
            self.hard_stop.set()
            self.cancellable.interrupt_all()
            await asyncio.wait(pending)

    async def finish(self, heartbeat: asyncio.Task[None] | None) -> None:
        """Stops heartbeating, removes the heartbeat entry, publishes what is queued."""
        w = self.w
        if heartbeat is not None:
            # The event ends the loop even if the cancellation is lost (see heartbeat_loop);
            # the entry is deleted only once no heartbeat can follow the deletion.
            self.heartbeat_done.set()
            heartbeat.cancel()
            await asyncio.wait({heartbeat}, timeout=CLEANUP_STEP * 3)
            if not heartbeat.done():
                log.warning("the heartbeat did not stop; removing its entry anyway")
            elif not heartbeat.cancelled() and heartbeat.exception() is not None:
                log.warning("heartbeat ended: %s", heartbeat.exception())
        if self.js is not None:
            try:
                await asyncio.wait_for(
                    self.js.publish(
                        f"$KV.{WORKERS_BUCKET}.{w.app}.{w.instance}",
                        b"",
                        headers={"KV-Operation": "DEL"},
                    ),
                    CLEANUP_STEP,
                )
            except (asyncio.TimeoutError, Exception) as e:  # noqa: BLE001
                log.warning("could not remove heartbeat: %s", e)
        if self.events is not None:
            try:
                await asyncio.wait_for(self.events.close(), CLEANUP_STEP * 3)
            except asyncio.TimeoutError:
                log.warning("some run events could not be published before stopping")
        if self.nc is not None:
            try:
                await asyncio.wait_for(self.nc.flush(), CLEANUP_STEP)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                pass

    # -- one run message -----------------------------------------------------------------------

    async def reply(self, msg: Msg, payload: bytes) -> None:
        """Answers a run message with a plain publish, as the Rust SDK does: its result is
        stored already, a lost reply only brings the run back after its ack wait, and the
        connection is flushed before the worker stops."""
        assert self.nc is not None
        try:
            await self.nc.publish(msg.reply, payload)
        except Exception as e:  # noqa: BLE001
            log.warning("ack failed; the run may be redelivered: %s", e)

    async def process(
        self, msg: Msg, progress_every: float, release: Callable[[], None], slots: Slots
    ) -> None:
        """Handles one run message: executes, decides, reports, acknowledges. `release` frees
        the run's intake slot, and its running slot is taken from `slots` before its handler
        starts; both are freed once its handler has ended, at the latest when this returns."""
        self.in_flight += 1
        running = RunSlot(slots)
        try:
            await self._process(msg, progress_every, release, slots, running)
        except Exception:  # noqa: BLE001 - a bug here must not kill the worker
            log.exception("failure handling a run message; it will be redelivered")
        finally:
            self.in_flight -= 1
            release()
            running.free()

    async def _process(
        self,
        msg: Msg,
        progress_every: float,
        release: Callable[[], None],
        slots: Slots,
        running: RunSlot,
    ) -> None:
        events = self.events
        assert events is not None
        delivered, seq = ack_info(msg.reply)
        try:
            run = read_run(msg.data)
        except ValueError as e:
            await self.park(msg, seq, redact(f"malformed run message: {e}"))
            return
        w = self.w
        attempt = attempt_number(run, delivered)
        # A run dispatched ahead of its fire time starts at that time, never earlier. Held
        # beyond the intake while the source has room for held runs, so the next runs are
        # pulled meanwhile.
        hold_s = hold_seconds(run, datetime.now(timezone.utc))
        if hold_s > 0:
            nbytes = len(msg.data)
            beyond = slots.holding.try_hold(nbytes)
            if beyond:
                release()
            until = time.monotonic() + hold_s
            due_key = self.due.hold(until)
            try:
                await self.hold(msg, until, progress_every)
            finally:
                self.due.resumed(due_key)
                if beyond:
                    slots.holding.release(nbytes)
        await running.take()
        shard = run.get("shard")
        shard_index = int(shard["index"]) if isinstance(shard, dict) else 0
        shard_total = int(shard["total"]) if isinstance(shard, dict) else 1
        common: dict[str, Any] = {
            "runId": run["runId"],
            "jobGroup": run["jobGroup"],
            "jobName": run["jobName"],
            "appName": str(run.get("appName", "")),
            "shard": shard_index,
            "shardTotal": shard_total,
            "attempt": attempt,
            "worker": w.instance,
        }
        token = run.get("deliveryToken")
        if token:
            common["deliveryToken"] = token
        # Sent after the start-report delay or before the first log line; folded into
        # `finished` if the attempt ends first.
        start = StartReport(
            {"type": "started", **common, "at": now_rfc3339(), "scheduledAt": run["scheduledAt"]},
            events,
            w.report_start_after,
        )
        clock = time.monotonic()
        ending = await self.attempt_run(run, attempt, msg, start, progress_every)
        duration_ms = int((time.monotonic() - clock) * 1000)
        # A slot is a running handler: the next run may start while this one's result is
        # stored and acknowledged (two round trips to the server).
        release()
        running.free()
        # Runs due now start before this one's result is reported.
        await self.due.quiet()
        decision = decide(ending, Facts.of(run, attempt, w.retry_backoff, w.instance))
        log.debug(
            "run %s shard %d attempt %d ended %s (will retry: %s)",
            run["runId"],
            shard_index,
            attempt,
            decision.outcome,
            decision.will_retry,
        )
        finished: dict[str, Any] = {
            "type": "finished",
            **common,
            "at": now_rfc3339(),
            "outcome": decision.outcome,
            "willRetry": decision.will_retry,
            "durationMs": duration_ms,
        }
        if decision.retry_in_ms is not None:
            finished["retryInMs"] = decision.retry_in_ms
        if decision.output is not None:
            finished["output"] = decision.output
        if decision.error is not None:
            finished["error"] = decision.error
        folded = start.fold()
        if folded is not None:
            finished["startedAt"], due = folded
            if due is not None:
                finished["scheduledAt"] = due
        # A run message is answered only once its result is stored.
        try:
            await events.send_confirmed(finished)
        except PublishError as e:
            log.error(
                "could not store the result of run %s attempt %d; leaving it unacknowledged "
                "so it is redelivered: %s",
                run["runId"],
                attempt,
                e,
            )
            return
        await self.acknowledge(msg, run, attempt, decision)

    async def park(self, msg: Msg, seq: int, reason: str) -> None:
        """Parks a message this worker cannot read on ``krest.dlq.work`` (a copy bounded to
        the server's max payload with its headers), then terminates it."""
        assert self.nc is not None and self.js is not None
        log.error("parking a malformed run message from %s: %s", msg.subject, reason)
        msg_id = f"work/{seq}"
        size = len(msg.data)
        headers = {
            "Krest-Reason": header_value(reason),
            "Krest-Source-Subject": header_value(msg.subject),
            "Krest-Source-Seq": str(seq),
            "Krest-Original-Size": str(size),
        }

        def header_bytes(h: dict[str, str]) -> int:
            return (
                sum(len(k) + len(v.encode()) + 4 for k, v in h.items())
                + len("NATS/1.0\r\n\r\n")
                + len("Nats-Msg-Id: \r\n")
                + len(msg_id)
            )

        max_payload = self.nc.max_payload
        keep = size
        if size > max_payload - header_bytes(headers) - 1024:
            headers["Krest-Truncated"] = str(size)
            keep = max(max_payload - header_bytes(headers) - 1024, 0)
            headers["Krest-Truncated"] = f"kept the first {keep} of {size} bytes"
        try:
            await store(
                self.js, "krest.dlq.work", msg.data[:keep], {**headers, "Nats-Msg-Id": msg_id}
            )
        except PublishError as e:
            # Not parked: leave it for redelivery (and, at worst, the server's max
            # deliveries, after which the scheduler parks it).
            log.warning("could not park the malformed run message: %s", e)
            await self.reply(msg, b'-NAK {"delay": 10000000000}')
            return
        await self.reply(msg, b"+TERM")

    async def attempt_run(
        self,
        run: dict[str, Any],
        attempt: int,
        msg: Msg,
        start: StartReport,
        progress_every: float,
    ) -> Ending:
        """Makes the attempt: a run with a cancel marker ends CANCELLED without executing; a
        run for a handler this instance lacks fails naming it; otherwise the handler runs."""
        w = self.w
        run_id = str(run["runId"])
        # Registered before the marker check, so a cancellation arriving in between counts.
        reg = self.cancellable.register(run_id)
        try:
            reason = self.cancellable.cancelled_early(run_id)
            if reason is None:
                mirrored = self.markers.lookup(run_id)
                # The mirror cannot tell (not caught up, or too many markers): ask the bucket.
                reason = (
                    await self.cancel_marker(run_id) if isinstance(mirrored, Unknown) else mirrored
                )
            if reason is not None:
                return Ending(Kind.CANCELLED, reason)
            handler = w._handlers.get(str(run["path"]))
            if handler is None:
                return Ending(
                    Kind.FAILED,
                    f"no handler `{run['path']}` on worker {w.app}/{w.instance} "
                    f"(it has: {', '.join(sorted(w._handlers))})",
                )
            assert self.events is not None
            ctx = JobContext(run, attempt, w.instance, self.events, start)
            ending = await self.execute(handler, ctx, msg, progress_every, run, reg, start)
            if ending.kind is Kind.CANCELLED and not ending.text:
                ending = Ending(Kind.CANCELLED, self.cancellable.reason(run_id) or "cancelled")
            return ending
        finally:
            self.cancellable.unregister(run_id, reg)

    async def execute(
        self,
        handler: Handler,
        ctx: JobContext,
        msg: Msg,
        progress_every: float,
        run: dict[str, Any],
        reg: _Registration,
        start: StartReport,
    ) -> Ending:
        """Runs the handler, sending progress acks while it runs and stopping it at the job's
        timeout, on cancellation, or when the worker's shutdown deadline passes; sends the
        attempt's ``started`` event once it has run for the start-report delay."""
        loop = asyncio.get_running_loop()
        task: asyncio.Future[Any]
        if inspect.iscoroutinefunction(handler):
            task = asyncio.ensure_future(handler(ctx))
        else:
            task = _in_thread(loop, handler, ctx)
        task.add_done_callback(_retrieve)
        timeout = run.get("timeoutSecs")
        now = time.monotonic()
        deadline = now + float(timeout) if isinstance(timeout, int) and timeout > 0 else None
        next_tick = now + progress_every
        report_start: float | None = now + start.after if start.after > 0 else None
        if self.hard_stop.is_set():
            reg.interrupt()
        stopping: tuple[Kind, float] | None = None
        while True:
            wake = next_tick
            if report_start is not None:
                wake = min(wake, report_start)
            if stopping is None and deadline is not None:
                wake = min(wake, deadline)
            if stopping is not None:
                wake = min(wake, stopping[1])
            waiters: set[asyncio.Future[Any]] = {task}
            if stopping is None:
                waiters.add(reg.wake)
            await asyncio.wait(
                waiters,
                timeout=max(wake - time.monotonic(), 0),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if task.done():
                if stopping is not None and stopping[0] in (Kind.TIMED_OUT, Kind.CANCELLED):
                    return Ending(stopping[0])
                ending = _ending_of(task)
                if stopping is not None and ending.kind is not Kind.SUCCEEDED:
                    # Interrupted by the shutdown deadline: a handler that stopped as asked
                    # (typically by raising) hands its run back; a success stays one.
                    return Ending(Kind.INTERRUPTED)
                return ending
            now = time.monotonic()
            if report_start is not None and now >= report_start:
                report_start = None
                start.send()
            if stopping is None:
                why: Kind | None = None
                if reg.cancelled:
                    why = Kind.CANCELLED
                elif self.hard_stop.is_set():
                    why = Kind.INTERRUPTED
                elif deadline is not None and now >= deadline:
                    why = Kind.TIMED_OUT
                if why is not None:
                    ctx._request_stop()
                    stopping = (why, now + self.w.cancel_grace)
            elif now >= stopping[1]:
                # Past the grace: an async handler is cancelled; a thread cannot be
                # stopped, and is abandoned (its result is ignored).
                task.cancel()
                return Ending(stopping[0])
            if now >= next_tick:
                next_tick = now + progress_every
                try:
                    await self.nc.publish(msg.reply, b"+WPI")  # type: ignore[union-attr]
                except Exception as e:  # noqa: BLE001
                    log.debug("progress ack failed: %s", e)

    async def hold(self, msg: Msg, until: float, progress_every: float) -> None:
        """Waits until `until` (monotonic: a run's `notBefore`), telling the server the message
        is in progress every `progress_every`. A cancellation arriving meanwhile is remembered
        and found when the attempt starts; a shutdown waits for the hold like a running
        handler."""
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, max(progress_every, 0.1)))
            if time.monotonic() >= until:
                return
            try:
                await self.nc.publish(msg.reply, b"+WPI")  # type: ignore[union-attr]
            except Exception as e:  # noqa: BLE001
                log.debug("progress ack failed: %s", e)

    async def acknowledge(
        self, msg: Msg, run: dict[str, Any], attempt: int, decision: Decision
    ) -> None:
        """Answers the run message as decided, handing the retry to the router first where
        the decision says so."""
        payload = decision.payload()
        if decision.hand_off:
            try:
                await self.hand_off(run, attempt, decision.delay_ns or 0)
                payload = b"+TERM"
            except PublishError as e:
                log.warning(
                    "could not hand the retry of run %s to the router; retrying here: %s",
                    run["runId"],
                    e,
                )
        await self.reply(msg, payload)

    async def hand_off(self, run: dict[str, Any], attempt: int, delay_ns: int) -> None:
        """Hands a retry of an instance-addressed run to the leader's router: due after the
        delay, avoiding this instance."""
        assert self.js is not None
        at = datetime.now(timezone.utc) + timedelta(microseconds=delay_ns // 1000)
        h = handed_off(run, attempt, self.w.instance, at)
        shard = run.get("shard")
        index = int(shard["index"]) if isinstance(shard, dict) else 0
        await store(
            self.js,
            h.subject,
            json.dumps(h.message, separators=(",", ":")).encode(),
            {
                "Nats-Msg-Id": h.msg_id,
                "traceparent": attempt_traceparent(str(run["runId"]), index, attempt),
            },
        )


def _in_thread(loop: asyncio.AbstractEventLoop, handler: Handler, ctx: JobContext) -> asyncio.Future[Any]:
    """Runs a plain handler in a thread of its own (at most `weight × slots` per consumer run
    at once). Daemon threads: one that ignores ``ctx.cancelled`` is abandoned past the grace
    and cannot keep the process from exiting."""
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def run() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = handler(ctx)
        except BaseException as e:  # noqa: BLE001 - reported as the attempt's failure
            error = e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop is closed: the worker has stopped

    threading.Thread(target=run, name=f"krest-handler-{ctx.run_id}", daemon=True).start()
    return fut


def _retrieve(f: asyncio.Future[Any]) -> None:
    """Marks an abandoned handler's exception as retrieved."""
    if not f.cancelled():
        f.exception()


def _ending_of(task: asyncio.Future[Any]) -> Ending:
    if task.cancelled():
        return Ending(Kind.FAILED, "handler task was cancelled")
    e = task.exception()
    if e is None:
        return Ending(Kind.SUCCEEDED, _output(task.result()))
    if isinstance(e, JobError):
        return Ending(Kind.FAILED if e.retryable else Kind.FATAL, e.message)
    if isinstance(e, asyncio.CancelledError):
        return Ending(Kind.FAILED, "handler task was cancelled")
    text = str(e)
    return Ending(Kind.FAILED, f"{type(e).__name__}: {text}" if text else type(e).__name__)


__all__ = ["Worker", "Handler"]
