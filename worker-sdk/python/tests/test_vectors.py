"""The shared test vectors of the retry decision (schemas/testdata/decide-vectors.json, read
the same way by the Rust SDK's decide.rs tests): for each, the attempt number, the decision,
the reply's bytes and the hand-off message must be the vector's."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest

from conftest import REPO
from krest_worker._backoff import Backoff
from krest_worker._decide import Ending, Facts, Kind, attempt_number, decide, handed_off

DOC: dict[str, Any] = json.loads((REPO / "schemas" / "testdata" / "decide-vectors.json").read_text())
BASE: dict[str, Any] = DOC["base"]
KINDS = {
    "succeeded": Kind.SUCCEEDED,
    "failed": Kind.FAILED,
    "fatal": Kind.FATAL,
    "timedOut": Kind.TIMED_OUT,
    "cancelled": Kind.CANCELLED,
    "interrupted": Kind.INTERRUPTED,
}


def instant(s: str) -> datetime:
    """An RFC 3339 time (any number of fractional digits, ``Z`` or an offset)."""
    s = s.replace("Z", "+00:00")
    if "." in s:
        head, rest = s.split(".", 1)
        digits = rest[: len(rest) - 6]
        s = f"{head}.{(digits + '000000')[:6]}{rest[-6:]}"
    return datetime.fromisoformat(s)


def reply_parts(wire: str) -> list[Any]:
    """A reply as ``[kind, body]``: ``-NAK {"delay": n}`` and ``-NAK {"delay":n}`` are the same."""
    kind, _, body = wire.partition(" ")
    return [kind, json.loads(body)] if body else [kind]


def normalized(message: dict[str, Any]) -> dict[str, Any]:
    """A run message with its `retryAt` as an instant, so two spellings compare equal."""
    m = dict(message)
    if "retryAt" in m:
        m["retryAt"] = instant(m["retryAt"])
    return m


def received(v: dict[str, Any]) -> dict[str, Any]:
    """The vector's run message: the base with its fields (null removes one)."""
    m = dict(BASE["run"])
    for k, x in v.get("run", {}).items():
        if x is None:
            m.pop(k, None)
        else:
            m[k] = x
    return m


def test_the_file_has_the_vectors() -> None:
    assert len(DOC["vectors"]) >= 40
    assert len({v["name"] for v in DOC["vectors"]}) == len(DOC["vectors"]), "names are unique"


@pytest.mark.parametrize("v", DOC["vectors"], ids=[v["name"] for v in DOC["vectors"]])
def test_vector(v: dict[str, Any]) -> None:
    run = received(v)
    wb = v.get("workerBackoff", BASE["workerBackoff"])
    worker_backoff = Backoff.from_run(wb)
    assert worker_backoff is not None, wb
    ending = Ending(KINDS[v["ending"]["kind"]], v["ending"].get("text"))
    now = instant(BASE["now"])
    instance = BASE["instance"]

    attempt = attempt_number(run, v["delivered"])
    d = decide(ending, Facts.of(run, attempt, worker_backoff, instance))
    hand_off = None
    if d.hand_off:
        h = handed_off(run, attempt, instance, now + timedelta(microseconds=(d.delay_ns or 0) // 1000))
        hand_off = {"subject": h.subject, "msgId": h.msg_id, "message": normalized(h.message)}
    got = {
        "attempt": attempt,
        "outcome": d.outcome,
        "willRetry": d.will_retry,
        "retryInMs": d.retry_in_ms,
        "output": d.output,
        "error": d.error,
        "reply": reply_parts(d.payload().decode()),
        "handOff": hand_off,
    }

    x = v["expect"]
    want_hand_off = None
    if x["handOff"] is not None:
        h = x["handOff"]
        m = dict(run)
        m.pop("target", None)
        m.update({k: h[k] for k in ("attemptOffset", "avoid", "retryAt")})
        want_hand_off = {"subject": h["subject"], "msgId": h["msgId"], "message": normalized(m)}
    want = {**{k: x[k] for k in x if k not in ("reply", "handOff")}, "reply": reply_parts(x["reply"]), "handOff": want_hand_off}
    assert got == want
