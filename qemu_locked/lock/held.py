"""The locks this start holds: the fds whose open file descriptions carry them.

(Who *else* holds a lock is :mod:`qemu_locked.lock.procfs`'s job.)
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.model.config import Config
    from qemu_locked.model.plan import Plan


class Pending:
    """A lock that is busy now, left for the migration keeper (beside/keeper.py).

    ``fd`` is already open (and goes to QEMU); the keeper locks it later on the
    same open file description.  Subclasses change how it is taken (sanlock),
    who is named as its holder, and what is done once it is taken (a lease
    file's holder record).
    """

    # Kept by the keeper for QEMU's whole life instead of handed over (sanlock:
    # a lease belongs to the registration that took it, here the keeper's).
    holds_for_life = False

    def __init__(self, fd: int, exclusive: bool, label: str) -> None:
        self.fd = fd
        self.exclusive = exclusive
        self.label = label

    def try_take(self) -> bool:
        """One attempt, in the keeper: an OFD lock on the shared open file description."""
        from qemu_locked.lock import ofd

        return ofd.try_lock(self.fd, self.exclusive)

    def taken(self, config: Config, plan: Plan, vm_pid: int) -> None:
        """Called in the keeper once :meth:`try_take` succeeded."""

    def holders(self) -> str:
        """Who still holds it, for the keeper's timeout line."""
        from qemu_locked.lock import procfs, unseen

        st = os.fstat(self.fd)
        holders = procfs.holders_of(st.st_dev, st.st_ino)
        return unseen.describe(holders, "exclusive", st.st_dev, st.st_ino)


class Held:
    """Closing an fd releases its OFD locks; exec with the fds inheritable hands them on."""

    def __init__(self, fds: list[int] | None = None) -> None:
        self.fds: list[int] = fds or []
        self.pending: list[Pending] = []
        # (fd, offset, length) of the holder records this start wrote (lease files):
        # a start refused after writing them erases them (abandon), leaving none stale.
        self.records: list[tuple[int, int, int]] = []

    def abandon(self) -> None:
        """A start that fails: erase its records while their slots are still
        ours, then let everything go."""
        for fd, offset, length in self.records:
            try:
                os.pwrite(fd, bytes(length), offset)
            except OSError:
                pass  # left for `qemu-lockctl lockspace gc`, as a crash's would be
        self.records = []
        self.release()

    def release(self) -> None:
        while self.fds:
            try:
                os.close(self.fds.pop())
            except OSError:
                pass

    def inherit(self) -> None:
        for fd in self.fds:
            os.set_inheritable(fd, True)

    def extend(self, other: Held) -> None:
        self.fds.extend(other.fds)
        self.pending.extend(other.pending)
        self.records.extend(other.records)
        other.fds = []
        other.pending = []
        other.records = []
