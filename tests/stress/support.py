"""Support for the stress suite: `make stress` runs it in full (STRESS=full) and
rewrites docs/reliability.md from what it actually tried; `make
test` runs the same tests at a small scale.  The session hook is registered by
tests/conftest.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

FULL = os.environ.get("STRESS") == "full"
TALLY: dict[str, dict[str, object]] = {}
README = Path(__file__).parent.parent.parent / "docs" / "reliability.md"
BEGIN, END = "<!-- reliability:begin -->", "<!-- reliability:end -->"


def scale(fast: int, full: int) -> int:
    return full if FULL else fast


def record(name: str, tried: str, count: int, result: str) -> None:
    """Each stress test reports what it tried, how often, and the outcome."""
    TALLY[name] = {"tried": tried, "count": count, "result": result}


@pytest.fixture
def tally():  # type: ignore[no-untyped-def]
    return record


def stress_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not FULL or not TALLY:
        return
    rows = ["| what was tried | count | result |", "|---|---:|---|"]
    for name in sorted(TALLY):
        t = TALLY[name]
        rows.append(f"| {t['tried']} | {t['count']} | {t['result']} |")
    status = "all passed" if exitstatus == 0 else f"FAILED (pytest exit {exitstatus})"
    body = f"{BEGIN}\n_Written by `make stress` ({status})._\n\n" + "\n".join(rows) + f"\n{END}"
    text = README.read_text()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + body + text[text.index(END) + len(END) :]
        README.write_text(text)
    (Path(__file__).parent / "last-run.json").write_text(json.dumps(TALLY, indent=1) + "\n")
