"""The lock primitive: an open-file-description (OFD) lock on byte 0, length 1.

Why exactly this (DESIGN.md section 3, measured): classic POSIX locks are
dropped when QEMU closes its own fds on the image; whole-file locks collide
with QEMU's own locks on bytes 100-104/200-204; flock is emulated as a
whole-file lock on NFS.  An OFD lock on byte 0 survives exec, is freed when
the last fd of its open file description closes (the VM dies), and is the
byte virtlockd uses, so the two exclude each other.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time

from qemu_locked.model.errors import BackendError

F_OFD_GETLK: int = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)
F_OFD_SETLKW: int = getattr(fcntl, "F_OFD_SETLKW", 38)

F_RDLCK: int = fcntl.F_RDLCK
F_WRLCK: int = fcntl.F_WRLCK
F_UNLCK: int = fcntl.F_UNLCK

_BYTE = 0  # virtlockd's byte; QEMU uses 100-104 and 200-204
_ORDER = sys.byteorder


_FLOCKS: dict[tuple[int, int], bytes] = {}


def _flock(l_type: int, start: int = _BYTE, length: int = 1) -> bytes:
    if length == 1:
        cached = _FLOCKS.get((l_type, start))
        if cached is None:
            cached = _FLOCKS[(l_type, start)] = _build_flock(l_type, start, 1)
        return cached
    return _build_flock(l_type, start, length)


def _build_flock(l_type: int, start: int, length: int) -> bytes:
    # struct flock on 64-bit Linux: short l_type, short l_whence, (pad 4),
    # off_t l_start, off_t l_len, pid_t l_pid, (pad 4).  Built by hand so the
    # start path does not import struct.
    return (
        l_type.to_bytes(2, _ORDER, signed=True)
        + (0).to_bytes(2, _ORDER)  # SEEK_SET
        + bytes(4)
        + start.to_bytes(8, _ORDER, signed=True)
        + length.to_bytes(8, _ORDER, signed=True)
        + bytes(8)
    )


def try_lock(fd: int, exclusive: bool, byte: int = _BYTE) -> bool:
    """Take the lock on ``byte`` (the lease byte 0 unless told) without waiting.
    False if someone else holds it."""
    request = _flock(F_WRLCK if exclusive else F_RDLCK, byte)
    for _attempt in range(3):
        try:
            fcntl.fcntl(fd, F_OFD_SETLK, request)
        except OSError as exc:
            if exc.errno == 11:  # EAGAIN: a conflicting lock
                return False
            if exc.errno not in (1, 13):
                raise refused(fd, exc) from None
            # EACCES is also how POSIX may report a conflict, and how AppArmor's
            # 'k' and SELinux's 'lock' refuse: the kernel's own test (F_OFD_GETLK,
            # which no security module mediates) tells a holder from a refusal.
            if conflicting(fd, exclusive, byte) is not None:
                return False
            continue  # free now: the holder may just have let go; ask once more
        return True
    from qemu_locked.lock.policy import denied

    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        path = f"fd {fd}"
    raise denied(path, "lock")


_HINTS = {
    37: "; NFSv3 without a lock manager? mount with NFSv4, run rpc.statd, or mount with "
    "local_lock=posix (locks then stay on this host)",  # ENOLCK
    22: "; this filesystem does not take OFD locks",  # EINVAL (some FUSE filesystems)
    95: "; this filesystem does not take OFD locks",  # EOPNOTSUPP
}


def refused(fd: int, exc: OSError) -> BackendError:
    """A lock call failed for a reason other than a holder: the filesystem's
    doing, not ours (exit 5), named with the path and the filesystem type."""
    from qemu_locked.lock.mounts import fs_type_of_fd

    path, fstype = fs_type_of_fd(fd)
    hint = _HINTS.get(exc.errno or 0, "")
    return BackendError(f"{path}: the filesystem ({fstype}) refused the lock: {exc.strerror}{hint}")


def lock_until(fd: int, exclusive: bool, deadline: float, poll: float = 0.05) -> bool:
    """Poll for the lock until ``deadline`` (time.monotonic()); False on timeout.

    Polling rather than F_OFD_SETLKW: a blocked SETLKW cannot be bounded without
    signals, and waiting holders must keep the global lock order.
    """
    while not try_lock(fd, exclusive):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True


def unlock(fd: int) -> None:
    fcntl.fcntl(fd, F_OFD_SETLK, _flock(F_UNLCK))


def conflicting(fd: int, exclusive: bool, byte: int = _BYTE) -> tuple[str, int] | None:
    """Who would block a lock on ``byte``: ("exclusive"|"shared", pid); pid is
    -1 for OFD locks.  None when nothing conflicts (or our own open file
    description holds it)."""
    try:
        raw = fcntl.fcntl(fd, F_OFD_GETLK, _flock(F_WRLCK if exclusive else F_RDLCK, byte))
    except OSError as exc:
        raise refused(fd, exc) from None
    l_type = int.from_bytes(raw[0:2], _ORDER, signed=True)
    if l_type == F_UNLCK:
        return None
    pid = int.from_bytes(raw[24:28], _ORDER, signed=True)
    return ("exclusive" if l_type == F_WRLCK else "shared"), pid
