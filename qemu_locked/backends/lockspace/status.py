"""``qemu-lockctl status`` rows for a lockspace: every lease, on every host sharing it.

The lock is the truth: a record whose slot is unlocked is ``stale``; a held
lease without a live record is shown with an unknown holder.
"""

from __future__ import annotations

import os

from qemu_locked.backends.lockspace import claims_for_paths, leases
from qemu_locked.lock import keys, ofd
from qemu_locked.model.errors import BackendError
from qemu_locked.model.row import StatusRow, iso_time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.model.config import Config


def status_rows(config: Config, paths: list[str] | None = None) -> list[StatusRow]:
    only: set[str] | None = None
    given: dict[str, str] = {}  # key -> the path status was asked about
    if paths:
        for c in claims_for_paths(paths):
            given.setdefault(c.key, c.label)
        only = {leases.lease_name(k) for k in given}
    space = leases.Lockspace(config.lockspace_dir)
    rows: list[StatusRow] = []
    try:
        for name in space.names():
            if only is not None and name not in only:
                continue
            try:
                fd = space.open_lease(name, create=False, readonly=True)
            except leases.LeaseMissing:
                continue  # removed since we listed the directory
            except BackendError as exc:  # e.g. a symlink planted there: show it, go on
                rows.append(StatusRow(name, None, state=f"unusable: {exc.message}", lease=name,
                                      source="lockspace"))  # fmt: skip
                continue
            try:
                held = ofd.conflicting(fd, True)
                records = leases.read_records(fd, held is not None)
            finally:
                os.close(fd)
            live = [r for r in records if r.live and held]
            for rec in records:
                # By the name the user asked about, else the one the holder was given
                # (/dev/HostVG/vol), else the key; the key beside it.
                path = given.get(rec.key) or rec.path or keys.display(rec.key)
                rows.append(StatusRow(
                    path, rec.mode, rec.pid, rec.host, rec.guest or None,
                    rec.uuid or None, iso_time(rec.since), "held" if rec in live else "stale",
                    "lockspace", lease=name, key=rec.key or None,
                ))  # fmt: skip
            if held and not live:
                rows.append(StatusRow(name, held[0], state="held (no record)", lease=name,
                                      source="lockspace"))  # fmt: skip
    finally:
        space.close()
    return rows
