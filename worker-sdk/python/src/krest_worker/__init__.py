"""Krest worker SDK for Python: run Krest jobs in Python services.

```python
from krest_worker import Worker, JobError

worker = Worker("billing", nats_url="nats://127.0.0.1:4222", weight=2, slots=4)

@worker.handler("invoices/run")
async def run(ctx):
    ctx.log(f"run {ctx.run_id} attempt {ctx.attempt}")
    if ctx.args is None:
        raise JobError.fatal("no args")
    return "42 invoices"

worker.run()
```
"""

__version__ = "0.1.0"

from ._backoff import Backoff  # noqa: E402
from ._context import JobContext, JobError  # noqa: E402
from ._nats import ConfigError, NatsConfig  # noqa: E402
from ._trace import attempt_traceparent, trace_id  # noqa: E402
from ._worker import Worker  # noqa: E402

__all__ = [
    "Backoff",
    "ConfigError",
    "JobContext",
    "JobError",
    "NatsConfig",
    "Worker",
    "__version__",
    "attempt_traceparent",
    "trace_id",
]
