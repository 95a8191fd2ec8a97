"""``qemu-lockctl status``: the table, ``--json`` (docs/status.schema.json) and
``--watch``.  The rows themselves come from admin/status.py."""

from __future__ import annotations

import json
import sys
import time
from typing import Optional

import typer

from qemu_locked.admin.common import JSON_OPT, emit_json, table
from qemu_locked.model import config as _config

_CLEAR = "\033[H\033[2J"  # cursor home, clear screen (a terminal only)


def status(
    paths: Optional[list[str]] = typer.Argument(
        None, metavar="PATH", help="Only locks on these files."
    ),
    as_json: bool = JSON_OPT,
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until Ctrl-C."),
    interval: float = typer.Option(
        2.0, "--interval", metavar="S", min=0.1, help="Seconds between refreshes (--watch)."
    ),
) -> None:
    """Every byte-0 lock held on this host (and, with a lockspace backend, on
    every host sharing it): disk, mode, pid, guest, uuid, since, host.

    \b
    --json: docs/status.schema.json; with --watch, one compact JSON object
    per line and refresh.  --watch clears the screen only on a terminal;
    Ctrl-C ends it (exit 0).
    Exit codes: 0 listed (possibly nothing); 2 a PATH does not exist or the
    config is bad.
    """
    cfg = _config.load()
    if not watch:
        if as_json:
            emit_json(report(cfg, paths))
        else:
            sys.stdout.write(text(report(cfg, paths)))
        return
    clear = sys.stdout.isatty() and not as_json
    try:
        while True:
            found = report(cfg, paths)
            if as_json:
                out = json.dumps(found, ensure_ascii=False, separators=(",", ":")) + "\n"
            else:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                head = f"every {interval:g}s: qemu-lockctl status  {stamp}\n\n"
                out = (_CLEAR if clear else "") + head + text(found) + ("" if clear else "\n")
            sys.stdout.write(out)
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return  # Ctrl-C is how a watch ends: exit 0, nothing more to say


def report(cfg: _config.Config, paths: list[str] | None) -> dict[str, list[dict[str, object]]]:
    """What ``--json`` prints: the rows, and the locks no row can name."""
    from qemu_locked.admin import status as _status

    found = _status.status_rows(cfg, paths or None)
    # Named paths were each asked directly; otherwise the kernel's other locks are counted.
    others = [] if paths else _status.unlisted(cfg, found)
    return {"locks": [r.to_json() for r in found], "unlisted": others}


def text(found: dict[str, list[dict[str, object]]]) -> str:
    from qemu_locked.admin.status import footnotes

    rows, others = found["locks"], found["unlisted"]
    out = _table(rows) if rows else ("" if others else "no lock held\n")
    notes = footnotes(rows, others)
    if notes:
        out += ("\n" if rows else "") + "\n".join(notes) + "\n"
    return out


def _table(rows: list[dict[str, object]]) -> str:
    from qemu_locked.model.plan import MODES
    from qemu_locked.model.words import how

    def cell(value: object, key: str = "") -> str:
        if key == "mode" and value in MODES:
            return how(str(value))  # the words of every message; --json keeps the mode
        return "-" if value is None or value == "" else str(value)

    header = ["MODE", "PID", "GUEST", "COMMAND", "UUID", "SINCE", "HOST", "PATH"]
    keys = ["mode", "pid", "guest", "comm", "uuid", "since", "host", "path"]
    if any("origin" in r for r in rows):  # what the supervisor or guard saw put it there
        header.insert(-1, "ORIGIN")
        keys.insert(-1, "origin")
    if any("state" in r for r in rows):  # lease records (held/stale) and pending migrations
        header.insert(1, "STATE")
        keys.insert(1, "state")
    if any(other_key(r) for r in rows):  # a device's stable name, beside the path it was given
        header.append("KEY")
        keys.append("other_key")
        rows = [{**r, "other_key": other_key(r)} for r in rows]
    return table([[cell(r.get(k, "held" if k == "state" else None), k) for k in keys]
                  for r in rows], header)  # fmt: skip


def other_key(row: dict[str, object]) -> str | None:
    """The row's key when it says more than its path (not just ``file:PATH``)."""
    from qemu_locked.lock.keys import display

    key = row.get("key")
    return key if isinstance(key, str) and display(key) != row.get("path") else None
