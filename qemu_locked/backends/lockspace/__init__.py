"""The ``lockspace`` backend: one lease file per disk in ``lockspace_dir``.

The leases are keyed by stable resource keys (qemu_locked.lock.keys), so a
shared filesystem mounted at ``lockspace_dir`` extends the protection to
every host using it, block devices included.  A key is a name, and a file can
have several (hard links, bind mounts): backends/combined.py also takes each
image's own byte-0 lock, which is per inode.  Lease files themselves: :mod:`.leases`; what
``status`` shows of them: :mod:`.status`.
"""

from __future__ import annotations

from qemu_locked.backends.lockspace import leases
from qemu_locked.lock import keys, safeopen
from qemu_locked.model.claim import Claim

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.lock.held import Held
    from qemu_locked.model.config import Config
    from qemu_locked.model.errors import Conflict
    from qemu_locked.model.plan import Plan

NAME = "lockspace"


def claims_for_paths(paths: list[str], mode: str = "shared") -> list[Claim]:
    return [Claim(keys.disk_key(p, safeopen.check(p)), mode, p) for p in paths]


def claims(plan: Plan) -> list[Claim]:
    return [
        Claim(keys.disk_key(d.path, safeopen.check(d.path)), d.mode, d.path) for d in plan.disks
    ]


def acquire(plan: Plan, config: Config, deadline: float, defer: bool = False) -> Held:
    me = leases.identity_for(plan, config)
    return leases.acquire_in(config.lockspace_dir, claims(plan), me, deadline, defer)


def conflicts(plan: Plan, config: Config) -> list[Conflict]:
    return leases.conflicts_in(config.lockspace_dir, claims(plan))
