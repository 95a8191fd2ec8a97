"""The locks the monitor guard holds for a running QEMU, one per disk (inode).

Each lock is taken through the configured backend, exactly as the wrapper
takes a command-line disk, so the backend decides what a lock is (byte 0 of
the image, a lease file, a sanlock lease).  OFD locks belong to the open file
description: the guard keeps a copy of every lock fd it holds for QEMU and
QEMU holds another (start-time locks were inherited across exec; new ones are
handed over with ``getfd`` under a reserved name), so a lock dies with QEMU
and never with the guard alone, and the guard can still downgrade or release
it on the shared description.

Nothing is released or downgraded on QEMU's word: only once the command that
drops a disk succeeded *and* QEMU's /proc/PID/fd holds no fd on that file
besides our own lock fds (compared with kcmp, so a forged fd cannot pass).
"""

from __future__ import annotations

import fcntl
import os

from qemu_locked.lock import ofd, safeopen
from qemu_locked.model.errors import LockedError, QemuLockedError
from qemu_locked.model.plan import EXCLUSIVE, SHARED, DiskRef, Plan

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.lock.held import Held
    from qemu_locked.model.config import Config
    from qemu_locked.model.errors import Conflict

FD_NAME_PREFIX = "qemu-locked-"  # getfd names the guard reserves for itself
MEMFD_NAME = "qemu-locked-guard"  # what it holds, for qemu-lockctl status (admin/published.py)
NET = "net"  # a line of it naming a network disk (older readers skip it: not a pid)
_UNLOCK_ALL = ofd._build_flock(ofd.F_UNLCK, 0, 0)
_O_ACCMODE = 3


class Lock:
    """One disk QEMU uses, locked for it."""

    __slots__ = ("fds", "key", "mode", "names", "nodes", "origin", "path", "registrations",
                 "start")  # fmt: skip

    def __init__(self, key: str, path: str, mode: str, origin: str) -> None:
        self.key = key
        self.path = path
        self.mode = mode
        self.origin = origin
        self.fds: list[int] = []  # the guard's copies of the lock fds
        self.names: list[str] = []  # their names in QEMU (getfd); none for start-time fds
        self.nodes: set[str] = set()  # nodes (or devices) that use this file
        self.start = False  # taken by the wrapper before exec
        self.registrations: list[Held] = []  # sanlock: released through the daemon


class Refused(Exception):
    """A lock this command needs is held elsewhere: ``line`` says by whom;
    ``conflicts``, the same as facts (for the audit trail), when it is a holder."""

    def __init__(self, line: str, conflicts: list[Conflict] | None = None) -> None:
        super().__init__(line)
        self.line = line
        self.conflicts = conflicts or []


def _line(exc: QemuLockedError) -> str:
    return "qemu-locked: " + "; ".join(exc.lines())


def _refused(exc: QemuLockedError) -> Refused:
    return Refused(_line(exc), exc.conflicts if isinstance(exc, LockedError) else None)


