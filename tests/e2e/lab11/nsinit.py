"""First process inside the lab's private namespaces (started by ``unshare --fork``).

Modes:
  apt ROOT PKG...            apt-get update/upgrade/install/clean inside the tree, with only
                             /proc and a tmpfs /run mounted (never the host /dev)
  lab ROOT PIDFILE CMD...    mount a private /proc, read-only /sys, fresh cgroup hierarchies,
                             an own /dev and devpts, tmpfs /run and /tmp; pivot_root into ROOT,
                             detach the old root and exec ``tini -g -- python3 lab-init CMD``

pivot_root rather than chroot: libvirt enters QEMU's mount namespace with setns(), which
resets the root directory to the namespace's root.  Under a chroot that is the host's
``/`` and libvirt's device helper then rewrote the host's /dev/ptmx
(shared/reference/libvirt11-chroot/README.md, obstacle 4).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
SYS_PIVOT_ROOT = 155  # x86_64


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(
    src: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    rc = _libc.mount(
        src.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(rc, f"mount {fstype or 'bind'} {src} on {target}")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def pivot_root(new: str, put_old: str) -> None:
    _check(_libc.syscall(SYS_PIVOT_ROOT, new.encode(), put_old.encode()), "pivot_root")


def sethostname(name: str) -> None:
    _check(_libc.sethostname(name.encode(), len(name)), "sethostname")


def apt(root: str, packages: list[str]) -> int:
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("run", f"{root}/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C.UTF-8",
        "HOME": "/root",
    }
    os.chroot(root)
    os.chdir("/")
    steps = [
        ["apt-get", "-q", "update"],
        ["apt-get", "-q", "-y", "upgrade"],
        ["apt-get", "-q", "-y", "install", "--no-install-recommends", *packages],
        ["apt-get", "clean"],
    ]
    for cmd in steps:
        sys.stdout.write("$ " + " ".join(cmd) + "\n")
        sys.stdout.flush()
        rc = subprocess.run(cmd, env=env, check=False).returncode
        if rc != 0:
            return rc
    return 0


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "apt":
        raise SystemExit(apt(sys.argv[2], sys.argv[3:]))
    if mode == "lab":
        from labns import enter_lab

        enter_lab(sys.argv[2], sys.argv[3], sys.argv[4:])
    raise SystemExit(f"nsinit: unknown mode {mode!r}")
