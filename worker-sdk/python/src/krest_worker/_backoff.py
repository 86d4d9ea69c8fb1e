"""The one backoff formula of Krest (`schemas/src/backoff.rs`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Backoff:
    """Delay after failed attempt ``n`` (1-based): ``initial × factor^(n-1)``, at most ``max``
    (seconds)."""

    initial: float = 1.0
    factor: float = 2.0
    max: float = 60.0

    def delay(self, attempt: int) -> float:
        """The delay in seconds after failed attempt `attempt` (0 counts as 1)."""
        exp = min(max(attempt - 1, 0), 64)
        try:
            secs = self.initial * max(self.factor, 1.0) ** exp
        except OverflowError:
            return self.max
        if not math.isfinite(secs) or secs >= self.max:
            return self.max
        return secs

    @staticmethod
    def from_run(value: Any) -> Backoff | None:
        """A run message's ``retryBackoff`` (``{"initialMs", "factor", "maxMs"}``), if valid."""
        if not isinstance(value, dict):
            return None
        try:
            return Backoff(
                initial=float(value["initialMs"]) / 1000.0,
                factor=float(value["factor"]),
                max=float(value["maxMs"]) / 1000.0,
            )
        except (KeyError, TypeError, ValueError):
            return None


#: Waiting for a service to come back: 250 ms doubling to 5 s.
RECONNECT = Backoff(0.25, 2.0, 5.0)
