"""Where sanlock leases live: the lockspace and the slot array of resource leases.

Finding a lease's slot, creating it under the allocator lease, taking one
lease with bounded retries, and reading who owns one on storage.
"""

from __future__ import annotations

import os
import time

from qemu_locked.backends.sanlock.binding import (
    _BACKOFF_FIRST,
    _BACKOFF_MAX,
    ALIGN,
    ALLOC_PREFIX,
    ALLOC_WAIT,
    E_NO_LEASE,
    E_NOENT,
    HELD,
    NAME_PREFIX,
    NOT_JOINED,
    SECTOR,
    TRANSIENT,
    TRANSIENT_BUDGET,
    daemon_error,
    errno_of,
    run_dir,
    why,
)  # fmt: skip
from qemu_locked.lock.keys import digest
from qemu_locked.model.errors import BackendError, ConfigError
from qemu_locked.model.plan import EXCLUSIVE, SHARED

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

    from qemu_locked.model.config import Config

# -- where things live ---------------------------------------------------------


class Area:
    """The lockspace and the resource lease slots, from the config."""

    def __init__(self, config: Config) -> None:
        if not config.sanlock_path:
            raise ConfigError(config.source, "sanlock_path", "must be set for backend sanlock")
        for key in ("sanlock_offset",):
            if getattr(config, key) % ALIGN:
                raise ConfigError(config.source, key, f"must be a multiple of {ALIGN} (1 MiB)")
        name = config.sanlock_lockspace
        if not name or len(name.encode()) > 47 or not name.isascii() or ":" in name:
            raise ConfigError(
                config.source, "sanlock_lockspace", "must be 1-47 ASCII characters, no ':'"
            )
        self.lockspace = name.encode()
        self.ls_path = config.sanlock_path
        self.ls_offset = config.sanlock_offset
        if config.sanlock_resources:
            self.res_path, self.res_offset = config.sanlock_resources, 0
        else:
            self.res_path, self.res_offset = config.sanlock_path, config.sanlock_offset + ALIGN
        self._slots: int | None = None

    def disk(self, slot: int) -> list[tuple[str, int]]:
        return [(self.res_path, self.res_offset + slot * ALIGN)]

    def slots(self, sl: ModuleType) -> int:
        """The slot count recorded in the allocator lease (slot 0)."""
        if self._slots is None:
            try:
                info = sl.read_resource(self.res_path, self.res_offset)
            except sl.SanlockException as exc:
                if errno_of(exc) == E_NO_LEASE:
                    raise BackendError(
                        f"sanlock: {self.res_path}: no lease area at offset {self.res_offset}: "
                        "run qemu-lockctl sanlock init"
                    ) from None
                raise daemon_error(exc, f"reading {self.res_path}") from None
            name = text(info.get("resource", b""))
            count = name[len(ALLOC_PREFIX) :]
            if not name.startswith(ALLOC_PREFIX) or not count.isdigit() or int(count) < 2:
                raise BackendError(
                    f"sanlock: {self.res_path}: offset {self.res_offset} holds lease {name!r}, "
                    "not a qemu-locked lease area"
                )
            if text(info.get("lockspace", b"")) != self.lockspace.decode():
                raise BackendError(
                    f"sanlock: {self.res_path}: lease area belongs to lockspace "
                    f"{text(info.get('lockspace', b''))!r}, not {self.lockspace.decode()!r}"
                )
            self._slots = int(count)
        return self._slots


def text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").rstrip("\0")
    return str(value)


# -- lease names (keys come from qemu_locked.keys, shared with the other backends) --


def lease_name(key: str) -> str:
    return NAME_PREFIX + digest(key)[:40]


def home_slot(key: str, slots: int) -> int:
    return 1 + int(digest(key)[:16], 16) % (slots - 1)


class Lease:
    """One lease to take: its key, the name it has on storage, the mode."""

    def __init__(self, key: str, label: str, mode: str) -> None:
        self.key = key
        self.label = label
        self.mode = mode
        self.name = lease_name(key)
        self.slot = -1


# -- finding and creating a lease's slot ------------------------------------------


def read_slot(sl: ModuleType, area: Area, slot: int) -> tuple[str, str] | int:
    """(lockspace, name) of the lease in a slot, or the sanlock errno."""
    path, offset = area.disk(slot)[0]
    try:
        info = sl.read_resource(path, offset)
    except sl.SanlockException as exc:
        code = errno_of(exc)
        if code in (E_NOENT, 111, 13) and not os.path.exists(f"{run_dir()}/sanlock.sock"):
            raise daemon_error(exc, f"reading {path}") from None
        return code
    return text(info.get("lockspace", b"")), text(info.get("resource", b""))


def probe(sl: ModuleType, area: Area, lease: Lease, creating: bool) -> int:
    """The slot holding ``lease``; -1 if it does not exist yet.

    Outside the allocator (creating False) anything but a valid lease ends the
    probe with -1: the caller then retries under the allocator lease.  Under it,
    an empty slot is where the lease is created, and an unreadable one is an
    error (writing it could destroy a lease we merely failed to read).
    """
    n = area.slots(sl)
    first = home_slot(lease.key, n)
    for i in range(n - 1):
        slot = 1 + (first - 1 + i) % (n - 1)
        got = read_slot(sl, area, slot)
        if isinstance(got, tuple):
            if got[1] == lease.name:
                if got[0] != area.lockspace.decode():
                    raise BackendError(
                        f"sanlock: slot {slot} of {area.res_path} belongs to lockspace "
                        f"{got[0]!r}: re-run qemu-lockctl sanlock init --force"
                    )
                return slot
            continue  # another key's lease: linear probing
        if not creating:
            return -1
        if got == E_NO_LEASE:
            path, offset = area.disk(slot)[0]
            try:
                sl.write_resource(area.lockspace, lease.name.encode(), area.disk(slot))
            except sl.SanlockException as exc:
                raise BackendError(
                    f"sanlock: creating the lease for {lease.label} at {path}:{offset}: {why(exc)}"
                ) from None
            return slot
        raise BackendError(
            f"sanlock: slot {slot} of {area.res_path} is unreadable (errno {got}); "
            "check the storage, then qemu-lockctl sanlock status"
        )
    raise BackendError(f"sanlock: every lease slot in {area.res_path} is used ({n - 1})")


