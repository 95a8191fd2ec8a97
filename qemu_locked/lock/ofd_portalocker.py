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
import portalocker.portalocker
from portalocker import exceptions as pl_exceptions

from qemu_locked.lock import ofd
from qemu_locked.model.errors import BackendError

# portalocker >= 2.8 has a plug-in base class for lockers and a generic Lock;
# Debian 12's python3-portalocker 2.2.1 has neither.  Only the hooks both
# versions call (_get_fh, _get_lock, acquire, release) are used below.
# Old releases also retry (timeout, check_interval) only on LockException, of
# which their AlreadyLocked is not a subclass.
_RETRIES_ALREADY_LOCKED = issubclass(pl_exceptions.AlreadyLocked, pl_exceptions.LockException)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from portalocker.portalocker import BaseLocker as _LockerBase

    _LockBase = portalocker.Lock[IO[bytes]]
else:
    _LockerBase = getattr(portalocker.portalocker, "BaseLocker", object)
    _LockBase = portalocker.Lock

EXCLUSIVE = portalocker.LockFlags.EXCLUSIVE
SHARED = portalocker.LockFlags.SHARED
NON_BLOCKING = portalocker.LockFlags.NON_BLOCKING


def _fd(file_obj: Any) -> int:
    return file_obj if isinstance(file_obj, int) else int(file_obj.fileno())


class OFDLocker(_LockerBase):
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
        except (OSError, BackendError) as exc:  # BackendError: the filesystem refused
            raise pl_exceptions.LockException(exc, fh=file_obj) from exc

    def unlock(self, file_obj: Any) -> None:
        try:
            ofd.unlock(_fd(file_obj))
        except OSError as exc:
            raise pl_exceptions.LockException(exc, fh=file_obj) from exc


_LOCKER = OFDLocker()


class OFDLock(_LockBase):
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
        try:
            _LOCKER.lock(fh, self.flags)
        except pl_exceptions.AlreadyLocked as exc:
            if _RETRIES_ALREADY_LOCKED:
                raise
            raise pl_exceptions.LockException(exc, fh=fh) from exc
        return fh

    def acquire(
        self,
        timeout: float | None = None,
        check_interval: float | None = None,
        fail_when_locked: bool | None = None,
    ) -> IO[bytes]:
        try:
            return super().acquire(timeout, check_interval, fail_when_locked)
        except pl_exceptions.AlreadyLocked:
            raise
        except pl_exceptions.LockException as exc:
            # Old portalocker wraps the last attempt's error: unwrap contention.
            cause: object = exc
            while isinstance(cause, pl_exceptions.LockException) and cause.args:
                cause = cause.args[0]
            if isinstance(cause, pl_exceptions.AlreadyLocked):
                raise cause from None
            raise

    def release(self) -> None:
        # Our own, not portalocker's: older releases unlock with flock(), which
        # would leave the OFD byte to the close alone.
        fh, self.fh = self.fh, None
        if fh is None:
            return
        try:
            _LOCKER.unlock(fh)
        finally:
            fh.close()


__all__ = ["EXCLUSIVE", "NON_BLOCKING", "SHARED", "OFDLock", "OFDLocker"]
