"""The Python worker the end-to-end tests run as a process: one handler per scenario.

Settings from the environment: NATS_URL, KREST_APP, KREST_INSTANCE, KREST_SHUTDOWN_TIMEOUT,
KREST_CANCEL_GRACE, KREST_ACK_WAIT, KREST_REPORT_START_AFTER (seconds), KREST_WEIGHT, KREST_SLOTS, KREST_JOURNAL (a file each execution appends
``run_id shard attempt instance`` to)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import datetime, timezone

from krest_worker import Backoff, JobContext, JobError, Worker

worker = Worker(
    os.environ["KREST_APP"],
    instance=os.environ.get("KREST_INSTANCE"),
    heartbeat_interval=0.5,
    ack_wait=float(os.environ.get("KREST_ACK_WAIT", "5")),
    weight=int(os.environ.get("KREST_WEIGHT", "1")),
    slots=int(os.environ.get("KREST_SLOTS", "4")),
    shutdown_timeout=float(os.environ.get("KREST_SHUTDOWN_TIMEOUT", "30")),
    cancel_grace=float(os.environ.get("KREST_CANCEL_GRACE", "5")),
    retry_backoff=Backoff(0.1, 2.0, 1.0),
    pull_expiry=0.5,  # a quicker stop: a graceful stop reads its open pull request to its end
    report_start_after=float(os.environ.get("KREST_REPORT_START_AFTER", "0.1")),
)

#: Handlers of `py/slots` running now, and the most seen at once.
running = 0
most = 0


def journal(ctx: JobContext) -> None:
    path = os.environ.get("KREST_JOURNAL")
    if path:
        with open(path, "a") as f:
            f.write(f"{ctx.run_id} {ctx.shard_index} {ctx.attempt} {ctx.worker}\n")


@worker.handler("py/on-time")
async def on_time(ctx: JobContext) -> dict[str, str]:
    """When it started by this machine's clock, beside the run's fire time."""
    return {"startedAt": datetime.now(timezone.utc).isoformat(), "scheduledAt": ctx.scheduled_at}


@worker.handler("py/echo")
async def echo(ctx: JobContext) -> str:
    journal(ctx)
    ctx.log(f"run {ctx.run_id} attempt {ctx.attempt}")
    if ctx.args is None:
        raise JobError.fatal("no args")
    return f"echo {ctx.args['say']}"


@worker.handler("py/shard")
def shard(ctx: JobContext) -> dict[str, object]:
    """A plain function: runs in a thread."""
    journal(ctx)
    ctx.log(f"shard {ctx.shard_index} of {ctx.shard_total} processing {ctx.shard_item}")
    return {"shard": ctx.shard_index, "of": ctx.shard_total, "item": ctx.shard_item}


@worker.handler("py/flaky")
async def flaky(ctx: JobContext) -> str:
    journal(ctx)
    failures = int((ctx.args or {}).get("failures", 1))
    if ctx.attempt <= failures:
        ctx.warn(f"attempt {ctx.attempt}: upstream answered 503")
        raise JobError(f"upstream unavailable (attempt {ctx.attempt})")
    return f"succeeded at attempt {ctx.attempt}"


@worker.handler("py/fatal")
def fatal(ctx: JobContext) -> None:
    journal(ctx)
    raise JobError.fatal(f"bad args: {ctx.args!r}")


@worker.handler("py/raise")
def raising(ctx: JobContext) -> None:
    journal(ctx)
    raise ValueError("boom")


@worker.handler("py/wait")
async def wait(ctx: JobContext) -> str:
    """Waits until cancelled, or args.seconds (a shard: its item; default 60)."""
    journal(ctx)
    ctx.log("waiting")
    if isinstance(ctx.shard_item, (int, float)):
        seconds = float(ctx.shard_item)
    else:
        seconds = float((ctx.args or {}).get("seconds", 60))
    try:
        await asyncio.wait_for(ctx.wait_cancelled(), seconds)
    except asyncio.TimeoutError:
        return f"waited {seconds} s"
    ctx.log("asked to stop")
    raise JobError("stopped")


@worker.handler("py/wait-thread")
def wait_thread(ctx: JobContext) -> str:
    """The same in a thread, polling ctx.cancelled."""
    journal(ctx)
    seconds = float((ctx.args or {}).get("seconds", 60))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if ctx.cancelled:
            raise JobError("stopped")
        time.sleep(0.05)
    return f"waited {seconds} s"


@worker.handler("py/stubborn-thread")
def stubborn_thread(ctx: JobContext) -> str:
    """Ignores ctx.cancelled for an hour: the worker must stop anyway."""
    journal(ctx)
    time.sleep(3600)
    return "never"


@worker.handler("py/hold-first")
async def hold_first(ctx: JobContext) -> str:
    """Holds its first attempt until cancelled (ignoring it: the worker must give up on it);
    later attempts finish at once."""
    journal(ctx)
    if ctx.attempt == 1:
        ctx.log(f"holding on {ctx.worker}")
        await asyncio.sleep(3600)
    return f"finished attempt {ctx.attempt} on {ctx.worker}"


@worker.handler("py/quiet")
async def quiet(ctx: JobContext) -> str:
    """Returns at once without logging."""
    journal(ctx)
    return "quiet"


@worker.handler("py/quiet-sleep")
async def quiet_sleep(ctx: JobContext) -> str:
    """Sleeps args.seconds without logging."""
    journal(ctx)
    await asyncio.sleep(float((ctx.args or {}).get("seconds", 0.5)))
    return "slept"


@worker.handler("py/slots")
async def count(ctx: JobContext) -> int:
    """Sleeps its shard item's seconds; returns the most `py/slots` handlers this process has
    run at once so far."""
    global running, most
    running += 1
    most = max(most, running)
    try:
        await asyncio.sleep(float(ctx.shard_item or 0.1))
        return most
    finally:
        running -= 1


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.DEBUG if os.environ.get("KREST_DEBUG") else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("nats").setLevel(logging.WARNING)
    worker.run()
