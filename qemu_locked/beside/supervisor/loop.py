"""The supervisor's life: answer each trapped call, sweep the locks once a second.

One handler per trapped syscall (HANDLERS); every call is answered exactly
once: let through, refused with an errno, or given an fd we opened.  A bug of
ours while deciding refuses that one call (EIO) with a line in the domain log:
failing closed, never letting an unlocked disk through.
"""

from __future__ import annotations

import errno
import os
import select
from time import monotonic

from qemu_locked.beside.spawn import say
from qemu_locked.beside.supervisor import kernel, paths
from qemu_locked.model.errors import QemuLockedError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from qemu_locked.beside.guard_locks import Lock, Locks
    from qemu_locked.beside.keeper import VM, Wait

SWEEP_SECONDS = 1.0
WAIT_SECONDS = 0.1  # between attempts at a lock an incoming migration waits for
_REAL_FLAGS_DROPPED = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_TRUNC


class Supervisor:
    """``locks``: the VM's locks, taken through the configured backend exactly as
    the monitor guard takes them (guard_locks): our copies are the carriers, and
    a copy of each is planted in QEMU so the lock lives as long as QEMU."""

    def __init__(self, listener: int, vm_pid: int, locks: Locks, inherited: list[int],
                 bookkeeping: frozenset[str] = frozenset(), vm: VM | None = None,
                 wait: Wait | None = None) -> None:  # fmt: skip
        self.listener, self.vm_pid, self.locks = listener, vm_pid, locks
        self.vm = vm  # QEMU's pidfd, followed across -daemonize; None: the listener alone
        self.wait = wait  # the migration keeper's work, done here (beside/keeper.py)
        self.bookkeeping = bookkeeping  # pid, log, chardev files: never disks
        self.process_of: dict[int, int] = {}  # calling thread -> its process (QEMU or a child)
        self.mems: dict[int, int] = {}  # process -> its /proc/PID/mem
        self.blind = False  # said once: QEMU's memory or cwd cannot be read
        # Our lock fds' numbers in QEMU: a released lock's copy stays there, unlocked,
        # and must not count as QEMU's own use of the file.
        # The start-time lock fds QEMU inherited have the same numbers in QEMU.
        self.planted: set[int] = set(inherited)
        # Files QEMU has opened through us: only those may be let go once it closes
        # them (a start-time disk QEMU has not opened yet must stay locked).
        self.opened: set[str] = set()
        # What the command line declares: disks written shared, files left unlocked.
        self.shareable, self.free_reads, self.free_all = _declared(locks)

    # -- the trapped calls ------------------------------------------------------

    def openat(self, n: kernel.Notif) -> None:
        dirfd = n.args[0] & 0xFFFFFFFF
        dirfd = dirfd - (1 << 32) if dirfd >= 1 << 31 else dirfd
        self._open(n, dirfd, n.args[1], n.args[2] & 0xFFFFFFFF, n.args[3])

    def open(self, n: kernel.Notif) -> None:
        self._open(n, paths.AT_FDCWD, n.args[0], n.args[1] & 0xFFFFFFFF, n.args[2])

    def creat(self, n: kernel.Notif) -> None:
        flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC
        self._open(n, paths.AT_FDCWD, n.args[0], flags, n.args[1])

    def openat2(self, n: kernel.Notif) -> None:
        # Its RESOLVE_* rules are not ours to redo; ENOSYS sends callers (glibc
        # included) back to openat, which is decided above.
        kernel.refuse(self.listener, n.id, errno.ENOSYS)

    def open_by_handle_at(self, n: kernel.Notif) -> None:
        # No path to judge (and it needs CAP_DAC_READ_SEARCH, which QEMU has not).
        kernel.refuse(self.listener, n.id, errno.EPERM)

    def _open(self, n: kernel.Notif, dirfd: int, addr: int, flags: int, mode: int) -> None:
        if flags & paths.O_PATH:
            kernel.proceed(self.listener, n.id)
            return
        try:
            path = self._path(n, addr)
            if path is None or paths.system_name(path):
                kernel.proceed(self.listener, n.id)  # gone, a bad address (EFAULT), or the system
                return
            # Read from memory the caller owns: trusted only if it is still waiting
            # (a system name needs no such care: the kernel reads the path itself).
            if not kernel.valid(self.listener, n.id):
                return
            target = paths.find(n.pid, dirfd, path, flags, mode, self.bookkeeping)
        except paths.Blind as exc:  # what QEMU asked for cannot be known: fail closed
            if not self.blind:  # our line first: it is in the log before QEMU's own
                self.blind = True
                say(f"supervisor: {exc}: every open QEMU makes is refused (the host's "
                    "security policy? `qemu-lockctl doctor` names the fix)")  # fmt: skip
            kernel.refuse(self.listener, n.id, errno.EACCES)
            return
        if target is None or not target.lockable(self.bookkeeping):
            if target is not None:
                target.close()
            kernel.proceed(self.listener, n.id)
            return
        try:
            self._serve(n, target, flags)
        finally:
            target.close()

    def _path(self, n: kernel.Notif, addr: int) -> bytes | None:
        """The path the call names, read from the caller's memory.  One /proc/PID/mem
        per process (its threads share the memory), opened again once if reading
        fails (the process may be gone and its pid reused)."""
        process = self.process_of.get(n.pid, -1)
        key = process if process > 0 else n.pid
        for fresh in (False, True):
            mem = self.mems.get(key, -1)
            if fresh or mem < 0:
                if mem >= 0:
                    os.close(mem)
                mem = self.mems[key] = self._open_mem(key if process > 0 else n.pid)
                if mem < 0:
                    del self.mems[key]
                    return None  # the caller is gone
            path = kernel.read_string(mem, addr)
            if path is not None:
                break
        return path

    def _open_mem(self, pid: int) -> int:
        if len(self.mems) > 64:  # processes come and go (children of QEMU)
            for fd in self.mems.values():
                os.close(fd)
            self.mems.clear()
        try:
            return os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            paths.blind_if_denied(f"/proc/{pid}/mem", exc)
            return -1

    def _serve(self, n: kernel.Notif, target: paths.Target, flags: int) -> None:
        from qemu_locked.beside.guard_locks import Refused
        from qemu_locked.lock.safeopen import identity_key
        from qemu_locked.model.plan import EXCLUSIVE, SHARED

        assert target.st is not None
        writes = flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC)
        key = identity_key(target.st)
        if key in self.free_all or (not writes and key in self.free_reads):
            kernel.proceed(self.listener, n.id)  # unlocked on purpose (force-share, locking=off)
            return
        exclusive = writes and key not in self.shareable
        try:
            lock = self.locks.want(target.real, EXCLUSIVE if exclusive else SHARED, "open", "open")
        except Refused as exc:
            shared = self._share(target) if exclusive else None
            if shared is None:
                self._plant(n)  # a failed upgrade may have taken the shared lock anew
                self._refuse(n, exc.line.removeprefix("qemu-locked: "))
                return
            lock = shared
        # From here the sweep judges it by QEMU's fds: a lock taken for an open
        # that then fails is let go like one QEMU closed.
        self.opened.add(lock.key)
        self._plant(n)
        if lock.key != identity_key(target.st):  # renamed over between our two looks
            self._refuse(n, f"{target.real}: changed while being opened")
            return
        try:
            fd = os.open(
                f"/proc/self/fd/{target.fd}", (flags & ~_REAL_FLAGS_DROPPED) | os.O_CLOEXEC
            )
            if flags & os.O_TRUNC and not target.created:
                os.ftruncate(fd, 0)  # only now that the lock is ours
        except OSError as exc:
            kernel.refuse(self.listener, n.id, exc.errno or errno.EIO)
            return
        try:
            kernel.addfd(self.listener, n.id, fd, bool(flags & os.O_CLOEXEC), True)
        except OSError:
            pass  # the caller is gone (killed while waiting)
        finally:
            os.close(fd)

    def _plant(self, n: kernel.Notif) -> None:
        """A copy of each new lock fd into the caller (O_CLOEXEC) before it is
        answered, whatever the answer: the lock then lives as long as QEMU."""
        new, self.locks.give[:] = list(self.locks.give), []
        for _name, lock_fd in new:
            try:
                planted = kernel.addfd(self.listener, n.id, lock_fd, True, False)
            except OSError:
                return  # the caller is gone (killed while waiting)
            if self.process_of.get(n.pid) == self.vm_pid:  # QEMU's table, not a child's
                self.planted.add(planted)

    def _share(self, target: paths.Target) -> Lock | None:
        """A writer refused only by sharers: shared, if every QEMU writing the
        disk declared it shareable (share.py); else None."""
        from qemu_locked.beside.guard_locks import Refused
        from qemu_locked.beside.supervisor import share
        from qemu_locked.model.plan import SHARED

        try:
            if not share.written_shareably(target.fd):
                return None
            return self.locks.want(target.real, SHARED, "open", "open")
        except (Refused, OSError, QemuLockedError):
            return None  # the first refusal is the one to tell

    def _refuse(self, n: kernel.Notif, line: str) -> None:
        say(line)  # first: in the domain log before QEMU's own error
        kernel.refuse(self.listener, n.id, errno.EBUSY)

    def sweep(self) -> None:
        """Unlock what QEMU no longer has open, downgrade what it only reads (its
        fds on the file that are not copies of ours: kcmp, as the guard does)."""
        from qemu_locked.model.plan import EXCLUSIVE

        # QEMU's children that opened files through us: their fds count too (a
        # `migrate exec:` child writing a file keeps its lock).
        children = tuple({p for p in self.process_of.values() if p > 0 and p != self.vm_pid})
        for lock in list(self.locks.by_key.values()):
            if lock.key not in self.opened or not lock.fds:
                continue  # not opened by QEMU yet (a start-time disk): kept
            if not self.locks.qemu_uses(lock, ignore=self.planted, children=children):
                self.locks.release(lock)
            elif lock.mode == EXCLUSIVE and not self.locks.qemu_uses(
                lock, True, self.planted, children
            ):
                self.locks.downgrade(lock)
        self.locks.take_back.clear()  # QEMU's copies: unlocked, left open (no closefd here)

    # -- the loop -----------------------------------------------------------------

    def run(self) -> None:
        handlers: dict[int, Callable[[kernel.Notif], None]] = {
            kernel.NR_OPENAT: self.openat, kernel.NR_OPEN: self.open, kernel.NR_CREAT: self.creat,
            kernel.NR_OPENAT2: self.openat2, kernel.NR_OPEN_BY_HANDLE_AT: self.open_by_handle_at,
        }  # fmt: skip
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        watched = self._watch(poller, -1)
        buf = bytearray(kernel.NOTIF_SIZE)
        sweep_at = monotonic() + SWEEP_SECONDS
        wait_at = monotonic()
        while True:
            # By deadline, not after a quiet second: a busy opener must not starve it.
            due = min(sweep_at, wait_at) if self.wait is not None else sweep_at
            events = dict(poller.poll(max(0.0, due - monotonic()) * 1000))
            if self.wait is not None and monotonic() >= wait_at:
                self._keep()
                wait_at = monotonic() + WAIT_SECONDS
            if monotonic() >= sweep_at:
                self.sweep()
                sweep_at = monotonic() + SWEEP_SECONDS
            if watched in events:  # QEMU exited (a daemonizing one: followed to its daemon)
                assert self.vm is not None
                if self.vm.gone(0):
                    return
                watched = self._watch(poller, watched)
            if self.listener not in events:
                continue
            if events[self.listener] & (select.POLLHUP | select.POLLERR):
                return  # QEMU and every child of it are gone
            try:
                n = kernel.recv(self.listener, buf)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.ENOENT):
                    continue  # the caller died before we read its call
                return
            self._note(n.pid)
            try:
                handlers[n.nr](n)
            except Exception as exc:  # a bug of ours: that one open fails, closed
                say(f"supervisor: internal error on a trapped call: {type(exc).__name__}: {exc}")
                try:
                    kernel.refuse(self.listener, n.id, errno.EIO)
                except OSError:
                    pass

    def _watch(self, poller: select.poll, old: int) -> int:
        """Poll QEMU's pidfd too.  The listener hangs up only once every process
        using the filter is reaped, not when it exits (before Linux 6.11), and a
        caller that reads our stderr to its end before reaping QEMU (Python's
        communicate, a PID 1 that never reaps) would wait for us forever."""
        if old >= 0:
            poller.unregister(old)
        if self.vm is None:
            return -1
        poller.register(self.vm.pidfd, select.POLLIN)
        return self.vm.pidfd

    def _keep(self) -> None:
        """One attempt at what an incoming migration still waits for."""
        assert self.wait is not None
        try:
            self.wait.step()
        except Exception as exc:  # never fail open
            self.wait.fail(f"supervisor: incoming migration: {type(exc).__name__}: {exc}")
        if not self.wait.pending:
            self.wait = None  # what it took for QEMU's life stays in our hands till we exit

    def _note(self, tid: int) -> None:
        """The process a calling thread belongs to (QEMU, or a child of it)."""
        if tid in self.process_of:
            return
        self.process_of[tid] = -1
        try:
            with open(f"/proc/{tid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Tgid:"):
                        self.process_of[tid] = int(line.split()[1])
                        return
        except (OSError, ValueError):
            pass


def _declared(locks: Locks) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """By identity key, from the command line: the disks declared shareable (QEMU
    writes them under the shared lock the wrapper took), the files QEMU reads
    without a lock on purpose (force-share=on, a role the config does not lock)
    and those it also writes so (locking=off, honoured)."""
    from qemu_locked.lock.safeopen import identity_key
    from qemu_locked.model.plan import SHAREABLE

    def keys(paths: list[str]) -> frozenset[str]:
        out = set()
        for path in paths:
            try:
                out.add(identity_key(os.stat(path)))
            except OSError:
                continue  # QEMU cannot open it either
        return frozenset(out)

    plan = locks.plan
    return (
        keys([d.path for d in plan.disks if d.role == SHAREABLE]),
        keys([s.path for s in plan.skipped if s.path]),
        keys([s.path for s in plan.skipped if s.path and s.writes]),
    )
