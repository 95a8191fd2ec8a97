"""Lease files in a lockspace directory: the lockspace backend and the domain lease.

One file per resource, named by the sha256 of a stable resource key, locked with
the same OFD primitive as images.  A shared filesystem mounted there (NFSv4,
CephFS, GPFS...) makes the protection span every host that mounts it.

Layout of a lease file:

* byte 0 is the lease: F_WRLCK exclusive, F_RDLCK shared;
* bytes 1..SLOTS are holder slots: each holder write-locks one free slot byte
  and writes its record (host, pid, boot id, guest, uuid, mode, since, key) at
  ``slot * RECORD_SIZE``.  A record is live exactly while its slot byte is
  locked, so the lock is the truth and a record is never trusted alone.

Files are created without following symlinks (O_NOFOLLOW, relative to an fd of
the directory) and must be regular files with one link.  Unlinking one would
split waiters across two inodes, so only ``qemu-lockctl lockspace gc``
(:mod:`.gc`) removes them, each while holding its exclusive lock; every acquirer,
once it holds a lock, checks that the name still leads to the inode it locked
(:meth:`Lockspace.still_names`) and starts over on the file now there otherwise.
"""

from __future__ import annotations

import os
import stat
import time

from qemu_locked.backends.lockspace.record import (
    MAGIC,
    RECORD_SIZE,
    Record,
    decode_record,
    encode_record,
)
from qemu_locked.lock import ofd
from qemu_locked.lock.acquire import NO_WAIT, take_all
from qemu_locked.lock.held import Held, Pending
from qemu_locked.lock.keys import digest
from qemu_locked.lock.policy import check_open
from qemu_locked.model.claim import Claim, merged
from qemu_locked.model.errors import BackendError
from qemu_locked.model.value import frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.model.config import Config
    from qemu_locked.model.errors import Conflict
    from qemu_locked.model.plan import Plan

SLOTS = 64
_FILE_MODE = 0o660  # the libvirt-qemu user locks them through the directory's group


def lease_name(key: str) -> str:
    return digest(key) + ".lease"


_BOOT_ID: list[str] = []


def boot_id() -> str:
    if _BOOT_ID:
        return _BOOT_ID[0]
    _BOOT_ID.append(_read_boot_id())
    return _BOOT_ID[0]


def _read_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read(64).decode("ascii", "replace").strip()
    except OSError:
        return ""


class LeaseMissing(BackendError):
    """No lease file yet: nobody ever held that resource."""


