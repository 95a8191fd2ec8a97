"""Which mount a file lives on, from /proc/self/mountinfo.

Used where a path alone is not enough: naming the filesystem in a lock error,
and keying files on shared filesystems by what every host agrees on (the
filesystem and the path inside it) rather than where one host mounted it.
"""

from __future__ import annotations

import os

from qemu_locked.model.value import frozen

# Filesystems whose files other hosts reach too: a lease key must not depend
# on the local mount point.  Cluster filesystems on shared block devices count.
NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "ceph", "fuse.ceph", "glusterfs", "fuse.glusterfs",
    "lustre", "gpfs", "beegfs", "gfs2", "ocfs2", "9p", "virtiofs",
})  # fmt: skip


@frozen
class Mount:
    point: str  # where it is mounted here
    root: str  # the directory of the filesystem mounted there ("/" unless a bind mount)
    fstype: str
    source: str  # "server:/export", "/dev/sda1", ...
    dev: str  # "major:minor" of st_dev

    @property
    def shared(self) -> bool:
        return self.fstype in NETWORK_FS


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[Mount]:
    """Every mount this process sees.  A read the security policy denies is an
    error, not an empty table: lease keys would silently fall back to this
    host's names, and hosts sharing a lockspace would no longer meet."""
    out: list[Mount] = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as exc:
        if exc.errno in (1, 13):
            from qemu_locked.lock.policy import denied

            raise denied("/proc/self/mountinfo", "read") from None
        return out
    for line in text.splitlines():
        left, _sep, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) < 5 or len(rparts) < 2:
            continue
        out.append(Mount(_unescape(parts[4]), _unescape(parts[3]), rparts[0],
                         _unescape(rparts[1]), parts[2]))  # fmt: skip
    return out


def mount_of(real: str, st_dev: int | None = None) -> Mount | None:
    """The mount a canonical path lives on: the longest mount point containing
    it (the last one mounted wins a tie), of the same device when ``st_dev`` is given."""
    dev = None if st_dev is None else f"{os.major(st_dev)}:{os.minor(st_dev)}"
    best: Mount | None = None
    for m in mounts():
        inside = real == m.point or real.startswith(m.point.rstrip("/") + "/")
        if not inside or (dev is not None and m.dev != dev):
            continue
        if best is None or len(m.point) >= len(best.point):
            best = m
    return best


def fs_type_of_fd(fd: int) -> tuple[str, str]:
    """(path, filesystem type) of an open file, for error messages."""
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
        st = os.fstat(fd)
    except OSError:
        return f"fd {fd}", "?"
    from qemu_locked.model.errors import QemuLockedError

    try:
        m = mount_of(path, st.st_dev)
    except QemuLockedError:  # naming the filesystem of another error: never a new one
        m = None
    return path, (m.fstype if m is not None else "?")


def inside(m: Mount, real: str) -> str:
    """The path of ``real`` inside its filesystem (mount root + path under the mount point)."""
    rel = real[len(m.point.rstrip("/")) :] if m.point != "/" else real
    return os.path.normpath(m.root.rstrip("/") + "/" + rel.lstrip("/"))
