"""The locks the supervisor holds for its VM: one carrier per file.

A lock cannot live on QEMU's own fds (DESIGN 10): QEMU opens one image
several times (probe, read-only, read-write), a second open file description
conflicts with the first one's OFD lock even inside one process, and a
read-only fd cannot take a write lock.  So each file gets one *carrier*: the
supervisor's own open file description (read-write where the file allows),
locked in the strongest mode any of QEMU's fds on it needs.  A copy of it is
planted in QEMU (O_CLOEXEC), so the lock lives as long as QEMU even if the
supervisor dies; the supervisor still unlocks or downgrades it through its
own copy (the same description) once QEMU holds no fd that needs it.  QEMU
cannot be made to close its planted copy, so an unlocked carrier is kept for
the next open of that file: one fd per file ever opened, not per open (a
detached image's blocks are freed when QEMU exits, not when it is deleted).
"""

from __future__ import annotations

import os

from qemu_locked.lock import ofd, procfs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.beside.supervisor.paths import Target

_CARRIER_FLAGS = os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class Carrier:
    """``fd``: ours; ``planted``: its number in QEMU (-1: not yet); ``start``: a
    start-time lock, which QEMU holds through the fd it inherited."""

    __slots__ = ("exclusive", "fd", "locked", "path", "planted", "start")

    def __init__(self, fd: int, exclusive: bool, path: str, start: bool = False) -> None:
        self.fd, self.exclusive, self.path, self.start = fd, exclusive, path, start
        self.planted = -1
        self.locked = True


class Carriers:
    def __init__(self) -> None:
        self.by_key: dict[tuple[int, int], Carrier] = {}

    def seed(self, fds: list[int]) -> None:
        """The wrapper's start-time locks (copies of the fds QEMU inherits)."""
        for fd in fds:
            try:
                st = os.fstat(fd)
                info = procfs._read(f"/proc/self/fdinfo/{fd}").decode(errors="replace")
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            modes = [m for _k, m, _d, _i, start in procfs.lock_lines(info) if start == 0]
            if modes:
                carrier = Carrier(fd, "exclusive" in modes, path, start=True)
                self.by_key[(st.st_dev, st.st_ino)] = carrier

    def want(self, target: Target, exclusive: bool) -> Carrier | None:
        """The carrier of ``target``, locked at least as ``exclusive`` asks; None
        when someone else holds it in a conflicting mode."""
        assert target.st is not None
        key = (target.st.st_dev, target.st.st_ino)
        carrier = self.by_key.get(key)
        if carrier is None:
            fd = _open_carrier(target.fd)
            if not ofd.try_lock(fd, exclusive):
                os.close(fd)
                return None
            carrier = self.by_key[key] = Carrier(fd, exclusive, target.real)
        elif not carrier.locked:
            if not ofd.try_lock(carrier.fd, exclusive):
                return None
            carrier.locked, carrier.exclusive = True, exclusive
        elif exclusive and not carrier.exclusive:
            if not ofd.try_lock(carrier.fd, True):  # a failed conversion keeps the shared lock
                return None
            carrier.exclusive = True
        return carrier

    def sweep(self, pids: list[int]) -> None:
        """Unlock what QEMU no longer has open; downgrade what it only reads."""
        live = {k: c for k, c in self.by_key.items() if c.locked and not c.start}
        if not live:
            return
        need = _needs(pids, set(live), {c.planted for c in self.by_key.values()})
        for key, carrier in live.items():
            mode = need.get(key)
            if mode is None:
                ofd.unlock(carrier.fd)  # QEMU's planted copy shares the description
                carrier.locked = False
            elif carrier.exclusive and mode == "shared":
                ofd.try_lock(carrier.fd, False)  # a downgrade never conflicts
                carrier.exclusive = False

    def close(self) -> None:
        for carrier in self.by_key.values():
            os.close(carrier.fd)
        self.by_key.clear()


def _open_carrier(pathfd: int) -> int:
    try:
        return os.open(f"/proc/self/fd/{pathfd}", os.O_RDWR | _CARRIER_FLAGS)
    except OSError:  # not writable by QEMU's user: a shared lock is all it can need
        return os.open(f"/proc/self/fd/{pathfd}", os.O_RDONLY | _CARRIER_FLAGS)


def _needs(
    pids: list[int], keys: set[tuple[int, int]], planted: set[int]
) -> dict[tuple[int, int], str]:
    """(dev, ino) -> the strongest mode QEMU's own fds on it need (our planted
    copies do not count)."""
    out: dict[tuple[int, int], str] = {}
    for pid in pids:
        for fd, _target, info in procfs.fd_entries(pid, keys):
            if int(fd) in planted:
                continue
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            flags = next((int(ln.split()[1], 8) for ln in info.splitlines()
                          if ln.startswith("flags:")), 0)  # fmt: skip
            mode = "shared" if flags & os.O_ACCMODE == os.O_RDONLY else "exclusive"
            if out.get(key) != "exclusive":
                out[key] = mode
    return out
