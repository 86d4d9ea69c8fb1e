"""W3C trace context for runs, the same ids as every Krest component
(`schemas/src/trace.rs`): the trace id is a function of the run id."""

from __future__ import annotations

_MASK = (1 << 64) - 1
_PRIME = 0x0000_0100_0000_01B3


def _fnv1a(seed: int, parts: list[bytes]) -> int:
    h = 0xCBF2_9CE4_8422_2325 ^ seed
    for part in parts:
        for b in part:
            h ^= b
            h = (h * _PRIME) & _MASK
        h ^= 0xFF
        h = (h * _PRIME) & _MASK
    return h


def trace_id(run_id: str) -> str:
    """The run's trace id: 32 lowercase hex digits."""
    rid = run_id.encode()
    hi = _fnv1a(0x6A09_E667_F3BC_C908, [rid])
    lo = max(_fnv1a(0xBB67_AE85_84CA_A73B, [rid]), 1)
    return f"{hi:016x}{lo:016x}"


def attempt_traceparent(run_id: str, shard: int, attempt: int) -> str:
    """The `traceparent` of one attempt of a shard."""
    span = max(
        _fnv1a(
            0x5BE0_CD19_137E_2179,
            [run_id.encode(), b"attempt", shard.to_bytes(4, "big"), attempt.to_bytes(4, "big")],
        ),
        1,
    )
    return f"00-{trace_id(run_id)}-{span:016x}-01"
