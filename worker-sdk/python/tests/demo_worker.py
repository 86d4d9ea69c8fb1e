"""The Rust demo worker (demo-worker/src/lib.rs, `krest worker demo`) ported to the Python SDK,
text for text, for the conformance suite: the same scenarios must give the same history.

Settings from the environment, as `krest worker demo` reads them: NATS_URL, KREST_APP,
KREST_INSTANCE, KREST_WORK_MS (simulated work per shard, ms), KREST_ACK_WAIT_S,
KREST_SHUTDOWN_TIMEOUT_S, KREST_JOURNAL."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from krest_worker import JobContext, JobError, Worker

worker = Worker(
    os.environ.get("KREST_APP", "demo-spring-krest-job"),
    instance=os.environ.get("KREST_INSTANCE"),
    slots=2,
    ack_wait=float(os.environ.get("KREST_ACK_WAIT_S", "30")),
    shutdown_timeout=float(os.environ.get("KREST_SHUTDOWN_TIMEOUT_S", "30")),
)
WORK = int(os.environ.get("KREST_WORK_MS", "300")) / 1000.0


def js(v: Any) -> str:
    """A JSON value as serde_json displays it."""
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)


def journal(ctx: JobContext) -> None:
    path = os.environ.get("KREST_JOURNAL")
    if path:
        with open(path, "a") as f:
            f.write(f"{ctx.run_id} {ctx.shard_index} {ctx.attempt} {ctx.worker}\n")


@worker.handler("service/demo-krestjob-post")
async def post(ctx: JobContext) -> str:
    journal(ctx)
    ctx.log(f"demo-krestjob-post received {js(ctx.args)} (attempt {ctx.attempt})")
    await asyncio.sleep(WORK / 3)
    return f"post ok: {ctx.args if isinstance(ctx.args, str) else ''}"


@worker.handler("service/demo-krestjob/sharding")
async def sharding(ctx: JobContext) -> str:
    journal(ctx)
    if ctx.run.get("shard") is None:
        raise JobError.fatal("this handler expects a SHARDING job")
    ctx.log(f"shard {ctx.shard_index} of {ctx.shard_total} processing item {js(ctx.shard_item)}")
    try:
        await asyncio.wait_for(ctx.wait_cancelled(), WORK)
    except asyncio.TimeoutError:
        return f"shard {ctx.shard_index} of {ctx.shard_total} done"
    raise JobError("cancelled")


@worker.handler("service/demo-krestjob/flaky")
async def flaky(ctx: JobContext) -> str:
    args = ctx.args
    failures = args.get("failures") if isinstance(args, dict) else None
    if not isinstance(failures, int) or isinstance(failures, bool) or failures < 0:
        failures = 1
    if ctx.attempt <= failures:
        ctx.log(f"attempt {ctx.attempt} of a flaky call: the upstream answered 503")
        raise JobError(
            f"upstream unavailable (attempt {ctx.attempt}; this job fails its first {failures})"
        )
    return f"succeeded at attempt {ctx.attempt}"


@worker.handler("service/demo-krestjob/crash")
async def crash(ctx: JobContext) -> str:
    """A handler bug: the Rust demo worker's handler panics, this one raises an exception that
    is not a JobError. The attempt fails (retried as the job says) and the worker goes on."""
    ctx.log(f"attempt {ctx.attempt}: about to hit a bug")
    raise RuntimeError(f"demo crash at attempt {ctx.attempt}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("nats").setLevel(logging.WARNING)
    worker.run()