class Lockspace:
    """A lockspace directory, held open so lease names resolve inside it only."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.dirfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BackendError(
                f"lockspace_dir {path} does not exist (create it: qemu-lockctl lockspace init)"
            ) from None
        except OSError as exc:
            check_open(path, exc, 4)
            raise BackendError(f"lockspace_dir {path}: {exc.strerror}") from None

    def close(self) -> None:
        os.close(self.dirfd)

    def open_lease(self, name: str, create: bool = True, readonly: bool = False) -> int:
        """An fd of a lease file (read-write), created if missing; never a symlink."""
        access = os.O_RDONLY if readonly else os.O_RDWR
        flags = access | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        where = f"{self.path}/{name}"
        while True:
            try:
                fd = os.open(
                    name, flags | (os.O_CREAT if create else 0), _FILE_MODE, dir_fd=self.dirfd
                )
            except FileNotFoundError as exc:
                if create:  # the directory itself went away under us
                    raise BackendError(f"{self.path}/{name}: {exc.strerror}") from None
                raise LeaseMissing(f"{self.path}/{name}: no such lease") from None
            except OSError as exc:
                if exc.errno == 40:
                    raise BackendError(f"{where}: is a symlink, refusing to use it") from None
                check_open(where, exc, 4 if readonly else 6, at=(self.dirfd, name))
                raise BackendError(f"{where}: {exc.strerror}") from None
            try:
                st = os.fstat(fd)
                if st.st_nlink == 0:  # a collector removed it after our open: again
                    os.close(fd)
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    raise BackendError(f"{where}: not a plain lease file (type or links)")
                if (
                    st.st_size == 0
                    and stat.S_IMODE(st.st_mode) != _FILE_MODE
                    and st.st_uid == os.geteuid()
                ):
                    os.fchmod(fd, _FILE_MODE)  # the umask may have narrowed it
            except BaseException:
                os.close(fd)
                raise
            return fd

    def still_names(self, name: str, fd: int) -> bool:
        """Does ``name`` still lead to the file ``fd`` has open (not removed or replaced)?"""
        try:
            st, mine = os.stat(name, dir_fd=self.dirfd, follow_symlinks=False), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def open_locked(self, name: str, exclusive: bool, deadline: float) -> tuple[int, bool]:
        """An fd of lease ``name`` and whether its lock was taken by ``deadline``.

        A lock taken on a file that a collector removed meanwhile protects
        nothing: the file now under that name is opened and locked instead."""
        while True:
            fd = self.open_lease(name)
            got = ofd.lock_until(fd, exclusive, deadline)
            if not got or self.still_names(name, fd):
                return fd, got
            os.close(fd)

    def names(self) -> list[str]:
        try:
            return sorted(
                n for n in os.listdir(self.dirfd) if n.endswith(".lease") and len(n) == 70
            )
        except OSError as exc:
            raise BackendError(f"lockspace_dir {self.path}: {exc.strerror}") from None


def take_slot(fd: int) -> int | None:
    for slot in range(1, SLOTS + 1):
        if ofd.try_lock(fd, True, byte=slot):
            return slot
    return None


def write_record(fd: int, slot: int, key: str, mode: str, me: Identity, label: str = "") -> None:
    """``label``: the claim's, which for a disk is the path the VM was given."""
    data = encode_record({
        "host": me.host, "pid": str(me.pid), "boot": boot_id(), "guest": me.guest or "",
        "uuid": me.uuid or "", "mode": mode, "since": f"{time.time():.3f}", "key": key,
        "path": label if label.startswith("/") else "",
    })  # fmt: skip
    try:
        written = os.pwrite(fd, data, slot * RECORD_SIZE)
    except OSError as exc:
        raise BackendError(f"cannot write the lease record: {exc.strerror}") from None
    if written != len(data):
        raise BackendError("cannot write the lease record: short write (filesystem full?)")


