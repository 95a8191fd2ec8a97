"""The seccomp user-notification interface, x86_64 (kernel >= 5.14 for injection).

Struct layouts and ioctl numbers are the kernel's uapi (linux/seccomp.h); the
filter is classic BPF.  Only :class:`Filter` needs ctypes (the seccomp and
prctl syscalls, in the wrapper); the supervisor's side is fcntl.ioctl on
bytes.  Kept apart so the numbers live in one place.
"""

from __future__ import annotations

import fcntl
import os
import struct

NR_OPEN, NR_CREAT, NR_OPENAT, NR_OPEN_BY_HANDLE_AT, NR_OPENAT2 = 2, 85, 257, 304, 437
TRAPPED = (NR_OPEN, NR_CREAT, NR_OPENAT, NR_OPEN_BY_HANDLE_AT, NR_OPENAT2)
# fcntl only when it duplicates an fd (QEMU's /dev/fdset/N takes its files so).
NR_FCNTL, F_DUPFD, F_DUPFD_CLOEXEC = 72, 0, 1030
_NR_SECCOMP = 317
_SET_MODE_FILTER, _FLAG_NEW_LISTENER = 1, 8
_PR_SET_NO_NEW_PRIVS, _PR_SET_PTRACER = 38, 0x59616D61
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_BIT = 0x40000000
_RET_ALLOW, _RET_USER_NOTIF, _RET_ERRNO = 0x7FFF0000, 0x7FC00000, 0x00050000
_RECV, _SEND, _ID_VALID, _ADDFD = 0xC0502100, 0xC0182101, 0x40082102, 0x40182103
_SET_FLAGS, _FD_SYNC_WAKE_UP = 0x40082104, 1
_FLAG_CONTINUE, _ADDFD_FLAG_SEND = 1, 2
_NOTIF = struct.Struct("=QIIiIQ6Q")  # id, pid, flags, nr, arch, ip, args[6]
NOTIF_SIZE = 80
_ZERO = bytes(NOTIF_SIZE)


class Notif:
    """One trapped call: ``id`` to answer it, the calling thread ``pid``, ``nr``, ``args``."""

    __slots__ = ("args", "id", "nr", "pid")

    def __init__(self, raw: bytes | bytearray) -> None:
        nid, pid, _flags, nr, _arch, _ip, *args = _NOTIF.unpack_from(raw)
        self.id, self.pid, self.nr, self.args = nid, pid, nr, args


def _program() -> bytes:
    """Trap the path-opening calls; allow the rest; refuse foreign ABIs (ENOSYS)."""
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    enosys = _RET_ERRNO | 38
    head = [(ld, 0, 0, 4), (jeq, 1, 0, _AUDIT_ARCH_X86_64), (ret, 0, 0, enosys),
            (ld, 0, 0, 0), (jge, 0, 1, _X32_BIT), (ret, 0, 0, enosys)]  # fmt: skip
    n = len(TRAPPED)
    # nr in A: each trapped call jumps to USER_NOTIF (the last instruction);
    # fcntl goes on to its command (args[1], low half at offset 24).
    checks = [(jeq, n - i + 4, 0, nr) for i, nr in enumerate(TRAPPED)]
    fcntl = [(jeq, 0, 3, NR_FCNTL), (ld, 0, 0, 24),
             (jeq, 2, 0, F_DUPFD), (jeq, 1, 0, F_DUPFD_CLOEXEC)]  # fmt: skip
    tail = [(ret, 0, 0, _RET_ALLOW), (ret, 0, 0, _RET_USER_NOTIF)]
    return b"".join(struct.pack("=HBBI", *ins) for ins in head + checks + fcntl + tail)


