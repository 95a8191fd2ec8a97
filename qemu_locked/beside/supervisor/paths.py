"""What a trapped call names, found as the caller would find it.

The rule for what is locked, in one sentence (docs/supervisor.md): *a regular
file or block device that QEMU opens by path is locked, unless its real path
is under one of SYSTEM_DIRS, the open is O_PATH, or QEMU's own options name
the file for its bookkeeping (Plan.bookkeeping: -pidfile, -D, chardev files).*
Libraries, firmware, /proc, /sys, character devices, shared memory and
hugepage files pass.

The path is read from the caller's memory and resolved against the caller's
own cwd or dirfd (``/proc/TID/cwd``, ``/proc/TID/fd/N``): the supervisor is
in the same mount namespace, with the same credentials.  Whatever it then
does, it does on its own O_PATH fd of what it found, never on the path again.
"""

from __future__ import annotations

import errno
import os
import stat

AT_FDCWD = -100
O_PATH = 0o10000000
# Real paths that are never disks: the system, firmware, kernel interfaces,
# shared memory (libvirt's <shmem>), hugepages, libvirt's per-domain state.
SYSTEM_DIRS = ("/usr/", "/lib/", "/lib64/", "/lib32/", "/bin/", "/sbin/", "/etc/", "/proc/",
               "/sys/", "/run/", "/dev/shm/", "/dev/hugepages/", "/dev/mqueue/",
               "/var/lib/libvirt/qemu/", "/var/cache/", "/var/log/")  # fmt: skip
# Spelled-out prefixes that name the caller itself: resolved here they would
# name the supervisor, so such opens are never taken over (they are /proc).
_SELF_NAMES = (b"/proc/", b"/dev/fd/", b"/dev/std", b"/sys/")


class Blind(Exception):
    """What the caller named cannot be read or resolved by us (not: does not
    exist): the open must be refused, never let through unjudged."""


def blind_if_denied(what: str, exc: OSError) -> None:
    if exc.errno in (errno.EACCES, errno.EPERM):
        raise Blind(f"{what}: {exc.strerror}") from None


# What a system file's path is spelled as, before any lookup (the loader's paths).
_SYSTEM_NAMES = _SELF_NAMES + tuple(d.encode() for d in SYSTEM_DIRS[:7])


def system_name(path: bytes) -> bool:
    """A path string that is a system file by its spelling (cheap: no lookup).
    The dynamic loader's ~50 libraries stop here."""
    return path.startswith(_SYSTEM_NAMES)


class Target:
    """A file the caller asked to open: our O_PATH fd of it (``fd`` < 0: only
    ``real`` is known, and it passes).  ``created``: made by us for the call."""

    def __init__(self, fd: int = -1, st: os.stat_result | None = None, real: str = "",
                 created: bool = False) -> None:  # fmt: skip
        self.fd, self.st, self.real, self.created = fd, st, real, created

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def lockable(self, bookkeeping: frozenset[str] = frozenset()) -> bool:
        return self.st is not None and lockable(self.real, self.st, bookkeeping)


def lockable(real: str, st: os.stat_result, bookkeeping: frozenset[str] = frozenset()) -> bool:
    """The docs' one sentence: a regular file or block device outside the
    system's directories that is not one of QEMU's bookkeeping files."""
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        return False
    return not real.startswith(SYSTEM_DIRS) and real not in bookkeeping


def base_of(tid: int, dirfd: int, path: bytes) -> str:
    if path.startswith(b"/"):
        return "/"
    return f"/proc/{tid}/cwd" if dirfd == AT_FDCWD else f"/proc/{tid}/fd/{dirfd}"


def find(tid: int, dirfd: int, path: bytes, flags: int, mode: int,
         bookkeeping: frozenset[str] = frozenset()) -> Target | None:  # fmt: skip
    """Our O_PATH fd of what ``openat(dirfd, path, flags, mode)`` in ``tid``
    names, made first when the call would create it outside SYSTEM_DIRS (so
    it is ours before QEMU has it); None when it cannot be found (the caller's
    own open then fails the same way, or is not ours to judge)."""
    where = base_of(tid, dirfd, path)
    try:
        base = os.open(where, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        blind_if_denied(where, exc)
        return None  # a dirfd that is not a directory: the caller's own call fails alike
    try:
        try:
            fd = os.open(path, O_PATH | os.O_CLOEXEC | (flags & os.O_NOFOLLOW), dir_fd=base)
        except FileNotFoundError:
            if not flags & os.O_CREAT:
                return None
            return _create(base, path, mode, bookkeeping)
        except OSError:
            return None
    finally:
        os.close(base)
    return _target(fd)


def _target(fd: int, created: bool = False) -> Target | None:
    try:
        return Target(fd, os.fstat(fd), os.readlink(f"/proc/self/fd/{fd}"), created)
    except OSError:
        os.close(fd)
        return None


def _create(base: int, path: bytes, mode: int, bookkeeping: frozenset[str]) -> Target | None:
    """Create the file an O_CREAT names, where its directory is not a system one."""
    parent, _sep, name = path.rpartition(b"/")
    try:
        pfd = os.open(parent or b".", O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=base)
    except OSError:
        return None
    try:
        real = os.readlink(f"/proc/self/fd/{pfd}").rstrip("/") + "/"
        if real.startswith(SYSTEM_DIRS) or real + os.fsdecode(name) in bookkeeping:
            return Target(real=real)  # not ours: the caller creates it itself
        flags = os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        made = os.open(name, flags, mode & 0o7777, dir_fd=pfd)
    except FileExistsError:  # made meanwhile by someone else: an existing file now
        made = os.open(name, O_PATH | os.O_CLOEXEC, dir_fd=pfd)
    except OSError:
        return None
    finally:
        os.close(pfd)
    try:
        fd = os.open(f"/proc/self/fd/{made}", O_PATH | os.O_CLOEXEC)
    finally:
        os.close(made)
    return _target(fd, created=True)


def real_paths(paths: tuple[str, ...]) -> frozenset[str]:
    """Where files named on the command line really are (the file itself may not
    exist yet: a pid file is created by QEMU)."""
    out = set()
    for path in paths:
        head, tail = os.path.split(os.path.abspath(path))
        out.add(os.path.join(os.path.realpath(head), tail))
    return frozenset(out)