def read_records(fd: int, lease_held: bool = True) -> list[Record]:
    """Every record in a lease file, with ``live`` from its slot lock.

    ``lease_held=False`` (byte 0 is known free) marks them all stale without
    probing each slot: a free lease has no live holder.
    """
    try:
        data = os.pread(fd, (SLOTS + 1) * RECORD_SIZE, 0)
    except OSError:
        return []
    out = []
    for slot in range(1, min(SLOTS, len(data) // RECORD_SIZE - 1) + 1):
        raw = data[slot * RECORD_SIZE : (slot + 1) * RECORD_SIZE]
        if not raw.startswith(MAGIC):
            continue
        held = False
        if lease_held:
            held = ofd.conflicting(fd, True, byte=slot) is not None
        rec = decode_record(slot, raw, held)
        if rec is not None:
            out.append(rec)
    return out


def describe_holders(fd: int, mode_hint: str) -> str:
    live = [r for r in read_records(fd) if r.live]
    if not live:
        return f"({mode_hint}) by a holder that left no record"
    mode = "exclusive" if any(r.mode == "exclusive" for r in live) else "shared"
    return f"({mode}) by " + " and ".join(r.describe() for r in live)


@frozen
class Identity:
    """Who we are, for the records we leave (the holder others will see)."""

    host: str
    guest: str | None
    uuid: str | None
    pid: int


class LeasePending(Pending):
    """A busy lease for the migration keeper: once taken, its record is written."""

    def __init__(self, fd: int, claim: Claim, directory: str) -> None:
        super().__init__(fd, claim.exclusive, claim.label)
        self.key = claim.key
        self.directory = directory

    def try_take(self) -> bool:
        if not ofd.try_lock(self.fd, self.exclusive):
            return False
        space = Lockspace(self.directory)
        try:
            name = lease_name(self.key)
            if space.still_names(name, self.fd):
                return True
            # A collector removed the file we waited on.  QEMU's copy of this fd
            # now locks nothing anyone sees: the keeper takes the file now under
            # that name on an fd of its own and holds it until QEMU exits.
            ofd.unlock(self.fd)
            os.close(self.fd)
            self.fd = space.open_lease(name)
            self.holds_for_life = True
        finally:
            space.close()
        return False  # tried again on the next round, on the new file

    def taken(self, config: Config, plan: Plan, vm_pid: int) -> None:
        slot = take_slot(self.fd)
        if slot is not None:
            mode = "exclusive" if self.exclusive else "shared"
            me = Identity(config.effective_host(), plan.guest, plan.uuid, vm_pid)
            write_record(self.fd, slot, self.key, mode, me, self.label)

    def holders(self) -> str:
        return describe_holders(self.fd, "exclusive")


def acquire(
    space: Lockspace, wants: list[Claim], me: Identity, deadline: float, defer: bool = False
) -> Held:
    """Take every lease, all or nothing; then leave one record in each.

    Records are written only once every lease is held, so a refused start
    leaves none behind.  With ``defer``, busy leases stay open and pending (for
    the migration keeper, which writes their records once it holds them).
    """
    held = Held()
    fds: dict[str, int] = {}

    def take(claim: Claim, until: float) -> bool:
        fd, got = space.open_locked(
            lease_name(claim.key), claim.exclusive, NO_WAIT if defer else until
        )
        held.fds.append(fd)
        fds[claim.key] = fd
        if defer:
            if not got:
                held.pending.append(LeasePending(fd, claim, space.path))
            return True
        return got

    def refusal(claim: Claim) -> Conflict:
        return claim.label, claim.mode, describe_holders(fds[claim.key], "exclusive")

    try:
        todo = merged(wants, lambda c: lease_name(c.key))
        take_all(todo, take, refusal, deadline)
        pending = {p.fd for p in held.pending}
        for claim in todo:
            fd = fds[claim.key]
            if fd in pending:
                continue
            slot = take_slot(fd)
            if slot is not None:
                held.records.append((fd, slot * RECORD_SIZE, RECORD_SIZE))
                write_record(fd, slot, claim.key, claim.mode, me, claim.label)
    except BaseException:
        held.abandon()
        raise
    return held


def conflicts(space: Lockspace, wants: list[Claim]) -> list[Conflict]:
    """What would refuse these leases now (F_OFD_GETLK: takes nothing)."""
    out = []
    for w in merged(wants, lambda c: lease_name(c.key)):
        try:
            fd = space.open_lease(lease_name(w.key), create=False, readonly=True)
        except LeaseMissing:
            continue  # nobody ever held it; any other trouble is reported
        try:
            if ofd.conflicting(fd, w.exclusive):
                out.append((w.label, w.mode, describe_holders(fd, "exclusive")))
        finally:
            os.close(fd)
    return out


RECORD_PID: int | None = None  # set by the monitor guard: its leases are its QEMU's


def identity_for(plan: Plan, config: Config) -> Identity:
    """This start, as its lease records name it (QEMU keeps our pid after exec)."""
    return Identity(config.effective_host(), plan.guest, plan.uuid, RECORD_PID or os.getpid())


def acquire_in(
    directory: str, wants: list[Claim], me: Identity, deadline: float, defer: bool = False
) -> Held:
    """:func:`acquire` in the lockspace directory ``directory``."""
    space = Lockspace(directory)
    try:
        return acquire(space, wants, me, deadline, defer)
    finally:
        space.close()


def conflicts_in(directory: str, wants: list[Claim]) -> list[Conflict]:
    """:func:`conflicts` in the lockspace directory ``directory``."""
    space = Lockspace(directory)
    try:
        return conflicts(space, wants)
    finally:
        space.close()
