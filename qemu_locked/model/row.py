"""One row of ``qemu-lockctl status``: who holds which resource, in which mode.

Every producer (this host's /proc, lockspace records, sanlock owners, the
migration keeper) builds this one type, so ``--json`` has one shape.
"""

from __future__ import annotations

import time

from qemu_locked.model.value import frozen

# Always present in --json (null when unknown); the rest only when set.
COLUMNS = ("path", "mode", "pid", "host", "guest", "uuid", "since")


def iso_time(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@frozen
class StatusRow:
    path: str
    mode: str | None
    pid: int | None = None
    host: str | None = None
    guest: str | None = None
    uuid: str | None = None
    since: str | None = None  # ISO 8601, UTC
    state: str | None = None  # held | stale | pending ... | unusable: ...
    source: str | None = None  # ofd | lockspace | lease | sanlock
    comm: str | None = None
    fd: int | None = None
    lease: str | None = None
    keeper: int | None = None
    host_id: int | None = None
    slot: int | None = None
    origin: str | None = None  # what put it there, as the monitor guard saw it
    held_by: str | None = None  # who holds it, when no pid/record names the holder
    key: str | None = None  # the stable resource key (lock/keys.py) of what path names

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for name in type(self)._names_:  # type: ignore[attr-defined]
            value = getattr(self, name)
            if value is not None or name in COLUMNS:
                out[name] = value
        return out

    def identity(self) -> tuple[str, int | None, str | None]:
        """Rows with the same identity describe one holding (first one wins): one
        resource (by key where known: a device's lease and its /dev node are one),
        one holder."""
        return self.key or self.path, self.pid, self.host
