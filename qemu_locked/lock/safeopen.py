"""Opening disk paths safely for locking.

Never create, truncate or follow-and-create: no O_CREAT, ever.  A path is
first opened ``O_PATH`` (which opens nothing: no device driver, no FIFO wait),
its type and identity checked on that fd, and only then reopened for real
through ``/proc/self/fd/N``: the reopen reaches the inode that was checked,
so a character device renamed over the path in between is never opened.
"""

from __future__ import annotations

import os
import stat

from qemu_locked.model.errors import DiskError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from qemu_locked.parse.qcow2 import Names

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


def _refuse_kind(path: str, st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return
    for test, text in _KIND_NAMES:
        if test(st.st_mode):
            raise DiskError(path, text)
    raise DiskError(path, "is not a regular file or block device")


def check(path: str) -> os.stat_result:
    """stat() a disk path (following symlinks) and refuse what is not an image."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DiskError(path, _why(exc)) from None
    except ValueError:
        raise DiskError(path, "path contains a NUL byte") from None
    _refuse_kind(path, st)
    return st


def reopen(path: str, flags: int, accept: Callable[[os.stat_result], None]) -> int:
    """Open ``path`` with ``flags`` only after ``accept(fstat)`` passed on an
    O_PATH fd of it; raises OSError from the opens, whatever ``accept`` raises."""
    ref = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        accept(os.fstat(ref))
        return os.open(f"/proc/self/fd/{ref}", flags | os.O_CLOEXEC)
    finally:
        os.close(ref)


def open_checked(path: str, writable: bool, expect: str) -> int:
    """Open for a lock: read-write for an exclusive lock, read-only for shared."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | _OPEN_FLAGS

    def accept(st: os.stat_result) -> None:
        _refuse_kind(path, st)
        if identity_key(st) != expect:
            raise DiskError(path, "changed while being opened")

    try:
        return reopen(path, flags, accept)
    except OSError as exc:
        from qemu_locked.lock.policy import check_open

        check_open(path, exc, 6 if writable else 4)
        need = "for writing (an exclusive lock needs it)" if writable else "for reading"
        raise DiskError(path, f"cannot open {need}: {_why(exc)}") from None
    except ValueError:
        raise DiskError(path, "path contains a NUL byte") from None


def open_regular(path: str) -> int:
    """A regular file opened read-only (headers, config files); OSError otherwise."""

    def accept(st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise OSError(21 if stat.S_ISDIR(st.st_mode) else 22, "not a regular file")

    return reopen(path, os.O_RDONLY | _OPEN_FLAGS, accept)


MAX_CHAIN = 64  # images followed through headers from one image (a loop ends there)


def plain_name(name: str) -> bool:
    """Is a name from an image header (or HMP) a file QEMU opens by path, not
    ``json:`` or a protocol (QEMU's rule: a ':' before any '/')?"""
    return not (name.startswith("json:") or ":" in name.split("/", 1)[0])


def qcow2_names(path: str) -> Names | None:
    """The backing and data file names in a qcow2 header, or None (read by the
    wrapper for chains on the command line, by the monitor guard for hot-plugs)."""
    from qemu_locked.parse import qcow2

    try:
        fd = open_regular(path)
    except (OSError, ValueError):
        return None  # the lock step reports unusable paths
    try:
        size = qcow2.cluster_size(os.pread(fd, 104, 0))
        return qcow2.names(os.pread(fd, size, 0)) if size else None
    except OSError:
        return None
    finally:
        os.close(fd)
