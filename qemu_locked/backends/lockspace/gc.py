"""Lease housekeeping: remove the lease files nobody holds.

Every start leaves its lease files behind (a refused one too, for the leases
it could open), so a busy lockspace only grows.  A file is removed only by a
collector holding its exclusive lock, after checking that its name still leads
to it; acquirers re-check the same after locking (``Lockspace.open_locked``),
so one that waited on a removed file moves to the new one instead of holding a
lock nobody else can see.
"""

from __future__ import annotations

import os

from qemu_locked.backends.lockspace.leases import LeaseMissing, Lockspace
from qemu_locked.lock import ofd
from qemu_locked.model.errors import BackendError
from qemu_locked.model.value import frozen


@frozen
class Collected:
    """What a collection found: lease names removed (or removable), held, unusable."""

    removed: tuple[str, ...]
    held: tuple[str, ...]
    unusable: tuple[str, ...]


def collect_one(space: Lockspace, name: str, dry_run: bool = False) -> bool | None:
    """Remove lease ``name`` if nobody holds it: True removed, False held,
    None gone already.  BackendError if it is not a plain lease file."""
    try:
        fd = space.open_lease(name, create=False)
    except LeaseMissing:
        return None
    try:
        if not ofd.try_lock(fd, True):
            return False
        if not space.still_names(name, fd):
            return None  # removed or replaced since we opened it
        if not dry_run:
            try:
                os.unlink(name, dir_fd=space.dirfd)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise BackendError(f"{space.path}/{name}: cannot remove: {exc.strerror}") from None
        return True
    finally:
        os.close(fd)  # only now is the lock released


def collect(directory: str, dry_run: bool = False) -> Collected:
    removed: list[str] = []
    held: list[str] = []
    unusable: list[str] = []
    space = Lockspace(directory)
    try:
        for name in space.names():
            try:
                done = collect_one(space, name, dry_run)
            except BackendError as exc:
                unusable.append(f"{name}: {exc.message}")
                continue
            if done:
                removed.append(name)
            elif done is False:
                held.append(name)
    finally:
        space.close()
    return Collected(tuple(removed), tuple(held), tuple(unusable))


__all__ = ["Collected", "collect", "collect_one"]
