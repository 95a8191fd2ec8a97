"""What /proc tells about other processes: their fds, their locks, their VM.

/proc/locks shows pid -1 for OFD locks, so holders are found by walking the
fds of every process we can see (the one walk: :func:`fd_entries`) and
matching device:inode in their fdinfo ``lock:`` lines; the VM's name comes
from /proc/PID/cmdline.  Used on the refusal path, by ``qemu-lockctl status``
and the migration keeper's rows; never when a start succeeds.
"""

from __future__ import annotations

import os

from qemu_locked.model.value import frozen
from qemu_locked.parse.keyval import split_opts

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator


@frozen
class Holder:
    pid: int
    mode: str  # "exclusive" | "shared"
    guest: str | None = None
    uuid: str | None = None
    comm: str = ""
    since: float | None = None  # process start, seconds since the epoch

    def describe(self) -> str:
        text = f"pid {self.pid}"
        if self.guest:
            text += f", guest '{self.guest}'"
        elif self.comm:
            text += f" ({self.comm})"
        return text


@frozen
class FileLock:
    """One byte-0 lock seen in some process's fdinfo."""

    pid: int
    fd: int
    path: str
    dev: int
    ino: int
    mode: str
    kind: str  # OFDLCK | POSIX | FLOCK


def _read(path: str, limit: int = 1 << 16) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def guest_of(pid: int) -> tuple[str | None, str | None, str]:
    """(guest name, uuid, comm) of a process, from its command line."""
    try:
        argv = _read(f"/proc/{pid}/cmdline", 1 << 20).decode(errors="replace").split("\0")
    except OSError:
        argv = []
    guest = uuid = None
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-name", "--name"):
            guest = dict(split_opts(argv[i + 1], "guest")).get("guest") or guest
        elif arg in ("-uuid", "--uuid"):
            uuid = argv[i + 1]
    return guest, uuid, comm(pid)


def start_time(pid: int) -> float | None:
    try:
        stat = _read(f"/proc/{pid}/stat").decode()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def comm(pid: int) -> str:
    try:
        return _read(f"/proc/{pid}/comm").decode(errors="replace").strip()
    except OSError:
        return ""


def fd_entries(
    pid: int, match: set[tuple[int, int]] | None = None
) -> Iterator[tuple[str, str, str]]:
    """(fd, link target, fdinfo text) of each fd of a process we may read.

    With ``match``, only fds on those (dev, inode) files: a stat() of the fd
    is much cheaper than reading its fdinfo, and a host running VMs has
    thousands of fds (sockets, eventfds) that can be skipped that way.
    """
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError as exc:
        _note_hidden(f"/proc/{pid}/fd", exc)
        return
    for fd in fds:
        link = f"/proc/{pid}/fd/{fd}"
        try:
            if match is not None:
                st = os.stat(link)
                if (st.st_dev, st.st_ino) not in match:
                    continue
            target = os.readlink(link)
            info = _read(f"/proc/{pid}/fdinfo/{fd}").decode(errors="replace")
        except OSError as exc:
            if exc.errno in (1, 13):  # the listing was allowed, following an fd is not
                _note_hidden(f"/proc/{pid}/fd", exc)
                return
            continue  # closed meanwhile
        yield fd, target, info


# Processes whose fds the last scan could not read: a lock it did not find may be
# theirs (lock/unseen.py tells what else it may be).  Of those, the /proc
# directories a security module hid although their modes let us list them: a
# refusal then says so instead of blaming permissions.
_UNREADABLE: set[str] = set()
_HIDDEN_BY_POLICY: set[str] = set()


def _note_hidden(directory: str, exc: OSError) -> None:
    from qemu_locked.lock.policy import by_policy

    if exc.errno not in (1, 13):
        return  # gone meanwhile: nothing hidden
    _UNREADABLE.add(directory)
    try:
        if by_policy(exc, os.stat(directory), 5):
            _HIDDEN_BY_POLICY.add(directory)
    except OSError:
        pass


def unreadable() -> bool:
    """Were some processes' fds unreadable to the last scan?"""
    return bool(_UNREADABLE)


def hidden_by_policy() -> bool:
    """Did a security module hide some of them?"""
    return bool(_HIDDEN_BY_POLICY)


