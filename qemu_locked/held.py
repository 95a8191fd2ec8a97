"""Locks being held: the fds whose open file descriptions carry them."""

from __future__ import annotations

import os


class Held:
    """Closing an fd releases its OFD locks; exec with the fds inheritable hands them on."""

    def __init__(self, fds: list[int] | None = None) -> None:
        self.fds: list[int] = fds or []

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
        other.fds = []
