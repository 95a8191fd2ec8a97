"""The rows of ``qemu-lockctl status``: who holds which byte-0 lock.

:func:`status_rows` is the one entry point.  Its rows come from the OFD
locks this host can see in /proc (every backend locks that way here); a
backend whose locks reach beyond this host (lockspace records, sanlock)
adds rows of its own through :func:`backend_rows`.  A row is a plain dict
with at least ``path, mode, pid, host, guest, uuid, since`` so that
``--json`` stays stable whatever produced it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from qemu_locked.lock import holders
from qemu_locked.model.config import Config
from qemu_locked.model.errors import UsageError

Row = dict[str, object]

COLUMNS = ("path", "mode", "pid", "host", "guest", "uuid", "since")


def iso_time(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _identities(paths: Iterable[str]) -> set[tuple[int, int]]:
    out: set[tuple[int, int]] = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror}") from None
        except ValueError:
            raise UsageError(f"{path}: path contains a NUL byte") from None
        out.add((st.st_dev, st.st_ino))
    return out


def local_rows(config: Config, paths: list[str] | None = None) -> list[Row]:
    """Every byte-0 OFD lock held through a process this host lets us see."""
    match = _identities(paths) if paths else None
    host = config.effective_host()
    seen: set[tuple[int, int, int, str]] = set()
    procs: dict[int, tuple[str | None, str | None, str, float | None]] = {}
    rows: list[Row] = []
    for lock in holders.scan(match):
        if lock.kind != "OFDLCK":
            continue  # POSIX/flock locks at byte 0 are pidfiles and such, not ours
        key = (lock.pid, lock.dev, lock.ino, lock.mode)
        if key in seen:
            continue  # the same open file description reached through a dup'd fd
        seen.add(key)
        if lock.pid not in procs:
            guest, uuid, comm = holders.guest_of(lock.pid)
            procs[lock.pid] = (guest, uuid, comm, holders.start_time(lock.pid))
        guest, uuid, comm, since = procs[lock.pid]
        rows.append(
            {
                "path": lock.path,
                "mode": lock.mode,
                "pid": lock.pid,
                "host": host,
                "guest": guest,
                "uuid": uuid,
                "since": iso_time(since),
                "comm": comm,
                "fd": lock.fd,
                "source": "ofd",
            }
        )
    return rows


def backend_rows(config: Config, paths: list[str] | None = None) -> list[Row]:
    """Rows a backend knows beyond this host's /proc (none for ``direct``).

    A backend module may define ``status_rows(config, paths) -> list[dict]``;
    its rows are added as they are (duplicates of local rows are dropped by
    :func:`status_rows`).
    """
    from qemu_locked import backends

    if config.backend == "direct":
        # Domain leases live in lockspace_dir whatever the backend.
        if not os.path.isdir(config.lockspace_dir):
            return []
        from qemu_locked.backends import lockspace

        return lockspace.status_rows(config, paths)

    try:
        module = backends.load(config.backend)
    except ImportError:
        return []
    fn = getattr(module, "status_rows", None)
    if fn is None:
        return []
    extra: list[Row] = fn(config, paths)
    return extra


def status_rows(config: Config, paths: list[str] | None = None) -> list[Row]:
    """All rows, local first, sorted by path then pid.

    Lease files seen through /proc are left to the lockspace rows, which name
    the resource (image path or domain) instead of a hashed file name.  Locks
    that a migration keeper still waits for are rows in state ``pending``.
    """
    from qemu_locked.beside import keeper

    space = os.path.realpath(config.lockspace_dir) + os.sep
    rows = [r for r in local_rows(config, paths) if not str(r["path"]).startswith(space)]
    rows += keeper.pending_rows(config.effective_host(), space)
    have = {(r["path"], r["pid"], r["host"]) for r in rows}
    for row in backend_rows(config, paths):
        if (row.get("path"), row.get("pid"), row.get("host")) not in have:
            rows.append({c: row.get(c) for c in COLUMNS} | row)
    rows.sort(key=lambda r: (str(r["path"]), str(r["host"]), int(str(r["pid"] or 0))))
    return rows


__all__ = ["COLUMNS", "Row", "backend_rows", "iso_time", "local_rows", "status_rows"]
