"""The ``direct`` backend: an OFD lock on byte 0 of each image itself.

Cluster-wide wherever the filesystem forwards OFD locks to a lock server
(NFSv4, CephFS, GPFS); host-local otherwise.
"""

from __future__ import annotations

import os
import time

from qemu_locked import holders, images, ofd
from qemu_locked._value import frozen
from qemu_locked.errors import LockedError
from qemu_locked.held import Held, Pending
from qemu_locked.model import EXCLUSIVE, SHARED, Plan, stronger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.config import Config


@frozen
class Target:
    key: tuple[str, int, int]
    path: str
    mode: str
    origin: str


def targets(plan: Plan) -> list[Target]:
    """One target per distinct file (inode) or block device, in the strongest
    mode any use needs, sorted into the global lock order."""
    by_key: dict[tuple[str, int, int], Target] = {}
    for disk in plan.disks:
        key = images.identity(images.check(disk.path))
        prev = by_key.get(key)
        if prev is None:
            by_key[key] = Target(key, disk.path, disk.mode, disk.origin)
        else:
            by_key[key] = Target(key, prev.path, stronger(prev.mode, disk.mode), prev.origin)
    return [by_key[k] for k in sorted(by_key)]


def _conflict(fd: int, target: Target) -> tuple[str, str, str]:
    st = os.fstat(fd)
    found = ofd.conflicting(fd, target.mode == EXCLUSIVE)
    mode_hint, pid = found if found else (EXCLUSIVE, -1)
    who = holders.holders_of(st.st_dev, st.st_ino, pid)
    return target.path, target.mode, holders.describe(who, mode_hint)


def acquire(
    plan: Plan, config: Config | None = None, wait: float = 0.0, defer: bool = False
) -> Held:
    """Lock every target in global order, all or nothing.

    After the first conflict the rest are only tried (not waited for), so the
    refusal names every holder at once.  With ``defer`` (a migration
    destination) a busy image is not a conflict: it stays open and pending.
    """
    held = Held()
    try:
        deadline = time.monotonic() + wait
        conflicts: list[tuple[str, str, str]] = []
        for target in targets(plan):
            exclusive = target.mode == EXCLUSIVE
            fd = images.open_checked(target.path, exclusive, target.key)
            held.fds.append(fd)
            if defer:
                if not ofd.try_lock(fd, exclusive):
                    held.pending.append(Pending(fd, exclusive, target.path))
            elif not ofd.lock_until(fd, exclusive, 0.0 if conflicts else deadline):
                conflicts.append(_conflict(fd, target))
        if conflicts:
            raise LockedError(conflicts)
    except BaseException:
        held.release()
        raise
    return held


def conflicts(plan: Plan, config: Config | None = None) -> list[tuple[str, str, str]]:
    """What would refuse this plan now.  Takes no lock (F_OFD_GETLK)."""
    out = []
    for target in targets(plan):
        fd = images.open_checked(target.path, False, target.key)
        try:
            if ofd.conflicting(fd, target.mode == EXCLUSIVE):
                out.append(_conflict(fd, target))
        finally:
            os.close(fd)
    return out


__all__ = ["EXCLUSIVE", "SHARED", "Held", "Target", "acquire", "conflicts", "targets"]
