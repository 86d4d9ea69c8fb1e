"""A small Krest worker in Python: the demo app's handlers (like `krest-demo-worker`'s) for
the jobs in jobs.json.

    pip install ./worker-sdk/python
    NATS_URL=nats://127.0.0.1:4222 python examples/python-worker/worker.py
    krest job apply -f examples/python-worker/jobs.json
"""

from __future__ import annotations

import asyncio
import os
import time

from krest_worker import JobContext, JobError, Worker

worker = Worker(
    "demo-python",  # the jobs' appName
    instance=os.environ.get("KREST_INSTANCE"),  # default: host name, pid and a random suffix
    weight=int(os.environ.get("KREST_WEIGHT", "1")),
    slots=int(os.environ.get("KREST_SLOTS", "2")),
)


@worker.handler("demo/post")
async def post(ctx: JobContext) -> str:
    """NORMAL: logs its args and returns them."""
    ctx.log(f"received {ctx.args!r} (attempt {ctx.attempt} of {ctx.max_attempts})")
    if ctx.args is None:
        raise JobError.fatal("this job needs args")  # fails now, no retry
    await asyncio.sleep(0.1)
    return f"post ok: {ctx.args}"


@worker.handler("demo/sharding")
def sharding(ctx: JobContext) -> str:
    """SHARDING, as a plain function: runs in a thread, and checks `ctx.cancelled`."""
    ctx.log(f"shard {ctx.shard_index} of {ctx.shard_total} processing item {ctx.shard_item}")
    for _ in range(10):
        if ctx.cancelled:  # cancelled, timed out, or the worker is shutting down
            raise JobError("stopped before the end")
        time.sleep(0.03)
    return f"shard {ctx.shard_index} of {ctx.shard_total} done"


@worker.handler("demo/flaky")
async def flaky(ctx: JobContext) -> str:
    """Fails its first `failures` attempts (from its args), then succeeds: retries to look at."""
    failures = int((ctx.args or {}).get("failures", 1))
    if ctx.attempt <= failures:
        ctx.warn(f"attempt {ctx.attempt}: the upstream answered 503")
        raise RuntimeError(f"upstream unavailable (attempt {ctx.attempt})")  # retried
    return f"succeeded at attempt {ctx.attempt}"


if __name__ == "__main__":
    worker.run()  # blocks; SIGINT/SIGTERM stop it gracefully
