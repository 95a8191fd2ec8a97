"""Lock backends: one module each, chosen explicitly by config ``backend``.

Every backend turns a Plan into held locks, all or nothing:

``acquire(plan, config, wait) -> Held``
    take every lock (waiting up to ``wait`` seconds for holders in a global
    order), or raise LockedError / DiskError / BackendError having released
    whatever it took.  ``Held.fds`` must stay open (and be inherited) for as
    long as the locks must be held.
``conflicts(plan, config) -> list[tuple[resource, wanted, holders]]``
    what would refuse this plan right now, without keeping anything.
"""

from __future__ import annotations

from qemu_locked.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType


def load(name: str) -> ModuleType:
    """The backend module for a config ``backend`` value.  Never a fallback."""
    if name == "direct":
        from qemu_locked.backends import direct

        return direct
    if name == "lockspace":
        from qemu_locked.backends import lockspace  # type: ignore[attr-defined]

        return lockspace  # type: ignore[no-any-return]
    if name == "sanlock":
        from qemu_locked.backends import sanlock  # type: ignore[attr-defined]

        return sanlock  # type: ignore[no-any-return]
    raise ConfigError("backend", None, f"unknown backend {name!r}")
