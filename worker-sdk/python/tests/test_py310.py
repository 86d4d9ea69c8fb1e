"""Python 3.10 pitfalls that `mypy --python-version 3.10` (run.sh) cannot see, because the code
type-checks on 3.10 but behaves differently there: checked in the package's source."""

from __future__ import annotations

import ast
from pathlib import Path

import krest_worker

PACKAGE = Path(krest_worker.__file__).resolve().parent


def sources() -> list[tuple[str, ast.AST]]:
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) >= 8, files
    return [(f.name, ast.parse(f.read_text(), f.name)) for f in files]


def test_timeouts_are_caught_as_asyncio_timeout_error() -> None:
    """Before 3.11, asyncio.wait_for raises asyncio.TimeoutError, which is not the builtin
    TimeoutError (3.11 made them one): `except TimeoutError` would miss it on 3.10."""
    bare = [
        f"{name}:{node.lineno}"
        for name, tree in sources()
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and node.id == "TimeoutError"
    ]
    assert bare == [], f"use asyncio.TimeoutError: {bare}"


def test_no_fromisoformat() -> None:
    """Before 3.11, datetime.fromisoformat accepts only what isoformat writes (no `Z`, 3 or 6
    fractional digits): Krest's RFC 3339 times would fail to parse on 3.10."""
    calls = [
        f"{name}:{node.lineno}"
        for name, tree in sources()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr == "fromisoformat"
    ]
    assert calls == [], calls
