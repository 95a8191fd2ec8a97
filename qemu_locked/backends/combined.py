"""The whole start: the domain lease (kept in lockspace_dir by every backend
but sanlock, which keeps it among its own leases), then the configured backend,
then -- for the backends that key leases by name -- each image's own byte-0
lock, so that one inode is one lock on a host whatever name reaches it.  The
order is the same for every start of a backend, so waiting starts cannot
deadlock.
"""

from __future__ import annotations

import os

from qemu_locked.backends import load

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.lock.held import Held
    from qemu_locked.model.claim import Claim
    from qemu_locked.model.config import Config
    from qemu_locked.model.errors import Conflict
    from qemu_locked.model.plan import Plan


def domain_claim(plan: Plan, config: Config) -> Claim | None:
    """The domain lease this start takes in lockspace_dir, if any.

    With the direct backend and no lockspace directory set up, there is no
    place for the lease: doctor says so, and the start goes on without it.
    """
    if not config.domain_lease or config.backend == "sanlock":
        return None  # sanlock keeps the domain lease among its own leases
    if not (plan.uuid or plan.guest):
        return None
    if config.backend == "direct" and not os.path.isdir(config.lockspace_dir):
        return None
    from qemu_locked.lock.keys import domain_key, domain_label
    from qemu_locked.model.claim import Claim

    key = domain_key(plan.uuid, plan.guest)
    return None if key is None else Claim(key, "exclusive", domain_label(plan.uuid, plan.guest))


def acquire_all(plan: Plan, config: Config, deadline: float) -> Held | None:
    """Domain lease first (a global rule, so no lock-order cycle), then the disks,
    all by one ``deadline``.

    A migration destination (``-incoming``) defers what is busy: the source
    holds it until the migration ends.  Deferred locks come back in
    ``Held.pending`` for the keeper.
    """
    from qemu_locked.lock.held import Held

    defer = plan.incoming is not None
    held = Held()
    try:
        domain = domain_claim(plan, config)
        if domain is not None:
            from qemu_locked.backends.lockspace import leases

            me = leases.identity_for(plan, config)
            held.extend(leases.acquire_in(config.lockspace_dir, [domain], me, deadline, defer))
        if plan.disks or _backend_keeps_domain_lease(plan, config):
            held.extend(load(config.backend).acquire(plan, config, deadline, defer=defer))
        if plan.disks and config.backend != "direct":
            from qemu_locked.backends import direct

            held.extend(direct.image_locks(plan, deadline, defer))
    except BaseException:
        held.abandon()  # the domain lease's record too: a refused start leaves none
        raise
    return held if held.fds or held.pending else None


def conflicts_all(plan: Plan, config: Config) -> list[Conflict]:
    out: list[Conflict] = []
    domain = domain_claim(plan, config)
    if domain is not None:
        from qemu_locked.backends.lockspace import leases

        out += leases.conflicts_in(config.lockspace_dir, [domain])
    if plan.disks or _backend_keeps_domain_lease(plan, config):
        out += load(config.backend).conflicts(plan, config)
    if plan.disks and config.backend != "direct":
        from qemu_locked.backends import direct

        named = {c[0] for c in out}  # a disk whose lease is busy is reported once
        out += [c for c in direct.image_conflicts(plan) if c[0] not in named]
    return out


def _backend_keeps_domain_lease(plan: Plan, config: Config) -> bool:
    """sanlock holds the domain lease among its own leases, even with no disk."""
    return config.backend == "sanlock" and config.domain_lease and bool(plan.uuid or plan.guest)
