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
from qemu_locked.beside.supervisor.callers import Callers
from qemu_locked.model.errors import QemuLockedError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from qemu_locked.beside.keeper import VM, Wait
    from qemu_locked.beside.locks import Lock, Locks
    from qemu_locked.model.errors import Conflict

SWEEP_SECONDS = 1.0
WAIT_SECONDS = 0.1  # between attempts at a lock an incoming migration waits for
# The origin `status` shows of a lock taken after start: the kernel tells an open,
# not which device or monitor command asked for it.
AFTER_START = "opened after start"
_REAL_FLAGS_DROPPED = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_TRUNC


class Supervisor:
    """``locks``: the VM's locks, taken through the configured backend exactly as
    the monitor guard takes them (beside/locks.py): our copies are the carriers, and
    a copy of each is planted in QEMU so the lock lives as long as QEMU."""

    def __init__(self, listener: int, vm_pid: int, locks: Callable[[], Locks], inherited: list[int],
                 bookkeeping: frozenset[str] = frozenset(), vm: VM | None = None,
                 wait: Wait | None = None) -> None:  # fmt: skip
        self.listener, self.vm_pid = listener, vm_pid
        self._make_locks = locks  # made once needed, or in the loop's first idle moment
        self._locks: Locks | None = None
        self.vm = vm  # QEMU's pidfd, followed across -daemonize; None: the listener alone
        self.wait = wait  # the migration keeper's work, done here (beside/keeper.py)
        self.bookkeeping = bookkeeping  # pid, log, chardev files: never disks
        self.callers = Callers()
        self.blind = False  # said once: QEMU's memory or cwd cannot be read
        # Our lock fds' numbers in QEMU: a released lock's copy stays there, unlocked,
        # and must not count as QEMU's own use of the file.
        # The start-time lock fds QEMU inherited have the same numbers in QEMU.
        self.planted: set[int] = set(inherited)
        # Files QEMU has opened through us: only those may be let go once it closes
        # them (a start-time disk QEMU has not opened yet must stay locked).
        self.opened: set[str] = set()
        # What the command line declares: disks written shared, files left unlocked.
        self.shareable = self.free_reads = self.free_all = frozenset[str]()

    @property
    def locks(self) -> Locks:
        if self._locks is None:
            from qemu_locked.beside.supervisor import share

            self._locks = self._make_locks()
            self.shareable, self.free_reads, self.free_all = share.declared(self._locks.plan)
        return self._locks

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
            path = self.callers.string(n.pid, addr)
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

    def _serve(self, n: kernel.Notif, target: paths.Target, flags: int) -> None:
        assert target.st is not None
        writes = flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if not self._take(n, target.real, target.st, f"/proc/self/fd/{target.fd}", writes):
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

    def fcntl(self, n: kernel.Notif) -> None:
        """F_DUPFD(_CLOEXEC): how QEMU takes a file it was handed as an fd
        (`add-fd`, `-add-fd`, then `/dev/fdset/N`): no path is opened, so the
        file behind the fd is judged as an open of it would be, then the dup
        runs as QEMU made it."""
        fd = n.args[0] & 0xFFFFFFFF
        link = f"/proc/{n.pid}/fd/{fd}"
        try:
            st = os.stat(link)
            real = os.readlink(link)
        except OSError:
            kernel.proceed(self.listener, n.id)  # EBADF and friends: the kernel says it
            return
        if not paths.lockable(real, st, self.bookkeeping):
            kernel.proceed(self.listener, n.id)
            return
        from qemu_locked.beside.locks import fd_writable

        if self._take(n, real, st, link, fd_writable(n.pid, fd)):
            kernel.proceed(self.listener, n.id)

    def _take(self, n: kernel.Notif, real: str, st: os.stat_result, probe: str,
              writes: bool) -> bool:  # fmt: skip
        """Lock what the call reaches, as the open it is: read-write exclusive
        (shared for a shareable disk), read-only shared.  False when it was
        answered here: refused, or let through unlocked on purpose.  ``probe``:
        a path that reopens the very file (for share.py)."""
        from qemu_locked.beside.locks import Refused
        from qemu_locked.lock.safeopen import identity_key
        from qemu_locked.model.plan import EXCLUSIVE, SHARED

        locks = self.locks  # first: it reads the command line's declarations
        key = identity_key(st)
        if key in self.free_all or (not writes and key in self.free_reads):
            kernel.proceed(self.listener, n.id)  # unlocked on purpose (force-share, locking=off)
            return False
        exclusive = writes and key not in self.shareable
        try:
            lock = locks.want(real, EXCLUSIVE if exclusive else SHARED, "open", AFTER_START)
        except Refused as exc:
            shared = self._share(real, probe) if exclusive else None
            if shared is None:
                self._plant(n)  # a failed upgrade may have taken the shared lock anew
                mode = EXCLUSIVE if exclusive else SHARED
                self._refuse(n, exc.line.removeprefix("qemu-locked: "), real, mode, exc.conflicts)
                return False
            lock = shared
        # From here the sweep judges it by QEMU's fds: a lock taken for a call
        # that then fails is let go like one QEMU closed.
        self.opened.add(lock.key)
        self._plant(n)
        if lock.key != key:  # renamed over between our two looks
            self._refuse(n, f"{real}: changed while being opened", real, lock.mode)
            return False
        return True

    def _plant(self, n: kernel.Notif) -> None:
        """A copy of each new lock fd into the caller (O_CLOEXEC) before it is
        answered, whatever the answer: the lock then lives as long as QEMU."""
        new, self.locks.give[:] = list(self.locks.give), []
        for _name, lock_fd in new:
            try:
                planted = kernel.addfd(self.listener, n.id, lock_fd, True, False)
            except OSError:
                return  # the caller is gone (killed while waiting)
            if self.callers.process_of.get(n.pid) == self.vm_pid:  # QEMU's table, not a child's
                self.planted.add(planted)

    def _share(self, real: str, probe: str) -> Lock | None:
        """A writer refused only by sharers: shared, if every QEMU writing the
        disk declared it shareable (share.py); else None."""
        from qemu_locked.beside.locks import Refused
        from qemu_locked.beside.supervisor import share
        from qemu_locked.model.plan import SHARED

        try:
            if not share.written_shareably(probe):
                return None
            return self.locks.want(real, SHARED, "open", AFTER_START)
        except (Refused, OSError, QemuLockedError):
            return None  # the first refusal is the one to tell

    def _refuse(self, n: kernel.Notif, line: str, path: str, mode: str,
                conflicts: list[Conflict] | None = None) -> None:  # fmt: skip
        say(line)  # first: in the domain log before QEMU's own error
        kernel.refuse(self.listener, n.id, errno.EBUSY)
        from qemu_locked.beside import audit  # once answered: QEMU's call does not wait on it

        locks = self.locks
        audit.refused(locks.config, locks.plan, self.vm_pid, conflicts or [], AFTER_START, line,
                      path, mode)  # fmt: skip

    def sweep(self) -> None:
        """Unlock what QEMU no longer has open, downgrade what it only reads (its
        fds on the file that are not copies of ours: kcmp, as the guard does)."""
        from qemu_locked.model.plan import EXCLUSIVE

        if self._locks is None:
            return  # nothing taken yet
        # QEMU's children that opened files through us: their fds count too (a
        # `migrate exec:` child writing a file keeps its lock).
        children = tuple(self.callers.processes() - {self.vm_pid})
        # An incoming migration's disk is opened but inactive (read-only) until the
        # handover: its lock is the one the source still holds, to be taken in the
        # mode the destination will write in, never downgraded before that.
        waited = {p.fd for p in self.wait.pending} if self.wait is not None else set()
        for lock in list(self.locks.by_key.values()):
            if lock.key not in self.opened or not lock.fds or waited.intersection(lock.fds):
                continue  # not opened by QEMU yet (a start-time disk), or waited for: kept
            if not self.locks.qemu_uses(lock, ignore=self.planted, children=children):
                self.locks.release(lock)
            elif lock.mode == EXCLUSIVE and not self.locks.qemu_uses(
                lock, True, self.planted, children
            ):
                self.locks.downgrade(lock)
        self.locks.take_back.clear()  # QEMU's copies: unlocked, left open (no closefd here)
        self.locks.publish()  # for `qemu-lockctl status` (ORIGIN): a write only on change

    # -- the loop -----------------------------------------------------------------

    def run(self) -> None:
        handlers: dict[int, Callable[[kernel.Notif], None]] = {
            kernel.NR_OPENAT: self.openat, kernel.NR_OPEN: self.open, kernel.NR_CREAT: self.creat,
            kernel.NR_OPENAT2: self.openat2, kernel.NR_OPEN_BY_HANDLE_AT: self.open_by_handle_at,
            kernel.NR_FCNTL: self.fcntl,
        }  # fmt: skip
        kernel.wake_in_step(self.listener)
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        watched = self._watch(poller, -1)
        buf = bytearray(kernel.NOTIF_SIZE)
        sweep_at = monotonic() + SWEEP_SECONDS
        wait_at = monotonic()
        while True:
            # By deadline, not after a quiet second: a busy opener must not starve it.
            due = min(sweep_at, wait_at) if self.wait is not None else sweep_at
            idle = 0.0 if self._locks is None else max(0.0, due - monotonic())
            events = dict(poller.poll(idle * 1000))
            if not events and self._locks is None:
                _ = self.locks  # QEMU is busy elsewhere: make them now, off its path
                continue
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
            self.callers.note(n.pid)
            try:
                handlers[n.nr](n)
            except Exception as exc:  # a bug of ours: that one open fails, closed
                if isinstance(exc, FileNotFoundError) and not kernel.valid(self.listener, n.id):
                    continue  # the calling thread exited meanwhile (its /proc entries went)
                say(f"supervisor: internal error on a trapped call: {type(exc).__name__}: {exc}")
                try:
                    kernel.refuse(self.listener, n.id, errno.EIO)
                except OSError:
                    pass

    def ended(self) -> None:
        """QEMU is gone: its locks go with it (and ours as this process exits)."""
        if self._locks is not None:
            self._locks.ended()

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
