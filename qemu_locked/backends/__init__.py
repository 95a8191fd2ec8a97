"""Lock backends: one module each, chosen explicitly by config ``backend``.

Every backend module provides:

``acquire(plan, config, wait) -> Held``
    take every lock (polling up to ``wait`` seconds, in a global order), or
    raise LockedError / DiskError / BackendError having released whatever it
    took.  ``Held.fds`` must stay open, and be inherited by QEMU, for as long
    as the locks must be held.
``conflicts(plan, config) -> list[(resource, wanted mode, holders)]``
    what would refuse this plan right now, taking nothing.

``acquire_all`` adds the domain lease, which every backend shares.
"""

from __future__ import annotations

import os

from qemu_locked.model.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

    from qemu_locked.backends.lockspace.leases import Want
    from qemu_locked.lock.held import Held
    from qemu_locked.model.config import Config
    from qemu_locked.model.plan import Plan


def load(name: str) -> ModuleType:
    """The backend module for a config ``backend`` value.  Never a fallback."""
    if name == "direct":
        from qemu_locked.backends import direct

        return direct
    if name == "lockspace":
        from qemu_locked.backends import lockspace

        return lockspace
    if name == "sanlock":
        from qemu_locked.backends.sanlock import start as sanlock

        return sanlock  # type: ignore[no-any-return,unused-ignore]
    raise ConfigError("backend", None, f"unknown backend {name!r}")


def domain_lease_wanted(plan: Plan, config: Config) -> Want | None:
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
    from qemu_locked.backends.lockspace.leases import Want
    from qemu_locked.lock.keys import domain_key, domain_label

    key = domain_key(plan.uuid, plan.guest)
    return None if key is None else Want(key, "exclusive", domain_label(plan.uuid, plan.guest))


def acquire_all(plan: Plan, config: Config) -> Held | None:
    """Domain lease first (a global rule, so no lock-order cycle), then the disks.

    A migration destination (``-incoming``) defers what is busy: the source
    holds it until the migration ends.  Deferred locks come back in
    ``Held.pending`` for the keeper.
    """
    from qemu_locked.lock.held import Held

    defer = plan.incoming is not None
    held = Held()
    try:
        domain = domain_lease_wanted(plan, config)
        if domain is not None:
            from qemu_locked.backends.lockspace import leases

            me = leases.holder_for(plan, config)
            held.extend(leases.acquire_in(config.lockspace_dir, [domain], me, config.wait, defer))
        if plan.disks or _backend_keeps_domain_lease(plan, config):
            held.extend(load(config.backend).acquire(plan, config, config.wait, defer=defer))
    except BaseException:
        held.release()
        raise
    return held if held.fds or held.pending else None


def conflicts_all(plan: Plan, config: Config) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    domain = domain_lease_wanted(plan, config)
    if domain is not None:
        from qemu_locked.backends.lockspace import leases

        out += leases.conflicts_in(config.lockspace_dir, [domain])
    if plan.disks or _backend_keeps_domain_lease(plan, config):
        out += load(config.backend).conflicts(plan, config)
    return out


def _backend_keeps_domain_lease(plan: Plan, config: Config) -> bool:
    """sanlock holds the domain lease among its own leases, even with no disk."""
    return config.backend == "sanlock" and config.domain_lease and bool(plan.uuid or plan.guest)