def alloc_name(area: Area, sl: ModuleType) -> bytes:
    return f"{ALLOC_PREFIX}{area.slots(sl)}".encode()


def locate(sl: ModuleType, area: Area, lease: Lease, fd: int, wait: float) -> int:
    """The lease's slot, creating the lease under the allocator lease if needed."""
    slot = probe(sl, area, lease, creating=False)
    if slot >= 0:
        return slot
    alloc = alloc_name(area, sl)
    deadline = time.monotonic() + max(wait, ALLOC_WAIT)
    code = take(sl, area, alloc, area.disk(0), False, fd, deadline, "lease allocator")
    if code:
        # Creating takes milliseconds: a holder this long is stuck or on a dead host.
        alloc_lease = Lease("", "lease allocator", EXCLUSIVE)
        alloc_lease.name, alloc_lease.slot = alloc.decode(), 0
        found = owners(sl, area, alloc_lease)
        who = describe_owners(found, host_names(area) if found else {})
        raise BackendError(
            f"sanlock: cannot create the lease for {lease.label}: the lease allocator "
            f"(slot 0 of {area.res_path}) is held {who}"
        )
    try:
        return probe(sl, area, lease, creating=True)
    finally:
        try:
            sl.release(area.lockspace, alloc, area.disk(0), slkfd=fd)
        except sl.SanlockException:
            pass  # closing the registration releases it in any case


# -- acquiring -----------------------------------------------------------------------


def take(
    sl: ModuleType,
    area: Area,
    name: bytes,
    disks: list[tuple[str, int]],
    shared: bool,
    fd: int,
    deadline: float,
    label: str,
) -> int:
    """Acquire one lease: 0, or the errno of a real holder once ``deadline``
    passed.  Transient errors are retried with backoff for up to
    TRANSIENT_BUDGET beyond the deadline; then they count as held if the lease
    has owners (an exclusive request against shared holders says EAGAIN)."""
    delay = _BACKOFF_FIRST
    transient_until = max(deadline, time.monotonic()) + TRANSIENT_BUDGET
    while True:
        try:
            sl.acquire(area.lockspace, name, disks, slkfd=fd, shared=shared)
            return 0
        except sl.SanlockException as exc:
            code = errno_of(exc)
            now = time.monotonic()
            if code in HELD:
                if now >= deadline:
                    return code
            elif code in TRANSIENT:
                if now >= transient_until:
                    return code
            elif code in NOT_JOINED:
                raise BackendError(
                    f"sanlock: lockspace {area.lockspace.decode()!r} is not joined on this host "
                    f"({why(exc)}): run qemu-lockctl sanlock join"
                ) from None
            else:
                raise BackendError(f"sanlock: {label}: {why(exc)}") from None
        time.sleep(delay)
        delay = min(delay * 2, _BACKOFF_MAX)


# -- who holds it ------------------------------------------------------------------


def host_names(area: Area) -> dict[int, str]:
    """host id -> the name its daemon wrote into its delta lease (``-e``).

    Read straight from the lockspace area (O_DIRECT when possible: on shared
    storage another host's writes bypass our page cache); {} if unreadable.
    """
    import mmap
    import struct

    size = ALIGN
    try:
        fd = os.open(area.ls_path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECT", 0))
    except OSError:
        try:
            fd = os.open(area.ls_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return {}
    try:
        buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
        try:
            n = os.preadv(fd, [buf], area.ls_offset)
        except OSError:
            return {}
        data = bytes(buf[:n])
        buf.close()
    finally:
        os.close(fd)
    names: dict[int, str] = {}
    for i in range(len(data) // SECTOR):
        sec = data[i * SECTOR : (i + 1) * SECTOR]
        magic, _ver, _flags, _ss, _nh, _mh, owner, _gen = struct.unpack_from("<IIIIQQQQ", sec)
        if magic != 0x12212010 or owner != i + 1:
            continue
        name = sec[104:152].split(b"\0", 1)[0].decode("utf-8", "replace")
        if name:
            names[owner] = name
    return names


def owners(sl: ModuleType, area: Area, lease: Lease) -> list[tuple[int, int, str]]:
    """(host id, generation, mode) of each owner on storage (unfiltered: may
    include a dead host whose lease has not expired yet)."""
    try:
        found = sl.read_resource_owners(area.lockspace, lease.name.encode(), area.disk(lease.slot))
    except sl.SanlockException:
        return []
    out = []
    for o in found:
        # The leader's owner has a timestamp; shared owners come from mode blocks.
        mode = EXCLUSIVE if o.get("timestamp") else SHARED
        out.append((int(o["host_id"]), int(o.get("generation", 0)), mode))
    return out


def describe_owners(found: list[tuple[int, int, str]], names: dict[int, str]) -> str:
    if not found:
        return "by another holder"
    mode = EXCLUSIVE if any(m == EXCLUSIVE for _h, _g, m in found) else SHARED
    who = []
    for host_id, _gen, _m in sorted(found):
        name = names.get(host_id)
        who.append(f"host id {host_id}" + (f" ({name})" if name else ""))
    return f"({mode}) by " + ", ".join(who)
