"""Who holds a lock that no /proc entry here names, as far as the kernel tells.

An OFD lock carries no owner pid (F_OFD_GETLK and /proc/locks both say -1), so
a holder is named only by finding its fd under /proc (:mod:`procfs`).  When
that walk finds nothing, the kernel still tells a few things apart:

* /proc/locks lists every OFD lock of this kernel, whatever PID namespace took
  it: a lock it does not list came over a network filesystem, from another host;
* in the initial PID namespace every process of the machine has a /proc entry:
  a holder not found there is one whose entries this user may not read;
* elsewhere (a container, a "host" of the two-host lab), a holder not found
  although every process here was read is outside this PID namespace.

Used on the refusal path and by ``qemu-lockctl status``; never when a start succeeds.
"""

from __future__ import annotations

import os

from qemu_locked.lock import procfs
from qemu_locked.model.value import frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.lock.procfs import Holder

# States of a ``status`` row whose holder cannot be named.
HIDDEN, ELSEWHERE, UNIDENTIFIED = "hidden", "elsewhere", "unidentified"
_ROOT_NAMES = "`qemu-lockctl status PATH` as root names it"
OTHER_HOST = "a process on another host"
_PROC_PID_INIT_INO = 0xEFFFFFFC  # the initial PID namespace's inode (include/linux/proc_ns.h)


@frozen
class Unseen:
    """A held lock whose holder no /proc entry here shows."""

    state: str  # HIDDEN | ELSEWHERE | UNIDENTIFIED
    holder: str  # what can be said of it, after "locked (exclusive) by"


def kernel_locks() -> list[tuple[str, int, int, str]] | None:
    """(kind, dev, ino, mode) of every lock on byte 0 this kernel holds; None when
    a security module denies /proc/locks (nothing can be said).  /proc/locks is
    readable by everyone, even where the holder's /proc/PID is not."""
    out = []
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                # 1: OFDLCK  ADVISORY  WRITE -1 08:02:1234 0 EOF   ("->" marks a waiter)
                parts = line.split()
                if len(parts) < 8 or parts[1] == "->" or parts[6] != "0":
                    continue
                try:
                    major, minor, ino = parts[5].split(":")
                    dev = os.makedev(int(major, 16), int(minor, 16))
                except ValueError:
                    continue
                mode = "exclusive" if parts[3] == "WRITE" else "shared"
                out.append((parts[1], dev, int(ino), mode))
    except OSError as exc:
        return None if exc.errno in (1, 13) else []
    return out


def locked_here(dev: int, ino: int) -> bool | None:
    """Does this kernel hold a lock on byte 0 of the file that an OFD lock meets
    (flock's do not)?  None: unknowable."""
    found = kernel_locks()
    if found is None:
        return None
    return any((d, i) == (dev, ino) and kind != "FLOCK" for kind, d, i, _ in found)


def _sees_every_process() -> bool:
    """Does this /proc list every process of the machine (the initial PID
    namespace's, not hiding other users' processes from us)?"""
    for probe in ("/proc/1/ns/pid", "/proc/self/ns/pid"):  # the first needs ptrace access
        try:
            if os.stat(probe).st_ino != _PROC_PID_INIT_INO:
                return False
            break
        except OSError:
            continue
    else:
        return False
    return os.geteuid() == 0 or not _hides_pids()


def _hides_pids() -> bool:
    """/proc mounted with hidepid=2 (invisible): other users' processes are not listed."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4] == "/proc":
                    opts = line.rsplit(" ", 1)[-1].strip().split(",")
                    return bool({"hidepid=2", "hidepid=invisible"} & set(opts))
    except OSError:
        return True  # unknown: assume the worst (not every process was read)
    return False


def explain(dev: int, ino: int) -> Unseen:
    """What can be said of the holder of this file's byte-0 lock, called right
    after a :func:`procfs.holders_of` of it found nobody."""
    here = locked_here(dev, ino)
    hidden_by_policy = procfs.hidden_by_policy()
    if here is None or (here and hidden_by_policy):
        from qemu_locked.lock.policy import modules

        what = "/proc/locks" if here is None else "other processes' /proc entries"
        return Unseen(HIDDEN, "a holder this process cannot identify: the host's security "
                      f"policy ({modules()}) denies it {what} ({_ROOT_NAMES})")  # fmt: skip
    if not here:
        return Unseen(ELSEWHERE, OTHER_HOST)
    unread = procfs.unreadable() or (os.geteuid() != 0 and _hides_pids())
    if _sees_every_process():
        if unread:
            return Unseen(HIDDEN, "a local process whose /proc entries this user cannot read "
                          f"({_ROOT_NAMES})")  # fmt: skip
        # Every process read, none holds it: an fd in flight on a socket, or a helper's.
        return Unseen(HIDDEN, "a process on this machine that no /proc entry shows")
    if unread:
        return Unseen(UNIDENTIFIED, "a process this user cannot identify: a local one whose "
                      "/proc entries it cannot read, or one in another PID namespace "
                      "(`qemu-lockctl status PATH` as root here tells which)")  # fmt: skip
    return Unseen(ELSEWHERE, "a process in another PID namespace on this machine (a "
                  "container, or another host sharing this kernel): no /proc entry here shows it, "
                  "no record names it")  # fmt: skip


def describe(holders: list[Holder], mode_hint: str, dev: int = -1, ino: int = -1) -> str:
    """``(exclusive) by pid 4242, guest 'web'`` for a refusal message."""
    if not holders:
        who = explain(dev, ino).holder if dev >= 0 else OTHER_HOST
        return f"({mode_hint}) by {who}"
    mode = "exclusive" if any(h.mode == "exclusive" for h in holders) else "shared"
    return f"({mode}) by " + " and ".join(h.describe() for h in holders)
