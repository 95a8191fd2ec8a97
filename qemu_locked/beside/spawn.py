"""Starting a process that lives beside QEMU (the migration keeper, the monitor guard).

Such a helper must not be QEMU's child: QEMU never reaps children it did not
start, so a helper forked straight from the wrapper (QEMU being its parent
after exec) stays a zombie under the VM for its whole life (measured).  It is
double-forked instead (the wrapper reaps the middle process before exec) and
watches QEMU through a pidfd, which names the process, not the program, so
it survives the exec and wakes the helper the instant QEMU dies.  The helper
keeps only the fds it was given: anything else it inherited (other disks'
lock fds, libvirt's sockets) would otherwise outlive QEMU in it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn


def set_comm(name: bytes) -> None:
    """The process name ``ps`` and /proc/PID/comm show (how status finds helpers).
    Written to /proc/self/comm, which is prctl(PR_SET_NAME) without ctypes
    (~2.5 ms to import, at every VM start)."""
    fd = os.open("/proc/self/comm", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, name[:15])
    finally:
        os.close(fd)


def close_all_but(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def say(text: str) -> None:
    """One ``qemu-locked:`` line on stderr (QEMU's, hence libvirt's domain log)."""
    try:
        os.write(2, ("qemu-locked: " + text.replace("\n", "\\n") + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


def vm_gone(pidfd: int, timeout: float | None) -> bool:
    """Wait up to ``timeout`` seconds (None: forever); True once QEMU has exited."""
    import select

    ready, _w, _x = select.select([pidfd], [], [], timeout)
    return bool(ready)


def sharer(ref_fd: int) -> int | None:
    """The other process holding ``ref_fd``'s open file description, if any.

    A daemonizing QEMU (``-daemonize``) forks and its first process exits: the
    VM lives on in the child, which inherited every fd.  A helper watching the
    first pid finds the VM again by its fds: the same description, not just
    the same file (a migration source on this host holds the same file through
    a description of its own).
    """
    from qemu_locked.lock import procfs

    me = os.getpid()
    st = os.fstat(ref_fd)
    for pid in procfs.pids():
        if pid == me:
            continue
        for fd, _target, _info in procfs.fd_entries(pid, {(st.st_dev, st.st_ino)}):
            try:
                if procfs.same_description(me, ref_fd, pid, int(fd)):
                    return pid
            except ProcessLookupError:
                break
    return None


def beside(life: Callable[[int, int], NoReturn]) -> None:
    """Double-fork ``life(vm_pid, pidfd)``; the caller goes on to exec QEMU (same pid).

    ``life`` runs in the grandchild and must end with ``os._exit``.
    """
    vm_pid = os.getpid()
    pidfd = os.pidfd_open(vm_pid)
    middle = os.fork()
    if middle == 0:
        try:
            if os.fork() == 0:
                life(vm_pid, pidfd)
        finally:
            os._exit(0)
    os.waitpid(middle, 0)
    os.close(pidfd)
