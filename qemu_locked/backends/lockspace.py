"""The ``lockspace`` backend: one lease file per disk in ``lockspace_dir``.

Images are never opened, only stat()ed for their identity; the leases are
keyed by stable resource keys (qemu_locked.keys), so a shared filesystem
mounted at ``lockspace_dir`` extends the protection to every host using it,
block devices included.
"""

from __future__ import annotations

import os

from qemu_locked import images, keys, leases

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.config import Config
    from qemu_locked.held import Held
    from qemu_locked.model import Plan


def wants(plan: Plan) -> list[leases.Want]:
    out = []
    for disk in plan.disks:
        st = images.check(disk.path)
        out.append(leases.Want(keys.disk_key(disk.path, st), disk.mode, disk.path))
    return out


def me(plan: Plan, config: Config) -> leases.Holder:
    return leases.Holder(config.effective_host(), plan.guest, plan.uuid, os.getpid())


def acquire(plan: Plan, config: Config, wait: float = 0.0, defer: bool = False) -> Held:
    want = wants(plan)
    space = leases.Lockspace(config.lockspace_dir)
    try:
        return leases.acquire(space, want, me(plan, config), wait, defer)
    finally:
        space.close()


def conflicts(plan: Plan, config: Config) -> list[tuple[str, str, str]]:
    want = wants(plan)
    space = leases.Lockspace(config.lockspace_dir)
    try:
        return leases.conflicts(space, want)
    finally:
        space.close()
