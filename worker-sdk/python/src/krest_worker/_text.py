"""Texts as Krest stores them: URL credentials redacted, lengths bounded (the Rust
`krest_schemas::redact::text` and `krest_schemas::text::truncate`)."""

from __future__ import annotations

REDACTED = "<redacted>"

#: Longest output or error text stored with an attempt, in bytes.
MAX_OUTPUT = 16 * 1024
#: Longest log line, in bytes.
MAX_LOG_LINE = 4 * 1024
#: Lines an attempt may log.
MAX_LOG_LINES_PER_ATTEMPT = 10_000
#: Bytes an attempt may log.
MAX_LOG_BYTES_PER_ATTEMPT = 1024 * 1024

_URL_END = set("/?#\"'`\\")


def redact(s: str) -> str:
    """`s` with the userinfo of every URL in it (``https://user:pw@host``) replaced by
    ``<redacted>``."""
    if "://" not in s:
        return s
    out: list[str] = []
    copied = 0
    start_from = 0
    while True:
        i = s.find("://", start_from)
        if i < 0:
            break
        start = i + 3
        end = len(s)
        for j in range(start, len(s)):
            c = s[j]
            if c.isspace() or c in _URL_END:
                end = j
                break
        at = s.rfind("@", start, end)
        if at > start and s[start:at] != REDACTED:
            out.append(s[copied:start])
            out.append(REDACTED)
            copied = at
        start_from = start
    if copied == 0:
        return s
    out.append(s[copied:])
    return "".join(out)


def truncate(s: str, max_bytes: int) -> str:
    """`s` cut to at most `max_bytes` UTF-8 bytes on a character boundary, ending in ``...``
    when cut."""
    b = s.encode("utf-8", "replace")
    if len(b) <= max_bytes:
        return s
    cut = max(max_bytes - 3, 0)
    return b[:cut].decode("utf-8", "ignore") + "..."


def stored(s: str) -> str:
    """An output or error text as stored with an attempt: redacted, then cut."""
    return truncate(redact(s), MAX_OUTPUT)


def header_value(s: str, limit: int = 1000) -> str:
    """A one-line header value of at most `limit` bytes (control characters become spaces)."""
    out: list[str] = []
    size = 0
    for c in s:
        if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0:
            c = " "
        n = len(c.encode("utf-8"))
        if size + n > limit:
            break
        out.append(c)
        size += n
    return "".join(out)
