"""portalocker's face for our OFD byte-0 lock (DESIGN.md section 3).

portalocker ships only flock/lockf on POSIX; :class:`OFDLocker` is a
``portalocker.portalocker.BaseLocker`` that takes the OFD lock on byte 0
instead, keeping portalocker's contract: contention raises ``AlreadyLocked``
(which ``Lock`` retries until its timeout), any other failure raises a
plain ``LockException`` (permanent).  :class:`OFDLock` is a
``portalocker.Lock`` that locks through it and opens an *existing* file
only: no ``O_CREAT``, no truncation, no following-and-creating.

Admin side only: ``import portalocker`` costs ~80-100 ms.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import IO, Any

import portalocker
from portalocker import exceptions as pl_exceptions
from portalocker.portalocker import BaseLocker

from qemu_locked.lock import ofd

EXCLUSIVE = portalocker.LockFlags.EXCLUSIVE
SHARED = portalocker.LockFlags.SHARED
NON_BLOCKING = portalocker.LockFlags.NON_BLOCKING


def _fd(file_obj: Any) -> int:
    return file_obj if isinstance(file_obj, int) else int(file_obj.fileno())


class OFDLocker(BaseLocker):
    """OFD lock on byte 0, length 1: F_WRLCK for EXCLUSIVE, F_RDLCK for SHARED."""

    def lock(self, file_obj: Any, flags: portalocker.LockFlags) -> None:
        fd = _fd(file_obj)
        exclusive = bool(flags & EXCLUSIVE)
        try:
            if flags & NON_BLOCKING:
                if not ofd.try_lock(fd, exclusive):
                    raise pl_exceptions.AlreadyLocked(
                        OSError(errno.EAGAIN, os.strerror(errno.EAGAIN)), fh=file_obj
                    )
                return
            import fcntl

            l_type = ofd.F_WRLCK if exclusive else ofd.F_RDLCK
            fcntl.fcntl(fd, ofd.F_OFD_SETLKW, ofd._flock(l_type))
        except OSError as exc:
            raise pl_exceptions.LockException(exc, fh=file_obj) from exc

    def unlock(self, file_obj: Any) -> None:
        try:
            ofd.unlock(_fd(file_obj))
        except OSError as exc:
            raise pl_exceptions.LockException(exc, fh=file_obj) from exc


_LOCKER = OFDLocker()


class OFDLock(portalocker.Lock[IO[bytes]]):
    """``portalocker.Lock`` on an existing regular file, through :class:`OFDLocker`.

    ``flags`` default to ``EXCLUSIVE | NON_BLOCKING``; ``timeout`` and
    ``check_interval`` are portalocker's own (retry while ``AlreadyLocked``).
    An exclusive lock opens the file read-write, a shared one read-only.
    """

    def __init__(
        self,
        filename: str,
        timeout: float = 0.0,
        check_interval: float = 0.1,
        flags: portalocker.LockFlags = EXCLUSIVE | NON_BLOCKING,
    ) -> None:
        # The mode is only recorded: _get_fh opens the file itself, never creating it.
        super().__init__(
            filename, "rb", timeout=timeout, check_interval=check_interval, flags=flags
        )

    def _get_fh(self) -> IO[bytes]:
        write = bool(self.flags & EXCLUSIVE)
        fd = os.open(
            self.filename,
            (os.O_RDWR if write else os.O_RDONLY) | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC,
        )
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise pl_exceptions.LockException(f"{self.filename}: not a regular file")
            return os.fdopen(fd, "r+b" if write else "rb", buffering=0)
        except BaseException:
            os.close(fd)
            raise

    def _get_lock(self, fh: IO[bytes]) -> IO[bytes]:
        _LOCKER.lock(fh, self.flags)
        return fh

    def _release_claimed_fh(self, fh: IO[str] | IO[bytes]) -> None:
        try:
            _LOCKER.unlock(fh)
        finally:
            fh.close()


__all__ = ["EXCLUSIVE", "NON_BLOCKING", "SHARED", "OFDLock", "OFDLocker"]
