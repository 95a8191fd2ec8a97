"""The ``lockspace`` backend: one lease file per disk in ``lockspace_dir``.

Images are never opened, only stat()ed for their identity; the leases are
keyed by stable resource keys (qemu_locked.keys), so a shared filesystem
mounted at ``lockspace_dir`` extends the protection to every host using it,
block devices included.
"""

from __future__ import annotations

import os

from qemu_locked.backends.lockspace import leases
from qemu_locked.lock import keys
from qemu_locked.lock import safeopen as images

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.lock.held import Held
    from qemu_locked.model.config import Config
    from qemu_locked.model.plan import Plan


def wants(plan: Plan) -> list[leases.Want]:
    out = []
    for disk in plan.disks:
        st = images.check(disk.path)
        out.append(leases.Want(keys.disk_key(disk.path, st), disk.mode, disk.path))
    return out


def acquire(plan: Plan, config: Config, wait: float = 0.0, defer: bool = False) -> Held:
    me = leases.holder_for(plan, config)
    return leases.acquire_in(config.lockspace_dir, wants(plan), me, wait, defer)


def conflicts(plan: Plan, config: Config) -> list[tuple[str, str, str]]:
    return leases.conflicts_in(config.lockspace_dir, wants(plan))


def status_rows(config: Config, paths: list[str] | None = None) -> list[dict[str, object]]:
    """Every lease in the lockspace with its holders, on every host sharing it.

    The lock is the truth: a record whose slot is unlocked is ``stale``; a
    held lease without a live record is shown with an unknown holder.
    """
    from qemu_locked.admin.status import iso_time
    from qemu_locked.lock import ofd
    from qemu_locked.model.errors import BackendError

    only: set[str] | None = None
    if paths:
        only = {leases.lease_name(w.key) for w in wants_for_paths(paths)}
    space = leases.Lockspace(config.lockspace_dir)
    rows: list[dict[str, object]] = []
    try:
        for name in space.names():
            if only is not None and name not in only:
                continue
            try:
                fd = space.open_lease(name, create=False, readonly=True)
            except leases.LeaseMissing:
                continue  # removed since we listed the directory
            except BackendError as exc:  # e.g. a symlink planted there: show it, go on
                rows.append({"path": name, "mode": None, "pid": None, "host": None,
                             "guest": None, "uuid": None, "since": None,
                             "state": f"unusable: {exc.message}", "lease": name,
                             "source": "lockspace"})  # fmt: skip
                continue
            try:
                held = ofd.conflicting(fd, True)
                records = leases.read_records(fd, held is not None)
            finally:
                os.close(fd)
            live = [r for r in records if r.live and held]
            for rec in records:
                state = "held" if rec in live else "stale"
                rows.append({
                    "path": keys.display(rec.key), "mode": rec.mode, "pid": rec.pid,
                    "host": rec.host, "guest": rec.guest or None, "uuid": rec.uuid or None,
                    "since": iso_time(rec.since), "state": state, "lease": name,
                    "source": "lockspace",
                })  # fmt: skip
            if held and not live:
                rows.append({
                    "path": name, "mode": held[0], "pid": None, "host": None, "guest": None,
                    "uuid": None, "since": None, "state": "held (no record)", "lease": name,
                    "source": "lockspace",
                })  # fmt: skip
    finally:
        space.close()
    return rows


def wants_for_paths(paths: list[str]) -> list[leases.Want]:
    out = []
    for path in paths:
        st = images.check(path)
        out.append(leases.Want(keys.disk_key(path, st), "shared", path))
    return out
