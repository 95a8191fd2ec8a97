"""What every backend module provides (checked by mypy, free at run time).

``acquire``
    take every lock of the plan by ``deadline`` (time.monotonic()), in the
    global order (lock/acquire.py's loop), or raise LockedError / DiskError /
    BackendError having released whatever it took.  ``Held.fds`` must stay
    open, and be inherited by QEMU, for as long as the locks must be held.
    With ``defer`` (a migration destination) what is busy comes back in
    ``Held.pending`` for the keeper instead of refusing.
``conflicts``
    what would refuse this plan right now, taking nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from qemu_locked.lock.held import Held
    from qemu_locked.model.config import Config
    from qemu_locked.model.errors import Conflict
    from qemu_locked.model.plan import Plan


class Backend(Protocol):
    NAME: str

    def acquire(self, plan: Plan, config: Config, deadline: float, defer: bool = False) -> Held:
        raise NotImplementedError

    def conflicts(self, plan: Plan, config: Config) -> list[Conflict]:
        raise NotImplementedError
