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

from qemu_locked.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

    from qemu_locked.config import Config
    from qemu_locked.held import Held
    from qemu_locked.model import Plan


def load(name: str) -> ModuleType:
    """The backend module for a config ``backend`` value.  Never a fallback."""
    if name == "direct":
        from qemu_locked.backends import direct

        return direct
    if name == "lockspace":
        from qemu_locked.backends import lockspace

        return lockspace
    if name == "sanlock":
        from qemu_locked.backends import sanlock  # type: ignore[attr-defined,unused-ignore]

        return sanlock  # type: ignore[no-any-return,unused-ignore]
    raise ConfigError("backend", None, f"unknown backend {name!r}")


def domain_lease_wanted(plan: Plan, config: Config) -> str | None:
    """The domain lease key, when this start should take one.

    With the direct backend and no lockspace directory set up, there is no
    place for the lease: doctor and plan say so, the start goes on.
    """
    if not config.domain_lease or config.backend == "sanlock":
        return None  # sanlock keeps the domain lease among its own leases
    if not (plan.uuid or plan.guest):
        return None
    if config.backend == "direct" and not os.path.isdir(config.lockspace_dir):
        return None
    from qemu_locked.keys import domain_key

    return domain_key(plan.uuid, plan.guest)


def acquire_all(plan: Plan, config: Config) -> Held | None:
    """Domain lease first (a global rule, so no lock-order cycle), then the disks.

    A migration destination (``-incoming``) defers what is busy: the source
    holds it until the migration ends.  Deferred locks come back in
    ``Held.pending`` for the keeper.
    """
    from qemu_locked.held import Held

    defer = plan.incoming is not None
    held = Held()
    try:
        key = domain_lease_wanted(plan, config)
        if key is not None:
            from qemu_locked import leases

            space = leases.Lockspace(config.lockspace_dir)
            try:
                label = f"domain {plan.uuid or plan.guest}"
                me = leases.Holder(config.effective_host(), plan.guest, plan.uuid, os.getpid())
                want = [leases.Want(key, "exclusive", label)]
                held.extend(leases.acquire(space, want, me, config.wait, defer))
            finally:
                space.close()
        if plan.disks or _backend_keeps_domain_lease(plan, config):
            backend = load(config.backend)
            if defer:
                held.extend(backend.acquire(plan, config, config.wait, defer=True))
            else:
                held.extend(backend.acquire(plan, config, config.wait))
    except BaseException:
        held.release()
        raise
    return held if held.fds or held.pending else None


def conflicts_all(plan: Plan, config: Config) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    key = domain_lease_wanted(plan, config)
    if key is not None:
        from qemu_locked import leases

        space = leases.Lockspace(config.lockspace_dir)
        try:
            label = f"domain {plan.uuid or plan.guest}"
            out += leases.conflicts(space, [leases.Want(key, "exclusive", label)])
        finally:
            space.close()
    if plan.disks or _backend_keeps_domain_lease(plan, config):
        out += load(config.backend).conflicts(plan, config)
    return out


def _backend_keeps_domain_lease(plan: Plan, config: Config) -> bool:
    """sanlock holds the domain lease among its own leases, even with no disk."""
    return config.backend == "sanlock" and config.domain_lease and bool(plan.uuid or plan.guest)
