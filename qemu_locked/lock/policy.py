"""Telling a security module's refusal from a file's permissions.

Under AppArmor or SELinux an open or a lock that the file's mode allows can
still fail with EACCES (EPERM for some hooks).  Reported as a permission
problem of the file, or worse as a holder, it sends the operator to the wrong
place: the fix is in the host's policy.  The test is the file's own mode bits
against our ids (what the kernel's DAC check would say); only when they allow
the access is the refusal the policy's.  Used on error paths only.
"""

from __future__ import annotations

import errno
import os

from qemu_locked.model.errors import PolicyDenied

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.model.errors import QemuLockedError

_DENIED = (errno.EACCES, errno.EPERM)
_ACTIONS = {0: "open for reading", 2: "open for writing"}
_MODULES = {"apparmor": "AppArmor", "selinux": "SELinux", "smack": "Smack", "landlock": "Landlock"}


def mode_bits(st: os.stat_result, uid: int, gids: set[int]) -> int:
    """The rwx bits (4, 2, 1) that ``st``'s owner/group/other bits give ``uid``
    in ``gids``: the kernel's DAC check without capabilities or POSIX ACLs."""
    if st.st_uid == uid:
        return (st.st_mode >> 6) & 7
    if st.st_gid in gids:
        return (st.st_mode >> 3) & 7
    return st.st_mode & 7


def mode_allows(st: os.stat_result, want: int) -> bool:
    """Would the mode bits grant this process ``want`` (4 read, 2 write, 1 exec)?

    Root passes (CAP_DAC_OVERRIDE).  POSIX ACLs are not read: a file with ACLs
    may be reported as the policy's doing (the message asks).
    """
    uid = os.geteuid()
    if uid == 0:
        return True
    return mode_bits(st, uid, {os.getegid(), *os.getgroups()}) & want == want


def modules() -> str:
    """Which security modules could have refused (``AppArmor?``), for the message.
    Landlock is named only when no system-wide one is active: a process that
    sandboxed itself is rarely the case."""
    try:
        with open("/sys/kernel/security/lsm", encoding="ascii") as f:
            active = f.read().strip().split(",")
    except OSError:
        active = []  # unreadable under some confinements: name the usual two
    names = [_MODULES[n] for n in active if n in _MODULES and n != "landlock"]
    if not names:
        names = ["Landlock"] if "landlock" in active else ["AppArmor", "SELinux"]
    return "? ".join(names) + "?"


def by_policy(exc: OSError, st: os.stat_result, want: int) -> bool:
    """Is ``exc`` a refusal of an access that ``st``'s mode bits allow?"""
    return exc.errno in _DENIED and mode_allows(st, want)


def denied(path: str, action: str) -> QemuLockedError:
    return PolicyDenied(path, action, modules())


def check_open(path: str, exc: OSError, want: int, at: tuple[int, str] | None = None) -> None:
    """Raise :class:`PolicyDenied` when an open of ``path`` was refused although
    its mode bits allow ``want``: the policy's doing, not the file's.  ``at``:
    (directory fd, name) the open resolved in, never following a symlink, where
    it may have been creating the file (then the directory's bits decide)."""
    if exc.errno not in _DENIED:
        return
    action = _ACTIONS[want & 2]
    try:
        st = os.stat(path) if at is None else os.stat(at[1], dir_fd=at[0], follow_symlinks=False)
    except FileNotFoundError:
        if at is None:
            return
        st, want, action = os.fstat(at[0]), 3, "create"
    except OSError:
        return
    if by_policy(exc, st, want):
        raise denied(path, action) from None
