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

from qemu_locked.lock import ofd, safeopen
from qemu_locked.lock.acquire import take_all
from qemu_locked.lock.held import Held, Pending
from qemu_locked.model.claim import Claim, merged
from qemu_locked.model.errors import BackendError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.model.config import Config
    from qemu_locked.model.errors import Conflict
    from qemu_locked.model.plan import Plan

NAME = "direct"


def claims(plan: Plan) -> list[Claim]:
    """One claim per distinct file (inode) or block device, keyed by that
    identity, in the strongest mode any use needs, in the global lock order."""
    return merged(
        Claim(safeopen.identity_key(safeopen.check(d.path)), d.mode, d.path) for d in plan.disks
    )


def _conflict(fd: int, claim: Claim) -> Conflict:
    from qemu_locked.lock import procfs, unseen  # only on the refusal path

    st = os.fstat(fd)
    found = ofd.conflicting(fd, claim.exclusive)
    mode_hint, pid = found if found else ("exclusive", -1)
    who = procfs.holders_of(st.st_dev, st.st_ino, pid)
    return claim.label, claim.mode, unseen.describe(who, mode_hint, st.st_dev, st.st_ino)


def _block_leases(cls: list[Claim], config: Config | None) -> list[Claim]:
    blocks = [c for c in cls if c.key.startswith("b:")]
    if not blocks:
        return []  # image files only: the lease modules are not even imported
    from qemu_locked.lock import keys

    directory = config.lockspace_dir if config is not None else "(no config)"
    if config is None or not os.path.isdir(directory):
        raise BackendError(
            f"{blocks[0].label}: a block device also needs a lease in lockspace_dir {directory}, "
            "which does not exist (run: qemu-lockctl lockspace init); a lock on its /dev node "
            "alone does not reach VMs with a private /dev (libvirt)"
        )
    return [Claim(keys.disk_key(c.label, os.stat(c.label)), c.mode, c.label) for c in blocks]


def acquire(plan: Plan, config: Config | None, deadline: float, defer: bool = False) -> Held:
    """Lock every claim in global order, all or nothing.

    With ``defer`` (a migration destination) a busy image is not a conflict:
    it stays open and pending, for the keeper.
    """
    cls = claims(plan)
    wants = _block_leases(cls, config)
    held = Held()
    try:
        if wants and config is not None:
            from qemu_locked.backends.lockspace import leases

            me = leases.identity_for(plan, config)
            held.extend(leases.acquire_in(config.lockspace_dir, wants, me, deadline, defer))
        held.extend(_lock_images(cls, deadline, defer))
    except BaseException:
        held.release()
        raise
    return held


def image_locks(plan: Plan, deadline: float, defer: bool = False) -> Held:
    """The byte-0 lock on each image itself, for the backends that key their
    leases by name (lockspace, sanlock): a hard link or a bind mount is another
    name for the same inode, and this lock is what makes them meet on one host.
    A block device's node is locked too, though its lease is keyed by device
    identity already: the fd is how the supervisor knows, after exec, that QEMU's
    open of that device is one of its own (a sanlock lease is no fd of ours)."""
    return _lock_images(claims(plan), deadline, defer)


def image_conflicts(plan: Plan) -> list[Conflict]:
    """:func:`conflicts` for :func:`image_locks`."""
    return _image_conflicts(claims(plan))


def _lock_images(cls: list[Claim], deadline: float, defer: bool) -> Held:
    held = Held()
    fds: dict[str, int] = {}

    def take(claim: Claim, until: float) -> bool:
        fd = safeopen.open_checked(claim.label, claim.exclusive, claim.key)
        held.fds.append(fd)
        fds[claim.key] = fd
        if defer:
            if not ofd.try_lock(fd, claim.exclusive):
                held.pending.append(Pending(fd, claim.exclusive, claim.label))
            return True
        return ofd.lock_until(fd, claim.exclusive, until)

    try:
        take_all(cls, take, lambda c: _conflict(fds[c.key], c), deadline)
    except BaseException:
        held.release()
        raise
    return held


def conflicts(plan: Plan, config: Config | None = None) -> list[Conflict]:
    """What would refuse this plan now.  Takes no lock (F_OFD_GETLK)."""
    cls = claims(plan)
    wants = _block_leases(cls, config)
    out = []
    if wants and config is not None:
        from qemu_locked.backends.lockspace import leases

        out += leases.conflicts_in(config.lockspace_dir, wants)
    named = {c[0] for c in out}  # a device whose lease is busy is reported once (it names the host)
    return out + [c for c in _image_conflicts(cls) if c[0] not in named]


def _image_conflicts(cls: list[Claim]) -> list[Conflict]:
    out = []
    for claim in cls:
        fd = safeopen.open_checked(claim.label, False, claim.key)
        try:
            if ofd.conflicting(fd, claim.exclusive):
                out.append(_conflict(fd, claim))
        finally:
            os.close(fd)
    return out
