"""The ``direct`` backend: an OFD lock on byte 0 of each image itself.

Cluster-wide wherever the filesystem forwards OFD locks to a lock server
(NFSv4, CephFS, GPFS); host-local otherwise.

Block devices get a lease in ``lockspace_dir`` too, keyed by the device's
identity: a lock on a /dev node is a lock on that node's inode, and libvirt
gives every QEMU a private /dev with nodes of its own, so two VMs on one
device would lock two different inodes (measured under libvirt 9).  Without
a lockspace directory such a start is refused rather than left unprotected.
"""

from __future__ import annotations

import os
import time

from qemu_locked.lock import ofd
from qemu_locked.lock import safeopen as images
from qemu_locked.lock.held import Held, Pending
from qemu_locked.model.errors import BackendError, LockedError
from qemu_locked.model.plan import EXCLUSIVE, SHARED, Plan, stronger
from qemu_locked.model.value import frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.backends.lockspace.leases import Want
    from qemu_locked.model.config import Config


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
    from qemu_locked.lock import holders  # only on the refusal path

    st = os.fstat(fd)
    found = ofd.conflicting(fd, target.mode == EXCLUSIVE)
    mode_hint, pid = found if found else (EXCLUSIVE, -1)
    who = holders.holders_of(st.st_dev, st.st_ino, pid)
    return target.path, target.mode, holders.describe(who, mode_hint)


def _block_leases(tgts: list[Target], config: Config | None) -> list[Want]:
    blocks = [t for t in tgts if t.key[0] == "b"]
    if not blocks:
        return []  # image files only: the lease modules are not even imported
    from qemu_locked.backends.lockspace import leases
    from qemu_locked.lock import keys

    directory = config.lockspace_dir if config is not None else "(no config)"
    if config is None or not os.path.isdir(directory):
        raise BackendError(
            f"{blocks[0].path}: a block device also needs a lease in lockspace_dir {directory}, "
            "which does not exist (run: qemu-lockctl lockspace init); a lock on its /dev node "
            "alone does not reach VMs with a private /dev (libvirt)"
        )
    return [leases.Want(keys.disk_key(t.path, os.stat(t.path)), t.mode, t.path) for t in blocks]


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
        tgts = targets(plan)
        wants = _block_leases(tgts, config)
        if wants and config is not None:
            from qemu_locked.backends.lockspace import leases

            me = leases.holder_for(plan, config)
            held.extend(leases.acquire_in(config.lockspace_dir, wants, me, wait, defer))
        for target in tgts:
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
    tgts = targets(plan)
    wants = _block_leases(tgts, config)
    out = []
    if wants and config is not None:
        from qemu_locked.backends.lockspace import leases

        out += leases.conflicts_in(config.lockspace_dir, wants)
    for target in tgts:
        fd = images.open_checked(target.path, False, target.key)
        try:
            if ofd.conflicting(fd, target.mode == EXCLUSIVE):
                out.append(_conflict(fd, target))
        finally:
            os.close(fd)
    return out


__all__ = ["EXCLUSIVE", "SHARED", "Held", "Target", "acquire", "conflicts", "targets"]
