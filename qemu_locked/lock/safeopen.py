"""Opening disk paths safely for locking.

Never create, truncate or follow-and-create: no O_CREAT, ever.  The type is
checked before opening, so a FIFO cannot block us and a character device
(whose open may have side effects) is never opened; the fd is checked again
after opening, in case the path changed in between.
"""

from __future__ import annotations

import os
import stat

from qemu_locked.model.errors import DiskError

_OPEN_FLAGS = os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC

_KIND_NAMES = (
    (stat.S_ISDIR, "is a directory, not a disk image"),
    (stat.S_ISFIFO, "is a FIFO, not a disk image"),
    (stat.S_ISSOCK, "is a socket, not a disk image"),
    (stat.S_ISCHR, "is a character device, not a disk image"),
)


def identity_key(st: os.stat_result) -> str:
    """What makes two paths the same disk on this host: the inode of a file,
    the device number of a block device (whichever /dev node reaches it)."""
    if stat.S_ISBLK(st.st_mode):
        return f"b:{st.st_rdev}"
    return f"f:{st.st_dev}:{st.st_ino}"


def _why(exc: OSError) -> str:
    if exc.errno == 40:
        return "symlink loop"
    return exc.strerror or str(exc)


def check(path: str) -> os.stat_result:
    """stat() a disk path (following symlinks) and refuse what is not an image."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DiskError(path, _why(exc)) from None
    except ValueError:
        raise DiskError(path, "path contains a NUL byte") from None
    if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return st
    for test, text in _KIND_NAMES:
        if test(st.st_mode):
            raise DiskError(path, text)
    raise DiskError(path, "is not a regular file or block device")


def open_checked(path: str, writable: bool, expect: str) -> int:
    """Open for a lock: read-write for an exclusive lock, read-only for shared."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | _OPEN_FLAGS
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        need = "for writing (an exclusive lock needs it)" if writable else "for reading"
        raise DiskError(path, f"cannot open {need}: {_why(exc)}") from None
    try:
        st = os.fstat(fd)
        if identity_key(st) != expect or not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise DiskError(path, "changed while being opened")
    except BaseException:
        os.close(fd)
        raise
    return fd
