"""Locks being held: the fds whose open file descriptions carry them."""

from __future__ import annotations

import os


class Pending:
    """A lock that is busy now, left for the migration keeper (see keeper.py).

    ``fd`` is already open (and goes to QEMU); the keeper locks it later on the
    same open file description.  ``record_key`` is set for lease files, whose
    holder record the keeper writes once the lease is taken.
    """

    # Kept by the keeper for QEMU's whole life instead of handed over (sanlock:
    # a lease belongs to the registration that took it, here the keeper's).
    holds_for_life = False

    def __init__(self, fd: int, exclusive: bool, label: str, record_key: str | None = None) -> None:
        self.fd = fd
        self.exclusive = exclusive
        self.label = label
        self.record_key = record_key

    def try_take(self) -> bool:
        """One attempt, in the keeper: an OFD lock on the shared open file description."""
        from qemu_locked.lock import ofd

        return ofd.try_lock(self.fd, self.exclusive)

    @property
    def lease(self) -> bool:
        """A lease file (its holder record is written once taken), not an image."""
        return self.record_key is not None

    def holders(self) -> str:
        """Who still holds it, for the keeper's timeout line."""
        if self.lease:
            from qemu_locked.backends.lockspace.leases import describe_holders

            return describe_holders(self.fd, "exclusive")
        from qemu_locked.lock import holders

        st = os.fstat(self.fd)
        return holders.describe(holders.holders_of(st.st_dev, st.st_ino), "exclusive")


class Held:
    """Closing an fd releases its OFD locks; exec with the fds inheritable hands them on."""

    def __init__(self, fds: list[int] | None = None) -> None:
        self.fds: list[int] = fds or []
        self.pending: list[Pending] = []

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
        other.fds = []
        other.pending = []
