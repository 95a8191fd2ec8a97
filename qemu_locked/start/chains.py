"""Files named in image headers, which QEMU opens on its own when the command
line does not say ``"backing"`` (hand-written ``-drive`` lines): the backing
file (shared) and the external data file (the image's own mode: QEMU writes
guest data there).  Chains are followed through both.

Only qcow2 is read: it is the format that carries backing chains in practice.
Paths are opened read-only, never created, and only if they are regular files.
A relative backing name is relative to the image's directory; a relative
data file name to QEMU's working directory (measured with QEMU 7.2 and 10.0), which is
ours, since exec keeps it.
"""

from __future__ import annotations

import os

from qemu_locked.lock.safeopen import MAX_CHAIN, plain_name, qcow2_names
from qemu_locked.model.plan import BACKING, SHARED, DiskRef, Plan, Skipped, merge_by_path
from qemu_locked.model.value import replace


def resolve(plan: Plan) -> Plan:
    """Add the header-named backing chains and data files of images that need probing."""
    if not any(d.probe_backing or d.probe_data for d in plan.disks):
        return plan
    disks = list(plan.disks)
    skipped = list(plan.skipped)
    todo = [d for d in disks if d.probe_backing or d.probe_data]
    steps = 0
    while todo and steps < MAX_CHAIN * max(1, len(plan.disks)):
        steps += 1
        disk = todo.pop()
        found = qcow2_names(disk.path)
        if found is None:
            continue
        if found.data_file is not None and disk.probe_data:
            origin = f"data file of {disk.path}"
            if plain_name(found.data_file):
                path = os.path.join(os.getcwd(), found.data_file)  # absolute names stay
                disks.append(DiskRef(path, disk.mode, origin, disk.role, False))
            else:
                skipped.append(Skipped(origin, f"data file '{found.data_file}' is not a plain "
                                       "file name", unknown=True))  # fmt: skip
        name = found.backing
        if name is None or not disk.probe_backing:
            continue
        origin = f"backing file of {disk.path}"
        if not plain_name(name):
            skipped.append(Skipped(origin, f"backing '{name}' is not a plain file name"))
            continue
        path = name if name.startswith("/") else os.path.join(os.path.dirname(disk.path), name)
        ref = DiskRef(path, SHARED, origin, BACKING, True, True)
        if any(d.path == path for d in disks):
            disks.append(ref)
            continue  # already known (and probed once): merge, no loop
        disks.append(ref)
        todo.append(ref)
    return replace(plan, disks=merge_by_path(disks), skipped=tuple(skipped))
