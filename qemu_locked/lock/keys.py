"""Stable resource keys: what names the same disk on every host.

Files on a network or cluster filesystem: the filesystem (its mount source,
e.g. ``server:/export``) and the path inside it, so hosts that mount it at
different places still agree.  Files on local filesystems: their canonical
path (host-local anyway; the image's own byte-0 lock covers other names of
the same inode).  Block devices: an identity that survives different device paths and
hosts, in this order: LVM/device-mapper UUID, SCSI/NVMe WWID, a loop device's
backing file, and last the kernel's device name, which is host-local: doctor
warns about those.
"""

from __future__ import annotations

import os
import stat

try:  # hashlib costs ~4 ms on the start path (it loads OpenSSL); the builtin does not
    from _sha256 import sha256 as _sha256  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - other CPython builds
    from hashlib import sha256 as _sha256

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.lock.mounts import Mount

HOST_LOCAL_PREFIX = "block:"


def digest(key: str) -> str:
    """The sha256 of a resource key, in hex: what lease names are made of."""
    out: str = _sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
    return out


def _sys_read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(4096).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _block_key(sysdir: str) -> str:
    if os.path.exists(os.path.join(sysdir, "partition")):
        parent = os.path.realpath(os.path.join(sysdir, ".."))
        return f"{_block_key(parent)}:part{_sys_read(os.path.join(sysdir, 'partition'))}"
    dm = _sys_read(os.path.join(sysdir, "dm", "uuid"))
    if dm:
        return ("lvm:" if dm.startswith("LVM-") else "dm:") + dm
    for rel in ("device/wwid", "wwid"):
        wwid = _sys_read(os.path.join(sysdir, rel))
        if wwid:
            return "wwid:" + wwid
    backing = _sys_read(os.path.join(sysdir, "loop", "backing_file"))
    if backing:
        offset = _sys_read(os.path.join(sysdir, "loop", "offset")) or "0"
        return f"loop:{os.path.realpath(backing)}@{offset}"
    for line in _sys_read(os.path.join(sysdir, "uevent")).splitlines():
        if line.startswith("DEVNAME="):
            return HOST_LOCAL_PREFIX + line[len("DEVNAME=") :]
    return HOST_LOCAL_PREFIX + os.path.basename(sysdir)


def disk_key(path: str, st: os.stat_result) -> str:
    if stat.S_ISBLK(st.st_mode):
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        return _block_key(os.path.realpath(f"/sys/dev/block/{major}:{minor}"))
    real = os.path.realpath(path)
    from qemu_locked.lock import mounts

    m = mounts.mount_of(real, st.st_dev)
    if m is not None and m.shared:
        return shared_file_key(m, mounts.inside(m, real), st.st_dev)
    return "file:" + real


def shared_file_key(m: Mount, inside: str, st_dev: int) -> str:
    """``fs:<type family>:<source>/<path inside>`` for a file on a shared filesystem.

    A cluster filesystem on a shared block device (gfs2, ocfs2) is named by the
    device's identity, not by its host-local /dev path.
    """
    family = "nfs" if m.fstype.startswith("nfs") else m.fstype.removeprefix("fuse.")
    source = m.source.rstrip("/")
    if source.startswith("/dev/"):
        major, minor = os.major(st_dev), os.minor(st_dev)
        source = _block_key(os.path.realpath(f"/sys/dev/block/{major}:{minor}"))
    return f"fs:{family}:{source}/{inside.lstrip('/')}"


def display(key: str) -> str:
    """A key as people read it: a file's path, anything else as it is."""
    return key[len("file:") :] if key.startswith("file:") else key


def domain_label(uuid: str | None, guest: str | None) -> str:
    """The domain lease as messages name it."""
    return f"domain {uuid}" if uuid else f"domain '{guest}'"


def domain_key(uuid: str | None, guest: str | None) -> str | None:
    """The domain lease's key: the VM's UUID, else its name, else none."""
    if uuid:
        return "domain:uuid:" + uuid.strip().lower()
    if guest:
        return "domain:name:" + guest
    return None
