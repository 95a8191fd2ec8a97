"""The values a plan is made of.  No I/O here: this is shared by the parser,
the lockers and the admin CLI."""

from __future__ import annotations

from qemu_locked.model.value import frozen, replace

EXCLUSIVE = "exclusive"
SHARED = "shared"
MODES = (EXCLUSIVE, SHARED)

# Why a disk gets its mode; config may map a role to "none" (not locked).
WRITABLE = "writable"
SHAREABLE = "shareable"
READONLY = "readonly"
BACKING = "backing"
ROLES = (WRITABLE, SHAREABLE, READONLY, BACKING)

_STRENGTH = {EXCLUSIVE: 2, SHARED: 1}
_ROLE_RANK = {WRITABLE: 4, SHAREABLE: 3, READONLY: 2, BACKING: 1}


def stronger(a: str, b: str) -> str:
    return a if _STRENGTH[a] >= _STRENGTH[b] else b


@frozen
class DiskRef:
    """One image QEMU will open: the path as QEMU opens it."""

    path: str
    mode: str  # EXCLUSIVE | SHARED
    origin: str  # the argument it came from, for messages
    role: str = WRITABLE
    # QEMU may open a backing file named in this image's header (qcow2 without
    # an explicit "backing"); the wrapper reads the header, the pure parser cannot.
    probe_backing: bool = False
    # ... and an external data file named in it (qcow2 without "data-file").
    probe_data: bool = False

    def merged(self, other: DiskRef) -> DiskRef:
        """The same file used twice: the strongest mode and role win."""
        mode = stronger(self.mode, other.mode)
        role = self.role if _ROLE_RANK[self.role] >= _ROLE_RANK[other.role] else other.role
        origin = self.origin if other.origin in self.origin else f"{self.origin}; {other.origin}"
        probe = self.probe_backing or other.probe_backing
        data = self.probe_data or other.probe_data
        return DiskRef(self.path, mode, origin, role, probe, data)


@frozen
class Skipped:
    """Something QEMU opens that we do not lock, and why."""

    source: str
    reason: str
    # QEMU may open a file here that we cannot name (config unknown_drivers)
    unknown: bool = False
    # A file left unlocked on purpose: the supervisor lets QEMU's read-only opens
    # of it pass, and with ``writes`` its read-write ones too.
    path: str = ""
    writes: bool = False

    @property
    def network(self) -> bool:
        """A disk QEMU reaches over the network (nbd, rbd, iscsi, http...)."""
        return self.reason.startswith(NETWORK_DISK)


NETWORK_DISK = "network disk"
# Said once wherever a network disk is listed as not locked.
NETWORK_WHY = (
    "the storage server arbitrates access; qemu-locked locks only local files and block devices"
)


@frozen
class Plan:
    """What one QEMU command line (or domain) needs locked."""

    disks: tuple[DiskRef, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    guest: str | None = None
    uuid: str | None = None
    incoming: str | None = None
    daemonize: bool = False
    # A QMP monitor QEMU inherits as a listening socket (fd N): where the monitor guard sits.
    monitor_fd: int | None = None
    # Files QEMU's own options name for its bookkeeping (pid, log, trace, chardev files).
    bookkeeping: tuple[str, ...] = ()

    def apply_roles(self, none_roles: tuple[str, ...]) -> Plan:
        """Drop the disks of roles the config maps to ``none`` (noted as skipped)."""
        if not none_roles:
            return self
        keep = tuple(d for d in self.disks if d.role not in none_roles)
        dropped = tuple(
            Skipped(d.path, f'{d.role} disk: not locked (config {d.role} = "none")', path=d.path,
                    writes=d.role == SHAREABLE)
            for d in self.disks
            if d.role in none_roles
        )  # fmt: skip
        return replace(self, disks=keep, skipped=self.skipped + dropped)

    def to_json_obj(self) -> dict[str, object]:
        return {
            "disks": [{"path": d.path, "mode": d.mode, "origin": d.origin} for d in self.disks],
            "skipped": [
                {"source": s.source, "reason": s.reason, "network": s.network} for s in self.skipped
            ],
        }


def merge_by_path(disks: list[DiskRef]) -> tuple[DiskRef, ...]:
    """One entry per distinct path, first-seen order, strongest use wins."""
    seen: dict[str, DiskRef] = {}
    for d in disks:
        prev = seen.get(d.path)
        seen[d.path] = d if prev is None else prev.merged(d)
    return tuple(seen.values())
