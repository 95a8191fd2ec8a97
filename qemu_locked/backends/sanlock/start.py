"""The sanlock backend's start path: register, take every lease, hand the
registration fd to QEMU (see the package docstring for the lease layout)."""

from __future__ import annotations

import os
import time

from qemu_locked.backends.sanlock.area import (
    Area,
    Lease,
    describe_owners,
    host_names,
    locate,
    owners,
    probe,
    take,
)  # fmt: skip
from qemu_locked.backends.sanlock.binding import E_EXIST, binding, daemon_error
from qemu_locked.lock import held as _held
from qemu_locked.lock import safeopen
from qemu_locked.lock.acquire import NO_WAIT, take_all
from qemu_locked.lock.keys import disk_key, domain_key, domain_label
from qemu_locked.model.claim import Claim, merged
from qemu_locked.model.errors import Conflict
from qemu_locked.model.plan import EXCLUSIVE, SHARED, Plan

NAME = "sanlock"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

    from qemu_locked.model.config import Config


def claims(plan: Plan, config: Config) -> list[Claim]:
    """One claim per distinct resource key (the domain lease too), in key order."""
    out = [Claim(disk_key(d.path, safeopen.check(d.path)), d.mode, d.path) for d in plan.disks]
    if config.domain_lease:
        dkey = domain_key(plan.uuid, plan.guest)
        if dkey is not None:
            out.append(Claim(dkey, EXCLUSIVE, domain_label(plan.uuid, plan.guest)))
    return merged(out)


def leases(plan: Plan, config: Config) -> list[Lease]:
    return [Lease(c.key, c.label, c.mode) for c in claims(plan, config)]


class Held(_held.Held):
    """The registration fd: the daemon holds our leases for as long as the
    process that registered (QEMU, after exec) keeps it open or lives."""

    def __init__(self, fd: int | None = None) -> None:
        super().__init__([] if fd is None else [fd])
        self.leases: list[Lease] = []


class _KeeperRegistration:
    """The migration keeper's own registration, made in the keeper process."""

    fd = -1


class SanlockPending(_held.Pending):
    """A lease the migration source still holds, for the keeper.

    sanlock leases belong to the registered process that acquired them; the
    keeper cannot hand them to QEMU, so it registers itself, takes them, and
    holds them until QEMU exits (``holds_for_life``).  Trade-off: if the keeper
    alone is killed, or sanlock kills it when the lockspace is lost, those
    leases go while the VM runs on; a VM started normally has no such gap.
    """

    holds_for_life = True

    def __init__(self, area: Area, lease: Lease) -> None:
        super().__init__(-1, lease.mode == EXCLUSIVE, lease.label)
        self.area = area
        self.lease_ = lease

    def try_take(self) -> bool:
        sl = binding()
        if _KeeperRegistration.fd < 0:
            _KeeperRegistration.fd = sl.register()
        lease = self.lease_
        code = take(sl, self.area, lease.name.encode(), self.area.disk(lease.slot),
                     lease.mode == SHARED, _KeeperRegistration.fd, time.monotonic(),
                     lease.label)  # fmt: skip
        return code == 0

    def holders(self) -> str:
        found = owners(binding(), self.area, self.lease_)
        return describe_owners(found, host_names(self.area) if found else {})


def _release_all(sl: ModuleType, area: Area, held: Held) -> None:
    """Release explicitly (synchronous in the daemon) before closing the fd,
    so a refused start leaves nothing held even for a moment after it exits."""
    for lease in held.leases:
        try:
            sl.release(
                area.lockspace, lease.name.encode(), area.disk(lease.slot), slkfd=held.fds[0]
            )
        except (sl.SanlockException, IndexError):
            pass
    held.leases = []
    held.release()


def release(held: _held.Held, config: Config) -> None:
    """Let go of what ``acquire`` took, at once, even while another process (QEMU,
    given the registration fd by the monitor guard) still has the fd open."""
    if isinstance(held, Held):
        _release_all(binding(), Area(config), held)
    else:
        held.release()


def acquire(plan: Plan, config: Config, deadline: float, defer: bool = False) -> Held:
    """Register with the daemon and take every lease, all or nothing.

    With ``defer`` (a migration destination) a lease a real holder has is
    left to the keeper.
    """
    todo = leases(plan, config)
    if not todo:
        return Held()
    sl = binding()
    area = Area(config)
    try:
        fd = sl.register()
    except sl.SanlockException as exc:
        raise daemon_error(exc, "register") from None
    os.set_inheritable(fd, False)  # until the wrapper hands it to QEMU
    held = Held(fd)
    codes: dict[str, int] = {}

    def take_one(lease: Lease, until: float) -> bool:
        lease.slot = locate(sl, area, lease, fd, max(0.0, deadline - time.monotonic()))
        code = take(sl, area, lease.name.encode(), area.disk(lease.slot), lease.mode == SHARED,
                    fd, NO_WAIT if defer else until, lease.label)  # fmt: skip
        if code and defer:
            held.pending.append(SanlockPending(area, lease))
            return True
        if code:
            codes[lease.key] = code
            return False
        held.leases.append(lease)
        return True

    try:
        take_all(todo, take_one, lambda lease: _conflict(sl, area, lease, codes[lease.key]),
                 deadline)  # fmt: skip
    except BaseException:
        _release_all(sl, area, held)
        raise
    return held


def _conflict(sl: ModuleType, area: Area, lease: Lease, code: int) -> Conflict:
    found = owners(sl, area, lease)
    text = describe_owners(found, host_names(area) if found else {})
    if code == E_EXIST and not found:
        text = "(exclusive) by another process on this host"
    return lease.label, lease.mode, text


def conflicts(plan: Plan, config: Config) -> list[Conflict]:
    """What would refuse this plan now, from the owners on storage.  Takes nothing."""
    sl = binding()
    area = Area(config)
    names: dict[int, str] | None = None
    out = []
    for lease in leases(plan, config):
        lease.slot = probe(sl, area, lease, creating=False)
        if lease.slot < 0:
            continue  # not created yet: nobody can hold it
        found = owners(sl, area, lease)
        if lease.mode == SHARED:
            found = [o for o in found if o[2] == EXCLUSIVE]
        if found:
            if names is None:
                names = host_names(area)
            out.append((lease.label, lease.mode, describe_owners(found, names)))
    return out