class Locks:
    def __init__(self, config: Config, plan: Plan, qemu_pid: int) -> None:
        if config.backend != "sanlock":
            from qemu_locked.backends.lockspace import leases

            leases.RECORD_PID = qemu_pid  # the leases taken here are QEMU's: records name it
        self.config = config
        self.plan = plan
        self.qemu_pid = qemu_pid
        self.by_key: dict[str, Lock] = {}
        self.give: list[tuple[str, int]] = []  # (name, fd) to hand to QEMU with getfd
        self.added: list[tuple[str, str]] = []  # (key, user) since the policy last cleared it
        self.take_back: list[str] = []  # names QEMU should closefd
        self.leases: list[int] = []  # the domain lease's fds: its record is erased at the end
        self._serial = 0
        self._memfd = -1
        self._shown = b""

    # -- start-time locks -------------------------------------------------------------

    def adopt(self, fds: list[int], keep: frozenset[int] = frozenset()) -> None:
        """The wrapper's lock fds (shared with QEMU): which disk each one locks.
        The domain lease's are kept aside (its record is erased when QEMU exits),
        others closed, but for ``keep`` (a lock an incoming migration waits for)."""
        idents: dict[str, DiskRef] = {}
        for disk in self.plan.disks:
            try:
                idents[safeopen.identity_key(os.stat(disk.path))] = disk
            except OSError:
                continue
        leases = self._lease_names(idents)
        for fd in fds:
            try:
                st = os.fstat(fd)
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            key = safeopen.identity_key(st)
            found = (key, idents[key]) if key in idents else leases.get(os.path.basename(target))
            if found is None:
                if target.endswith(".lease"):  # the domain lease: held for QEMU's life
                    self.leases.append(fd)
                elif fd not in keep:
                    os.close(fd)
                continue
            key, disk = found
            lock = self.by_key.get(key)
            if lock is None:
                lock = self.by_key[key] = Lock(key, disk.path, disk.mode, disk.origin)
                lock.start = True
            lock.fds.append(fd)

    def _lease_names(self, idents: dict[str, DiskRef],
                     ) -> dict[str, tuple[str, DiskRef]]:  # fmt: skip
        if self.config.backend == "direct" and not any(k[0] == "b" for k in idents):
            return {}
        from qemu_locked.backends.lockspace.leases import lease_name
        from qemu_locked.lock.keys import disk_key

        out = {}
        for key, disk in idents.items():
            try:
                out[lease_name(disk_key(disk.path, os.stat(disk.path)))] = (key, disk)
            except OSError:
                continue
        return out

    # -- taking -----------------------------------------------------------------------

    def want(self, path: str, mode: str, user: str, origin: str, defer_ok: bool = False) -> Lock:
        """Hold ``path`` for QEMU in at least ``mode`` (raises Refused).

        ``defer_ok``: if it cannot be exclusive now, shared will do until a
        writer attaches (libvirt adds a format node before the device says
        whether it is shareable).
        """
        try:
            key = safeopen.identity_key(safeopen.check(path))
        except QemuLockedError as exc:
            raise _refused(exc) from None
        lock = before = self.by_key.get(key)
        mode_before = lock.mode if lock is not None else None
        if lock is None:
            lock = Lock(key, path, mode, origin)
            try:
                self._acquire(lock, mode)
            except Refused:
                if not (defer_ok and mode == EXCLUSIVE):
                    raise
                self._acquire(lock, SHARED)  # exclusive once a writer attaches
            self.by_key[key] = lock
        elif mode == EXCLUSIVE and lock.mode != EXCLUSIVE:
            try:
                self.upgrade(lock)
            except Refused:
                if not lock.fds:  # lost while taking it anew: not even shared any more
                    del self.by_key[key]
                    self._audit("released", lock)
                    raise
                if not defer_ok:
                    raise
        if user not in lock.nodes:
            lock.nodes.add(user)
            self.added.append((key, user))
        if not lock.start:
            lock.origin = origin
        if lock is not before or lock.mode != mode_before:
            self._audit("locked", lock)
        return lock

    def _acquire(self, lock: Lock, mode: str) -> None:
        from qemu_locked.backends import load

        plan = Plan((DiskRef(lock.path, mode, lock.origin),), (), *self._names())
        try:
            held = load(self.config.backend).acquire(plan, self.config, 0.0)
        except QemuLockedError as exc:
            raise _refused(exc) from None
        lock.mode = mode
        for fd in held.fds:
            self._serial += 1
            name = f"{FD_NAME_PREFIX}{self._serial}"
            lock.fds.append(fd)
            lock.names.append(name)
            self.give.append((name, fd))
        if self.config.backend == "sanlock":
            lock.registrations.append(held)  # it closes its fd when released
        else:
            held.fds = []

    def _names(self) -> tuple[str | None, str | None]:
        """The VM's name and uuid for a backend's records; sanlock would take the
        domain lease again with them (QEMU already holds it)."""
        if self.config.backend == "sanlock":
            return None, None
        return self.plan.guest, self.plan.uuid

    def upgrade(self, lock: Lock) -> None:
        """Shared to exclusive on the same descriptions, else anew (raises Refused)."""
        try:
            if not self._in_place:
                raise OSError("a sanlock lease changes mode only by taking it anew")
            if all(ofd.try_lock(fd, True) for fd in lock.fds):
                lock.mode = EXCLUSIVE
                return
            for fd in lock.fds:
                ofd.try_lock(fd, False)  # back to what it was: never weaker than shared
            busy = True
        except (OSError, QemuLockedError):  # EBADF: opened read-only for a shared lock
            busy = False  # take it anew
        if busy:
            raise self._busy(lock)
        self._drop(lock)
        try:
            self._acquire(lock, EXCLUSIVE)
        except Refused:
            self._acquire(lock, SHARED)  # may be refused too: then it is not held at all
            raise

    def _busy(self, lock: Lock) -> Refused:
        """Who keeps this disk from being exclusive: its other holders (this VM's
        own shared lock would conflict too, and is not news)."""
        if lock.key.startswith("f:"):  # an image's own byte 0 (direct): read from /proc
            from qemu_locked.lock import procfs, unseen

            st = os.stat(lock.path)
            who = [h for h in procfs.holders_of(st.st_dev, st.st_ino) if h.pid != self.qemu_pid]
            if who:
                return _refused(LockedError([(lock.path, EXCLUSIVE, unseen.describe(who, SHARED))]))
        from qemu_locked.backends import load

        plan = Plan((DiskRef(lock.path, EXCLUSIVE, lock.origin),), (), *self._names())
        try:
            found = load(self.config.backend).conflicts(plan, self.config)
        except QemuLockedError as exc:
            return _refused(exc)
        return _refused(LockedError(found or [(lock.path, EXCLUSIVE, "by another holder")]))

    # -- letting go -------------------------------------------------------------------

    def downgrade(self, lock: Lock) -> None:
        if not self._in_place:
            return  # a sanlock lease stays exclusive: stricter than needed, never weaker
        held = [ofd.try_lock(fd, False) for fd in lock.fds]
        lock.mode = SHARED
        if held and all(held):  # not a lock an incoming migration still waits for
            self._audit("locked", lock)

    @property
    def _in_place(self) -> bool:
        """Whether a lock changes mode on its own fds (OFD locks: image or lease
        file); a sanlock fd is a registration, not a lock."""
        return self.config.backend != "sanlock"

    def release(self, lock: Lock) -> None:
        self._drop(lock)
        self.by_key.pop(lock.key, None)
        self._audit("released", lock)

    def ended(self) -> None:
        """QEMU exited, and every lock with it: a ``released`` line for each one held
        (not for one an incoming migration waited for in vain)."""
        from qemu_locked.lock import procfs

        held = {int(fd) for fd, _target, info in procfs.fd_entries(os.getpid())
                if any(procfs.lock_lines(info))}  # fmt: skip
        for lock in self.by_key.values():
            if lock.registrations or held.intersection(lock.fds):
                self._audit("released", lock, "the VM exited")
        self._erase([*self.leases, *(fd for lock in self.by_key.values() for fd in lock.fds)])

    def _erase(self, fds: list[int]) -> None:
        """QEMU's lease records in the slots these fds hold: none left stale."""
        if self.config.backend != "sanlock" and fds:
            from qemu_locked.backends.lockspace.cleanup import erase_records

            erase_records(fds, self.qemu_pid)

    def _audit(self, action: str, lock: Lock, detail: str | None = None) -> None:
        """A line in the audit trail: ``locked`` in the mode now held, or ``released``."""
        from qemu_locked.beside import audit

        audit.note(self.config, self.plan, self.qemu_pid, action, lock.path, lock.mode,
                   origin=lock.origin, detail=detail)  # fmt: skip

    def _drop(self, lock: Lock) -> None:
        # Fds not handed to QEMU yet (a refused command took them) are just
        # forgotten: a getfd of a closed fd would fail, and QEMU has no copy.
        mine = set(lock.names)
        handed = [name for name in lock.names if name not in {n for n, _ in self.give}]
        self.give[:] = [(name, fd) for name, fd in self.give if name not in mine]
        if lock.registrations:
            from qemu_locked.backends.sanlock.start import release

            for held in lock.registrations:
                release(held, self.config)  # QEMU's copy stays open until closefd
            lock.registrations, lock.fds = [], []
        self._erase(lock.fds)
        for fd in lock.fds:
            try:
                fcntl.fcntl(fd, ofd.F_OFD_SETLK, _UNLOCK_ALL)  # lease slots too
            except OSError:
                pass
            os.close(fd)
        self.take_back.extend(handed)
        lock.fds, lock.names = [], []

    # -- what QEMU itself has open ----------------------------------------------------

    def qemu_uses(self, lock: Lock, writable_only: bool = False, ignore: set[int] | None = None,
                  children: tuple[int, ...] = ()) -> bool:  # fmt: skip
        """Does QEMU (or one of ``children``, processes it started that opened
        files through the supervisor) hold an fd on this disk that is not one of
        our lock fds (nor, in QEMU, one of the fd numbers in ``ignore``)?  True
        whenever QEMU's cannot be known (fail closed); a child gone uses nothing."""
        if self._uses(self.qemu_pid, lock, writable_only, ignore):
            return True
        return any(self._uses(pid, lock, writable_only, None) for pid in children)

    def _uses(self, pid: int, lock: Lock, writable_only: bool, ignore: set[int] | None) -> bool:
        base = f"/proc/{pid}/fd"
        try:
            entries = os.listdir(base)
        except FileNotFoundError:
            return pid == self.qemu_pid
        except OSError:
            return True
        for entry in entries:
            try:
                st = os.stat(f"{base}/{entry}")
            except OSError:
                continue  # closed meanwhile
            if safeopen.identity_key(st) != lock.key or (ignore and int(entry) in ignore):
                continue
            if any(self._same(pid, int(entry), fd) for fd in lock.fds):
                continue
            if not writable_only or fd_writable(pid, int(entry)):
                return True
        return False

    @staticmethod
    def _same(pid: int, qfd: int, fd: int) -> bool:
        """Is that process's fd one of our lock fds?  No, whenever that cannot be known."""
        from qemu_locked.lock import procfs

        try:
            return procfs.same_description(pid, qfd, os.getpid(), fd)
        except OSError:
            return False

    def publish(self) -> None:
        """What the guard holds and why, in a memfd only it has: ``qemu-lockctl
        status`` reads it through /proc (no file to leave behind)."""
        text = "".join(
            f"{self.qemu_pid}\t{lock.path}\t{lock.origin}\n".replace("\0", "")
            for lock in self.by_key.values()
            if lock.fds
        )
        # The command line's network disks: nothing to lock, still to be shown.
        text += "".join(
            f"{NET}\t{self.qemu_pid}\t{s.source}\t{s.reason}\n".replace("\0", "")
            for s in self.plan.skipped
            if s.network and "\n" not in s.source + s.reason
        )
        data = text.encode("utf-8", "surrogateescape")
        if data == self._shown:
            return
        if self._memfd < 0:
            self._memfd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        os.ftruncate(self._memfd, 0)
        os.pwrite(self._memfd, data, 0)
        self._shown = data


def fd_writable(pid: int, fd: int) -> bool:
    """Whether that fd of that process was opened for writing (yes whenever that
    cannot be known: fail closed)."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8) & _O_ACCMODE != os.O_RDONLY
    except (OSError, ValueError, IndexError):
        pass
    return True
