"""qemu-lockctl log: the audit trail read back (model/audit.py writes it).

From journald (``journalctl -t qemu-locked -o json``) when it runs here, else
from a file rsyslog writes: config ``audit_file``, else the first of
/var/log/syslog, /var/log/messages, /var/log/daemon.log that exists.  Set,
``audit_file`` wins over journald (a host whose rsyslog keeps the longer
history).  A file line starts with the daemon's timestamp: RFC 3339 (rsyslog's
``RSYSLOG_FileFormat``, Debian 13's default) or the traditional
``Mmm dd hh:mm:ss`` (Debian 12's, local time, no year: the latest such date
not in the future).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime
from typing import Optional

import typer

from qemu_locked.admin.common import JSON_OPT, emit_json, table
from qemu_locked.model import config as _config
from qemu_locked.model.audit import FIELDS, TAG, Event, parse_event
from qemu_locked.model.errors import LogUnreadable, UsageError

DEFAULT_FILES = ("/var/log/syslog", "/var/log/messages", "/var/log/daemon.log")
JOURNAL_SOCKET = "/run/systemd/journal/socket"  # journald runs here
_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400}
_MARK = f" {TAG}[".encode()


def parse_since(text: str, now: float) -> float:
    """``10min``, ``1h``, ``2d``, ``30s`` ago, or an ISO time (local unless it
    says its offset): epoch seconds."""
    digits = len(text) - len(text.lstrip("0123456789"))
    unit = text[digits:].strip()
    if digits and unit in _UNITS:
        return now - int(text[:digits]) * _UNITS[unit]
    try:
        return datetime.fromisoformat(text.replace(" ", "T", 1)).timestamp()
    except ValueError:
        raise UsageError(
            f"--since {text!r}: give a time ago (30s, 10min, 1h, 2d) or an ISO time "
            "(2026-12-06 or 2026-12-06T12:30)"
        ) from None


def file_line(raw: bytes, now: float) -> Event | None:
    """One line of a syslog file, if it is ours."""
    at = raw.find(_MARK)
    colon = raw.find(b"]: ", at)
    if at < 0 or colon < 0:
        return None
    head = raw[:at].decode("ascii", "replace").split()
    message = raw[colon + 3 :].rstrip(b"\n").decode("utf-8", "surrogateescape")
    return parse_event(message, _stamp(head, now))


def _stamp(head: list[str], now: float) -> float | None:
    """The time of ``TIMESTAMP HOST`` (RFC 3339) or ``Mmm dd hh:mm:ss HOST``."""
    try:
        if head and head[0][:1].isdigit():
            return datetime.fromisoformat(head[0]).timestamp()
        if len(head) >= 3:
            year = time.localtime(now).tm_year
            for y in (year, year - 1):  # no year in the line: the latest not in the future
                t = time.mktime(time.strptime(f"{y} {' '.join(head[:3])}", "%Y %b %d %H:%M:%S"))
                if t <= now + 86400:
                    return t
    except (ValueError, OverflowError):
        pass
    return None


def journal_record(record: dict[str, object]) -> Event | None:
    """One record of ``journalctl -o json``: MESSAGE is a string, or a list of
    bytes when it is not UTF-8; __REALTIME_TIMESTAMP is in microseconds."""
    message = record.get("MESSAGE")
    if isinstance(message, list):
        message = bytes(b for b in message if isinstance(b, int)).decode("utf-8", "surrogateescape")
    if not isinstance(message, str):
        return None
    stamp = record.get("__REALTIME_TIMESTAMP")
    when = int(stamp) / 1e6 if isinstance(stamp, str) and stamp.isdigit() else None
    return parse_event(message, when)


def read(cfg: _config.Config, since: float | None, now: float) -> tuple[str, list[Event]]:
    """(where it was read, the events in it) from journald or a file; ``since``
    only spares journalctl the older ones (the caller filters)."""
    if not cfg.audit_file and os.path.exists(JOURNAL_SOCKET):
        import shutil

        journalctl = shutil.which("journalctl")
        if journalctl:
            return "the journal", _journal(journalctl, since)
    path = cfg.audit_file or next((p for p in DEFAULT_FILES if os.path.exists(p)), "")
    if not path:
        raise LogUnreadable(
            f"no system log to read: no journald here, and none of {', '.join(DEFAULT_FILES)} "
            "exists (config audit_file names another)"
        )
    try:
        with open(path, "rb") as f:
            events = [ev for raw in f if _MARK in raw and (ev := file_line(raw, now)) is not None]
    except OSError as exc:
        # Debian's rsyslog writes them root:adm 0640
        hint = " (group adm may read it)" if exc.errno == 13 and path in DEFAULT_FILES else ""
        raise LogUnreadable(f"cannot read {path}: {exc.strerror}{hint}") from None
    return path, events


def _journal(journalctl: str, since: float | None) -> list[Event]:
    import json
    import subprocess

    cmd = [journalctl, "-t", TAG, "-o", "json", "--no-pager", "-q"]
    if since is not None:
        cmd.append(f"--since=@{int(since)}")
    r = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    if r.returncode != 0:
        why = (r.stderr.decode("utf-8", "replace").strip().splitlines() or ["failed"])[-1]
        raise LogUnreadable(f"cannot read the journal: journalctl: {why}")
    out = []
    for line in r.stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        ev = journal_record(record) if isinstance(record, dict) else None
        if ev is not None:
            out.append(ev)
    return out


def matches(ev: Event, wanted: set[str]) -> bool:
    return ev.path in wanted or ev.key in wanted


def names_of(path: str) -> set[str]:
    """What a PATH argument matches: as given, absolute, canonical, and its key
    (another name of the same disk: a symlink, /dev/disk/by-id/...)."""
    out = {path, os.path.abspath(path), os.path.realpath(path)}
    from qemu_locked.lock.keys import disk_key
    from qemu_locked.model.errors import QemuLockedError

    try:
        out.add(disk_key(path, os.stat(path)))
    except (OSError, ValueError, QemuLockedError):
        pass
    return out


def _when(t: float | None, spec: str = "auto") -> str | None:
    """Local ISO time: to the microsecond when the log has it (RFC 3339, journald)."""
    return None if t is None else datetime.fromtimestamp(t).astimezone().isoformat("T", spec)


def to_json(ev: Event) -> dict[str, object]:
    return {"time": _when(ev.time), **{name: getattr(ev, name) for name in FIELDS}}


def log(
    path: Optional[str] = typer.Argument(
        None, metavar="PATH", help="Only lines about this disk (its path or key)."
    ),
    since: Optional[str] = typer.Option(
        None, "--since", metavar="WHEN", help="Only lines since WHEN: 30s, 10min, 1h, 2d, or ISO."
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """The audit trail: every refusal, lock and keeper timeout qemu-locked logged.

    \b
    Read from journald when it runs here, else from config audit_file, else the
    first of /var/log/syslog, /var/log/messages, /var/log/daemon.log.
    Exit codes: 0 listed (possibly nothing); 2 a bad --since or config; 4 the
    log cannot be read (none found, permission).
    """
    cfg = _config.load()
    now = time.time()
    start = None if since is None else parse_since(since, now)
    where, events = read(cfg, start, now)
    if start is not None:
        events = [ev for ev in events if ev.time is not None and ev.time >= start]
    if path is not None:
        wanted = names_of(path)
        events = [ev for ev in events if matches(ev, wanted)]
    if as_json:
        emit_json([to_json(ev) for ev in events])
        return
    if not events:
        sys.stdout.write(f"no audit line in {where}\n")
        return

    def cell(value: object) -> str:
        return "-" if value is None or value == "" else str(value)

    def words_of(row: dict[str, object]) -> dict[str, object]:
        """MODE in the words of every message: what a refused VM asked for (write,
        read), how a lock taken or let go was held (writing, sharing); --json keeps it."""
        from qemu_locked.model.plan import MODES
        from qemu_locked.model.words import how, want

        mode = row["mode"]
        if mode not in MODES:
            return row
        asked = row["action"] in ("refused", "timeout", "failed")
        return dict(row, mode=want(str(mode)) if asked else how(str(mode)))

    header = ["TIME", "ACTION", "MODE", "GUEST", "PID", "HOST", "PATH", "ORIGIN", "HOLDER"]
    keys = ["time", "action", "mode", "guest", "pid", "host", "path", "origin", "holder"]
    if any(ev.detail for ev in events):
        header.append("DETAIL")
        keys.append("detail")
    rows = [words_of(dict(to_json(ev), time=_when(ev.time, "seconds"))) for ev in events]
    sys.stdout.write(table([[cell(r[k]) for k in keys] for r in rows], header))
