"""Locks being held: the fds whose open file descriptions carry them."""

from __future__ import annotations

import os


class Pending:
    """A lock that is busy now, left for the migration keeper (see keeper.py).

    ``fd`` is already open (and goes to QEMU); the keeper locks it later on the
    same open file description.  ``record_key`` is set for lease files, whose
    holder record the keeper writes once the lease is taken.
    """

    __slots__ = ("exclusive", "fd", "label", "lease", "record_key")

    def __init__(self, fd: int, exclusive: bool, label: str, record_key: str | None = None) -> None:
        self.fd = fd
        self.exclusive = exclusive
        self.label = label
        self.record_key = record_key
        self.lease = record_key is not None


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
