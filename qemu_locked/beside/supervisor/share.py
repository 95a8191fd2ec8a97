"""When QEMU's read-write open of a disk is locked shared: the disk is shareable.

The kernel tells the supervisor that QEMU opens a file read-write, never why.
A shareable disk (`share-rw=on`, libvirt's `<shareable/>`) is written by
several VMs on purpose, so its writers hold it shared.  The supervisor learns
that a disk is shareable in one of two ways:

- the command line declares it (the plan's `shareable` role): its opens are
  locked shared, read-write or not, for the VM's life;
- after start, from QEMU's own image locks: QEMU's file driver holds byte
  100+n of an image while a user of it has permission n, and byte 200+n while
  one refuses to share it (n = 1: write).  A read-write open that our lock
  refuses only because other VMs hold the disk shared is locked shared when
  some QEMU writes the disk (byte 101 held) and none forbids other writers
  (byte 201 free): every current writer declared it shareable.  QEMU's own
  check then refuses the new device unless it declares `share-rw=on` too (it
  must not share write while others write: 'Failed to get shared "write"
  lock').  Locks QEMU cannot see (another host's, through sanlock on a block
  device) show no writer, so such an open stays exclusive and is refused.
"""

from __future__ import annotations

import os

from qemu_locked.lock import ofd

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.model.plan import Plan

QEMU_WRITE = 101  # held (shared) by every QEMU with write permission on the image
QEMU_WRITE_UNSHARED = 201  # held by every QEMU that forbids other writers


def written_shareably(probe: str) -> bool:
    """Whether the file ``probe`` reopens (a /proc/PID/fd/N link) is written
    only by QEMUs that let others write too.  Asked through a fresh read-only
    description of ours (an O_PATH one cannot ask; a fresh one holds no lock)."""
    fd = os.open(probe, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return (
            ofd.conflicting(fd, True, QEMU_WRITE) is not None
            and ofd.conflicting(fd, True, QEMU_WRITE_UNSHARED) is None
        )
    finally:
        os.close(fd)


def declared(plan: Plan) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """By identity key, from the command line: the disks declared shareable (QEMU
    writes them under the shared lock the wrapper took), the files QEMU reads
    without a lock on purpose (force-share=on, a role the config does not lock)
    and those it also writes so (locking=off, honoured)."""
    from qemu_locked.lock.safeopen import identity_key
    from qemu_locked.model.plan import SHAREABLE

    def keys(paths: list[str]) -> frozenset[str]:
        out = set()
        for path in paths:
            try:
                out.add(identity_key(os.stat(path)))
            except OSError:
                continue  # QEMU cannot open it either
        return frozenset(out)

    return (
        keys([d.path for d in plan.disks if d.role == SHAREABLE]),
        keys([s.path for s in plan.skipped if s.path]),
        keys([s.path for s in plan.skipped if s.path and s.writes]),
    )