def lock_lines(info: str) -> Iterator[tuple[str, str, int, int, int]]:
    """(kind, mode, dev, ino, start) of each lock in an fdinfo text."""
    for line in info.splitlines():
        if not line.startswith("lock:"):
            continue
        # lock:	1: OFDLCK  ADVISORY  WRITE -1 08:02:1234 0 0
        parts = line.split()
        try:
            kind, access = parts[2], parts[4]
            major, minor, ino = parts[6].split(":")
            start = int(parts[7])
        except (IndexError, ValueError):
            continue
        dev = os.makedev(int(major, 16), int(minor, 16))
        yield kind, "exclusive" if access == "WRITE" else "shared", dev, int(ino), start


def fd_locks(pid: int) -> dict[str, list[tuple[str, str, int]]]:
    """path -> [(kind, mode, start byte)] of the locks held through a process's fds.

    Every lock, not just byte 0: QEMU's own image locks (bytes 100-204) too.
    """
    out: dict[str, list[tuple[str, str, int]]] = {}
    for _fd, path, info in fd_entries(pid):
        for kind, mode, _dev, _ino, start in lock_lines(info):
            out.setdefault(path, []).append((kind, mode, start))
    return out


_SYS_KCMP = {"x86_64": 312, "aarch64": 272}
_KCMP_FILE = 0


def same_description(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """Do two fds share one open file description (kcmp(2), KCMP_FILE)?  The
    same file is not enough: another process may have opened it on its own.
    OSError when that cannot be known (ProcessLookupError: one is gone)."""
    import ctypes

    nr = _SYS_KCMP.get(os.uname().machine)
    if nr is None:
        raise OSError(38, "kcmp: unknown syscall number on this machine")
    libc = ctypes.CDLL(None, use_errno=True)
    r = libc.syscall(nr, pid1, pid2, _KCMP_FILE, fd1, fd2)
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return bool(r == 0)


def pids() -> list[int]:
    try:
        return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    except OSError as exc:
        _note_hidden("/proc", exc)
        return []


# The monitor guard (beside/guard/start.py) and the supervisor (beside/supervisor) keep
# a copy of lock fds of their QEMU, which holds the same open file description:
# the lock is QEMU's.  Each keeps a pidfd of its QEMU, by which it is told apart.
GUARD_COMM = "ql-guard"
SUPERVISOR_COMM = "ql-supervisor"
HELPER_COMMS = (GUARD_COMM, SUPERVISOR_COMM)


def guards_outliving_their_vm() -> list[int]:
    """Guards whose QEMU has exited but that have not yet closed what they hold."""
    out = []
    for pid in pids():
        if comm(pid) not in HELPER_COMMS:
            continue
        for _fd, target, info in fd_entries(pid):
            if "pidfd" not in target:
                continue
            line = next((ln for ln in info.splitlines() if ln.startswith("Pid:")), "Pid:\t-1")
            vm = line.split()[1]
            if vm == "-1" or _state(int(vm)) in ("Z", "X", ""):
                out.append(pid)
    return out


def _state(pid: int) -> str:
    try:
        return _read(f"/proc/{pid}/stat").decode().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def scan(match: set[tuple[int, int]] | None = None) -> Iterator[FileLock]:
    """Every byte-0 lock held through an fd we can see (optionally only these files).
    What the policy hid is noted afresh for each scan (a guard lives for days)."""
    _HIDDEN_BY_POLICY.clear()
    _UNREADABLE.clear()
    me = os.getpid()
    for pid in pids():
        if pid == me or comm(pid) in HELPER_COMMS:
            continue
        for fd, path, info in fd_entries(pid, match):
            for kind, mode, dev, ino, start in lock_lines(info):
                if start == 0 and (match is None or (dev, ino) in match):
                    yield FileLock(pid, int(fd), path, dev, ino, mode, kind)


def holders_of(dev: int, ino: int, pid_hint: int = -1) -> list[Holder]:
    """The processes holding byte 0 of this file, best effort."""
    pids: dict[int, str] = {}
    for lock in scan({(dev, ino)}):
        prev = pids.get(lock.pid)
        pids[lock.pid] = "exclusive" if "exclusive" in (prev, lock.mode) else lock.mode
    if not pids and pid_hint > 0:
        pids[pid_hint] = "exclusive"
    out = []
    for pid, mode in sorted(pids.items()):
        guest, uuid, comm = guest_of(pid)
        out.append(Holder(pid, mode, guest, uuid, comm, start_time(pid)))
    return out
