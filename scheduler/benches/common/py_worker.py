"""The benchmarks' worker on the Python SDK (`--python PYTHON`): the same no-op handler `noop`
as the bench binary's own worker, noting when each run started. Run as
`PYTHON py_worker.py NATS_URL OUT_FILE SLOTS`; on SIGTERM it stops gracefully and writes one
`run_id shard scheduled dispatched start` line (epoch ms) per start to OUT_FILE."""

from __future__ import annotations

import logging
import sys
import time
from datetime import datetime, timedelta, timezone

from krest_worker import JobContext, Worker

url, out, slots = sys.argv[1], sys.argv[2], int(sys.argv[3])
# Noted as given; read into epoch ms after the run, off the measured path.
starts: list[tuple[str, int, str, str, int]] = []
worker = Worker("bench", nats_url=url, slots=slots)


@worker.handler("noop")
async def noop(ctx: JobContext) -> None:
    start_ms = time.time_ns() // 1_000_000
    starts.append((ctx.run_id, ctx.shard_index, ctx.scheduled_at, str(ctx.run["dispatchedAt"]), start_ms))


def epoch_ms(at: str) -> int:
    """RFC 3339 (UTC `Z` or an offset, any fractional digits) as epoch ms."""
    at = at.replace("Z", "+00:00")
    if "." in at:
        head, rest = at.split(".", 1)
        digits = len(rest) - len(rest.lstrip("0123456789"))
        at = f"{head}.{rest[:digits][:6].ljust(6, '0')}{rest[digits:]}"
    d = datetime.fromisoformat(at)
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return (d - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(milliseconds=1)


logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
worker.run()
with open(out, "w") as f:
    for run_id, shard, scheduled, dispatched, start_ms in starts:
        f.write(f"{run_id} {shard} {epoch_ms(scheduled)} {epoch_ms(dispatched)} {start_ms}\n")
