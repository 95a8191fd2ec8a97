"""Run a command under a real Landlock ruleset: a security module's refusal of an
access that the files' own modes allow, the way AppArmor or SELinux refuse a
confined QEMU (this kernel has Landlock, and no AppArmor or SELinux).

Usage: python3 landlocked.py [--deny-write DIR]... [--deny-read DIR]... -- CMD ARGS...

Landlock only grants: what is off the way to a denied DIR is granted whole, the
DIR's ancestors are walked sibling by sibling, and the DIR gets all but the
denied rights; so only what is under DIR is refused (and new files beside its
ancestors, which no rule covers).
"""

from __future__ import annotations

import ctypes
import os
import sys

_SYS_CREATE, _SYS_ADD, _SYS_RESTRICT = 444, 445, 446  # x86_64
_PR_SET_NO_NEW_PRIVS = 38
_RULE_PATH_BENEATH = 1
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1, 2, 4, 8
MAKE_REG = 256
# Landlock ABI 1's file system rights: what every kernel with Landlock knows.
ALL = (1 << 13) - 1
_libc = ctypes.CDLL(None, use_errno=True)


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def _grant(ruleset: int, path: str, access: int) -> None:
    if os.path.islink(path):
        return  # its target is granted (or denied) under its own name
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not os.path.isdir(f"/proc/self/fd/{fd}"):
            access &= EXECUTE | WRITE_FILE | READ_FILE  # the rights a file can carry
        rule = _PathBeneath(access, fd)
        _check(_libc.syscall(_SYS_ADD, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0), path)
    finally:
        os.close(fd)


def _grant_tree(ruleset: int, here: str, deny: dict[str, int]) -> None:
    """Everything under ``here``, except the rights ``deny`` takes away under its
    paths: what is off their way is granted whole, their ancestors are walked."""
    for name in os.listdir(here):
        path = os.path.join(here, name)
        if path in deny:
            _grant(ruleset, path, ALL & ~deny[path])
        elif any(d.startswith(path + "/") for d in deny):
            _grant_tree(ruleset, path, deny)
        else:
            _grant(ruleset, path, ALL)


def restrict(deny: dict[str, int]) -> None:
    handled = ctypes.c_uint64(ALL)
    ruleset = _check(_libc.syscall(_SYS_CREATE, ctypes.byref(handled), 8, 0), "ruleset")
    _grant_tree(ruleset, "/", {os.path.realpath(p): r for p, r in deny.items()})
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(_libc.syscall(_SYS_RESTRICT, ruleset, 0), "restrict")


def main(argv: list[str]) -> None:
    split = argv.index("--")
    opts, cmd = argv[:split], argv[split + 1 :]
    deny: dict[str, int] = {}
    for flag, path in zip(opts[::2], opts[1::2], strict=True):
        rights = {"--deny-write": WRITE_FILE | MAKE_REG, "--deny-read": READ_FILE | READ_DIR}[flag]
        deny[path] = deny.get(path, 0) | rights
    restrict(deny)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
