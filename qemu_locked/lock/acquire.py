"""The one acquire loop every backend runs: all or nothing, in the global order.

The first resource that is busy is waited for (until the deadline); once one
is refused, the rest are only tried, so the refusal names every holder at
once instead of one per attempt.
"""

from __future__ import annotations

import time

from qemu_locked.model.errors import LockedError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import TypeVar

    from qemu_locked.model.errors import Conflict

    T = TypeVar("T")

NO_WAIT = 0.0  # a deadline already past: one attempt
# A monitor guard keeps copies of its VM's lock fds and closes them the moment it
# sees its QEMU exit: a start right after a destroy may find one still closing.
GUARD_GRACE = 2.0


def take_all(
    items: Iterable[T],
    take: Callable[[T, float], bool],
    refusal: Callable[[T], Conflict],
    deadline: float,
) -> None:
    """``take(item, deadline)`` each item; raise LockedError naming every refusal.

    The caller releases what it took when this raises (it owns the fds).
    """
    conflicts: list[Conflict] = []
    for item in items:
        if take(item, NO_WAIT if conflicts else deadline):
            continue
        from qemu_locked.lock.procfs import guards_outliving_their_vm

        if guards_outliving_their_vm() and take(item, time.monotonic() + GUARD_GRACE):
            continue
        conflicts.append(refusal(item))
    if conflicts:
        raise LockedError(conflicts)
