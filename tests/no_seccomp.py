"""Run a program where seccomp filters cannot be installed, as in a container
whose own profile forbids them: a filter of ours makes seccomp(2) fail with
EPERM, then the program is exec'd (the filter stays).  Test helper only.

Usage: no_seccomp.py PROGRAM [ARGS...]
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys

_NR_SECCOMP, _PR_SET_NO_NEW_PRIVS, _SET_MODE_FILTER = 317, 38, 1
_RET_ALLOW, _RET_ERRNO, _EPERM = 0x7FFF0000, 0x00050000, 1


def main() -> None:
    ld, jeq, ret = 0x20, 0x15, 0x06
    prog = [(ld, 0, 0, 0), (jeq, 0, 1, _NR_SECCOMP), (ret, 0, 0, _RET_ERRNO | _EPERM),
            (ret, 0, 0, _RET_ALLOW)]  # fmt: skip
    code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in prog))
    fprog = struct.pack("=HxxxxxxQ", len(prog), ctypes.addressof(code))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl")
    if libc.syscall(_NR_SECCOMP, _SET_MODE_FILTER, 0, fprog) != 0:
        raise OSError(ctypes.get_errno(), "seccomp")
    os.execv(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
