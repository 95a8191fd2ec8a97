"""Backing files named in image headers, which QEMU opens on its own when the
command line does not say ``"backing"`` (hand-written ``-drive`` lines).

Only qcow2 is read: it is the format that carries backing chains in practice.
Paths are opened read-only, never created, and only if they are regular files.
"""

from __future__ import annotations

import os
import stat

from qemu_locked.model.plan import BACKING, SHARED, DiskRef, Plan, Skipped, merge_by_path
from qemu_locked.model.value import replace

_QCOW2_MAGIC = b"QFI\xfb"
_MAX_CHAIN = 64


def qcow2_backing(path: str) -> str | None:
    """The backing file name stored in a qcow2 header, or None."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None  # the lock step reports unusable paths
    try:
        head = os.pread(fd, 20, 0)
        if len(head) < 20 or head[:4] != _QCOW2_MAGIC:
            return None
        offset = int.from_bytes(head[8:16], "big")
        size = int.from_bytes(head[16:20], "big")
        if offset == 0 or size == 0 or size > 1023:
            return None
        name = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    return name.decode("utf-8", errors="surrogateescape")


def resolve(plan: Plan) -> Plan:
    """Add the header-named backing chains of images that need probing."""
    if not any(d.probe_backing for d in plan.disks):
        return plan
    disks = list(plan.disks)
    skipped = list(plan.skipped)
    todo = [d for d in disks if d.probe_backing]
    steps = 0
    while todo and steps < _MAX_CHAIN * max(1, len(plan.disks)):
        steps += 1
        disk = todo.pop()
        name = qcow2_backing(disk.path)
        if name is None:
            continue
        origin = f"backing file of {disk.path}"
        if name.startswith("json:") or (":" in name.split("/", 1)[0]):
            skipped.append(Skipped(origin, f"backing '{name}' is not a plain file name"))
            continue
        path = name if name.startswith("/") else os.path.join(os.path.dirname(disk.path), name)
        ref = DiskRef(path, SHARED, origin, BACKING, True)
        if any(d.path == path for d in disks):
            disks.append(ref)
            continue  # already known (and probed once): merge, no loop
        disks.append(ref)
        todo.append(ref)
    return replace(plan, disks=merge_by_path(disks), skipped=tuple(skipped))