class Filter:
    """The filter, ready to install.  Three C calls (prctl twice, syscall) made
    through _ctypes itself: the ctypes package around it costs ~1.4 ms more to
    import, at every VM start, for nothing used here."""

    def __init__(self) -> None:
        import _ctypes

        class Long(_ctypes._SimpleCData):  # type: ignore[type-arg]  # not subscriptable at run time
            _type_ = "l"

        class Fn(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = Long

        class Libc:
            _handle = _ctypes.dlopen(None, 0)  # type: ignore[arg-type]  # the program itself

        class Char(_ctypes._SimpleCData):  # type: ignore[type-arg]
            _type_ = "c"

        code = _program()

        class Code(_ctypes.Array):  # type: ignore[type-arg]
            _type_, _length_ = Char, len(code)

        self._errno = _ctypes.get_errno
        self._prctl = Fn(("prctl", Libc))  # type: ignore[arg-type]  # what CDLL would pass
        self._syscall = Fn(("syscall", Libc))  # type: ignore[arg-type]
        self._code = Code.from_buffer_copy(code)  # the kernel reads it from this address
        self._prog = struct.pack("=HxxxxxxQ", len(code) // 8, _ctypes.addressof(self._code))

    def install(self, tracer: int) -> int:
        """Filter this process (and what it execs); the listener fd.  ``tracer``:
        the supervisor's pid, named to Yama (scope 1 lets only ancestors read
        QEMU's memory, and the supervisor is not one)."""
        self._prctl(_PR_SET_PTRACER, tracer, 0, 0, 0)  # EINVAL without Yama: nothing to name
        if self._prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            err = self._errno()
            raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
        fd = int(self._syscall(_NR_SECCOMP, _SET_MODE_FILTER, _FLAG_NEW_LISTENER, self._prog))
        if fd < 0:
            err = self._errno()
            raise OSError(err, f"seccomp(SECCOMP_FILTER_FLAG_NEW_LISTENER): {os.strerror(err)}")
        return fd


def wake_in_step(listener: int) -> bool:
    """Ask for synchronous wake-ups (Linux >= 6.6): QEMU's thread and the
    supervisor then hand the CPU to each other instead of waking across CPUs,
    which is most of a trapped call's cost.  False where the kernel cannot."""
    try:
        fcntl.ioctl(listener, _SET_FLAGS, _FD_SYNC_WAKE_UP)  # by value, not a pointer
    except OSError:
        return False
    return True


def recv(listener: int, buf: bytearray) -> Notif:
    buf[:] = _ZERO  # the kernel refuses (EINVAL) a struct that is not zeroed
    fcntl.ioctl(listener, _RECV, buf, True)
    return Notif(buf)


def proceed(listener: int, nid: int) -> None:
    """Let the call run as QEMU made it (SECCOMP_USER_NOTIF_FLAG_CONTINUE)."""
    fcntl.ioctl(listener, _SEND, struct.pack("=QqiI", nid, 0, 0, _FLAG_CONTINUE))


def refuse(listener: int, nid: int, errno: int) -> None:
    fcntl.ioctl(listener, _SEND, struct.pack("=QqiI", nid, 0, -errno, 0))


def valid(listener: int, nid: int) -> bool:
    """Is the caller still waiting on ``nid`` (memory read since is its own)?"""
    try:
        fcntl.ioctl(listener, _ID_VALID, struct.pack("=Q", nid))
    except OSError:
        return False
    return True


def addfd(listener: int, nid: int, fd: int, cloexec: bool, answer: bool) -> int:
    """Put a copy of ``fd`` into the caller's fd table; its number there.  With
    ``answer``, that number is also the trapped call's result."""
    flags = _ADDFD_FLAG_SEND if answer else 0
    # A mutable buffer: ioctl then returns the call's result (the new fd), not a copy.
    req = bytearray(struct.pack("=QIIII", nid, flags, fd, 0, os.O_CLOEXEC if cloexec else 0))
    return int(fcntl.ioctl(listener, _ADDFD, req, True))


def read_string(mem: int, addr: int, limit: int = 4096) -> bytes | None:
    """A NUL-terminated string at ``addr`` in the caller (``mem``: its /proc/PID/mem)."""
    out = b""
    while len(out) < limit:
        here = addr + len(out)
        try:
            chunk = os.pread(mem, 4096 - (here & 4095), here)
        except OSError:
            return None
        if not chunk:
            return None
        end = chunk.find(b"\0")
        if end >= 0:
            return out + chunk[:end]
        out += chunk
    return None
