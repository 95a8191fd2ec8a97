"""The ``sanlock`` backend: disk-paxos leases on shared storage via the sanlock daemon.

Shape (the same as libvirt's sanlock plugin): the wrapper registers with the
local sanlock daemon, acquires one lease per disk (and the domain lease)
with that registration, and execs QEMU with the registration fd inherited.
The daemon ties the leases to the registering pid, so they live exactly as
long as QEMU does; closing the fd (or QEMU dying) releases them all.

Lease layout.  ``sanlock_path``/``sanlock_offset`` hold the lockspace (one
1 MiB area of delta leases, one per host id).  The resource area
(``sanlock_resources``, or the space right after the lockspace when that is
empty) is an array of 1 MiB paxos-lease slots:

* slot 0 is the *allocator* lease, named ``qemu-locked-slots-<N>``: it
  records the slot count on the storage itself (so growing the file can
  never remap keys) and serialises the creation of new leases;
* a resource key (``file:/real/path``, ``wwid:...``, ``lvm:...``, ``domain:<uuid>``)
  is named ``qlk-`` + 40 hex digits of its SHA-256 (sanlock names are 48
  bytes); its home slot is ``1 + hash mod (N-1)``; on collision the next
  slots are probed linearly.  A lease, once written, is never moved or
  rewritten, so every host finds it in the same slot; a missing lease is
  created on demand while holding the allocator lease, after re-reading the
  slot under it, so two hosts can never write one slot.

Errors: 11 EAGAIN, 16 EBUSY and -245 are transient (retried with bounded
backoff); 17 EEXIST (held on this host) and -243 (held by another host)
refuse with LockedError naming the holder's host id and name (the name the
holder's daemon wrote into its delta lease: ``sanlock daemon -e NAME``).

The binding is Debian's python3-sanlock extension, loaded from its file
(see :func:`binding` and docs-sanlock.md).  This module is imported only
when ``backend = "sanlock"`` and imports nothing heavy on the start path.
"""

from __future__ import annotations

import os
import stat
import sys
import time

from qemu_locked import held as _held
from qemu_locked import images
from qemu_locked.errors import BackendError, ConfigError, LockedError, QemuLockedError
from qemu_locked.keys import digest, disk_key, domain_key, domain_label
from qemu_locked.model import EXCLUSIVE, SHARED, Plan, stronger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any

    from qemu_locked.config import Config

ALIGN = 1 << 20  # lease area size: 1 MiB (512-byte sectors, sanlock's default)
SECTOR = 512
MAX_HOSTS = 2000  # host ids that fit in a 1 MiB lockspace with 512-byte sectors
DEFAULT_SLOTS = 256
ALLOC_PREFIX = "qemu-locked-slots-"
NAME_PREFIX = "qlk-"

# sanlock errnos (python SanlockException.errno)
E_AGAIN, E_BUSY, E_EXIST, E_NOENT, E_NOSPC = 11, 16, 17, 2, 28
E_HELD_OTHER_HOST = -243  # "Lease is held by another host"
E_NO_LEASE = -223  # "Lease does not exist on storage"
# Paxos ballot races between hosts acquiring at the same instant: -245 (local
# commit, the notes' SH vs SH), -244 (other ballot: seen here when two hosts
# create leases at once), -212/-213 (new/current ballot), -222 (inconsistent read).
TRANSIENT = frozenset({E_AGAIN, E_BUSY, -245, -244, -213, -212, -222})
# A real holder: here (17), on a live host (-243), an exclusive owner against a
# shared request (-246), owned by another host (-247).
HELD = frozenset({E_EXIST, E_HELD_OTHER_HOST, -246, -247})
NOT_JOINED = frozenset({E_NOENT, -E_NOENT, E_NOSPC, -E_NOSPC, -241})
ALLOC_WAIT = 5.0  # seconds to wait for the allocator lease (creation takes ms)
TRANSIENT_BUDGET = 5.0  # seconds of retrying transient errors, on top of `wait`
_BACKOFF_FIRST, _BACKOFF_MAX = 0.01, 0.5

DIST_PACKAGES = "/usr/lib/python3/dist-packages"

_binding: ModuleType | None = None
_binding_origin = ""


# -- the binding ---------------------------------------------------------------


def _so_suffixes() -> list[str]:
    import _imp

    return [s for s in _imp.extension_suffixes() if s != ".so"] + [".so"]


def binding() -> ModuleType:
    """Debian's python3-sanlock extension module.

    Loaded from its file in /usr/lib/python3/dist-packages by an
    ExtensionFileLoader (the venv does not see system site-packages), for
    this interpreter's ABI tag only; then, as a fallback for other layouts,
    a plain ``import sanlock``.
    """
    global _binding, _binding_origin
    if _binding is not None:
        return _binding
    from importlib.machinery import ExtensionFileLoader, ModuleSpec

    tried: list[str] = []
    for suffix in _so_suffixes():
        path = f"{DIST_PACKAGES}/sanlock{suffix}"
        tried.append(path)
        if not os.path.exists(path):
            continue
        loader = ExtensionFileLoader("sanlock", path)
        spec = ModuleSpec("sanlock", loader, origin=path)
        try:
            module = loader.create_module(spec)
            loader.exec_module(module)
        except ImportError as exc:
            raise BackendError(f"sanlock binding {path}: cannot load: {exc}") from None
        sys.modules.setdefault("sanlock", module)
        _binding, _binding_origin = module, path
        return module
    try:
        import sanlock as imported
    except ImportError:
        abi = _so_suffixes()[0]
        raise BackendError(
            "sanlock binding not found: install python3-sanlock (Debian) and build the "
            f"venv from /usr/bin/python3 (this interpreter needs sanlock{abi}; tried "
            + ", ".join(tried)
            + ")"
        ) from None
    found: ModuleType = imported
    _binding, _binding_origin = found, str(getattr(found, "__file__", "sanlock"))
    return found


def binding_origin() -> str:
    binding()
    return _binding_origin


def _errno(exc: BaseException) -> int:
    value = getattr(exc, "errno", None)
    if isinstance(value, int):
        return value
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else 0


def _why(exc: BaseException) -> str:
    args: tuple[object, ...] = tuple(getattr(exc, "args", ()))
    if len(args) >= 3:
        return f"{args[1]}: {args[2]} ({args[0]})"
    return str(exc)


def _run_dir() -> str:
    return os.environ.get("SANLOCK_RUN_DIR", "/run/sanlock")


def _daemon_error(exc: BaseException, what: str) -> BackendError:
    code = _errno(exc)
    if code in (E_NOENT, 111, 13):  # no socket, refused, permission
        return BackendError(
            f"sanlock: {what}: no sanlock daemon reachable at {_run_dir()}/sanlock.sock "
            f"({_why(exc)})"
        )
    return BackendError(f"sanlock: {what}: {_why(exc)}")


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
                if _errno(exc) == E_NO_LEASE:
                    raise BackendError(
                        f"sanlock: {self.res_path}: no lease area at offset {self.res_offset}: "
                        "run qemu-lockctl sanlock init"
                    ) from None
                raise _daemon_error(exc, f"reading {self.res_path}") from None
            name = _text(info.get("resource", b""))
            count = name[len(ALLOC_PREFIX) :]
            if not name.startswith(ALLOC_PREFIX) or not count.isdigit() or int(count) < 2:
                raise BackendError(
                    f"sanlock: {self.res_path}: offset {self.res_offset} holds lease {name!r}, "
                    "not a qemu-locked lease area"
                )
            if _text(info.get("lockspace", b"")) != self.lockspace.decode():
                raise BackendError(
                    f"sanlock: {self.res_path}: lease area belongs to lockspace "
                    f"{_text(info.get('lockspace', b''))!r}, not {self.lockspace.decode()!r}"
                )
            self._slots = int(count)
        return self._slots


def _text(value: object) -> str:
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


def leases(plan: Plan, config: Config) -> list[Lease]:
    """One lease per distinct resource key, strongest mode, in key order."""
    by_key: dict[str, Lease] = {}
    for disk in plan.disks:
        key = disk_key(disk.path, images.check(disk.path))
        prev = by_key.get(key)
        if prev is None:
            by_key[key] = Lease(key, disk.path, disk.mode)
        else:
            prev.mode = stronger(prev.mode, disk.mode)
    if config.domain_lease:
        dkey = domain_key(plan.uuid, plan.guest)
        if dkey is not None:
            label = domain_label(plan.uuid, plan.guest)
            by_key[dkey] = Lease(dkey, label, EXCLUSIVE)
    return [by_key[k] for k in sorted(by_key)]


# -- finding and creating a lease's slot ------------------------------------------


def _read_slot(sl: ModuleType, area: Area, slot: int) -> tuple[str, str] | int:
    """(lockspace, name) of the lease in a slot, or the sanlock errno."""
    path, offset = area.disk(slot)[0]
    try:
        info = sl.read_resource(path, offset)
    except sl.SanlockException as exc:
        code = _errno(exc)
        if code in (E_NOENT, 111, 13) and not os.path.exists(f"{_run_dir()}/sanlock.sock"):
            raise _daemon_error(exc, f"reading {path}") from None
        return code
    return _text(info.get("lockspace", b"")), _text(info.get("resource", b""))


def _probe(sl: ModuleType, area: Area, lease: Lease, creating: bool) -> int:
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
        got = _read_slot(sl, area, slot)
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
                    f"sanlock: creating the lease for {lease.label} at {path}:{offset}: {_why(exc)}"
                ) from None
            return slot
        raise BackendError(
            f"sanlock: slot {slot} of {area.res_path} is unreadable (errno {got}); "
            "check the storage, then qemu-lockctl sanlock status"
        )
    raise BackendError(f"sanlock: every lease slot in {area.res_path} is used ({n - 1})")


def _alloc_name(area: Area, sl: ModuleType) -> bytes:
    return f"{ALLOC_PREFIX}{area.slots(sl)}".encode()


def _locate(sl: ModuleType, area: Area, lease: Lease, fd: int, wait: float) -> int:
    """The lease's slot, creating the lease under the allocator lease if needed."""
    slot = _probe(sl, area, lease, creating=False)
    if slot >= 0:
        return slot
    alloc = _alloc_name(area, sl)
    deadline = time.monotonic() + max(wait, ALLOC_WAIT)
    code = _take(sl, area, alloc, area.disk(0), False, fd, deadline, "lease allocator")
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
        return _probe(sl, area, lease, creating=True)
    finally:
        try:
            sl.release(area.lockspace, alloc, area.disk(0), slkfd=fd)
        except sl.SanlockException:
            pass  # closing the registration releases it in any case


# -- acquiring -----------------------------------------------------------------------


def _take(
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
            code = _errno(exc)
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
                    f"({_why(exc)}): run qemu-lockctl sanlock join"
                ) from None
            else:
                raise BackendError(f"sanlock: {label}: {_why(exc)}") from None
        time.sleep(delay)
        delay = min(delay * 2, _BACKOFF_MAX)


class Held(_held.Held):
    """The registration fd: the daemon holds our leases for as long as the
    process that registered (QEMU, after exec) keeps it open or lives."""

    def __init__(self, fd: int | None = None) -> None:
        super().__init__([] if fd is None else [fd])
        self.leases: list[Lease] = []


class _KeeperRegistration:
    """The migration keeper's own registration, made in the keeper process."""

    fd = -1


class SanlockPending(_held.Pending):
    """A lease the migration source still holds, for the keeper.

    sanlock leases belong to the registered process that acquired them; the
    keeper cannot hand them to QEMU, so it registers itself, takes them, and
    holds them until QEMU exits (``holds_for_life``).  Trade-off: if the keeper
    alone is killed, or sanlock kills it when the lockspace is lost, those
    leases go while the VM runs on; a VM started normally has no such gap.
    """

    holds_for_life = True

    def __init__(self, area: Area, lease: Lease) -> None:
        super().__init__(-1, lease.mode == EXCLUSIVE, lease.label)
        self.area = area
        self.lease_ = lease

    def try_take(self) -> bool:
        sl = binding()
        if _KeeperRegistration.fd < 0:
            _KeeperRegistration.fd = sl.register()
        lease = self.lease_
        code = _take(sl, self.area, lease.name.encode(), self.area.disk(lease.slot),
                     lease.mode == SHARED, _KeeperRegistration.fd, time.monotonic(),
                     lease.label)  # fmt: skip
        return code == 0

    def holders(self) -> str:
        found = owners(binding(), self.area, self.lease_)
        return describe_owners(found, host_names(self.area) if found else {})


def _release_all(sl: ModuleType, area: Area, held: Held) -> None:
    """Release explicitly (synchronous in the daemon) before closing the fd,
    so a refused start leaves nothing held even for a moment after it exits."""
    for lease in held.leases:
        try:
            sl.release(
                area.lockspace, lease.name.encode(), area.disk(lease.slot), slkfd=held.fds[0]
            )
        except (sl.SanlockException, IndexError):
            pass
    held.leases = []
    held.release()


def acquire(plan: Plan, config: Config, wait: float = 0.0, defer: bool = False) -> Held:
    """Register with the daemon and take every lease, all or nothing.

    After the first refusal the remaining leases are only tried (not waited
    for), so the error names every holder at once.  With ``defer`` (a
    migration destination) a lease a real holder has is left to the keeper.
    """
    todo = leases(plan, config)
    if not todo:
        return Held()
    sl = binding()
    area = Area(config)
    try:
        fd = sl.register()
    except sl.SanlockException as exc:
        raise _daemon_error(exc, "register") from None
    os.set_inheritable(fd, False)  # until the wrapper hands it to QEMU
    held = Held(fd)
    try:
        deadline = time.monotonic() + wait
        refused: list[tuple[Lease, int]] = []
        for lease in todo:
            lease.slot = _locate(sl, area, lease, fd, wait)
            code = _take(
                sl,
                area,
                lease.name.encode(),
                area.disk(lease.slot),
                lease.mode == SHARED,
                fd,
                time.monotonic() if refused or defer else deadline,
                lease.label,
            )
            if code and defer:
                held.pending.append(SanlockPending(area, lease))
            elif code:
                refused.append((lease, code))
            else:
                held.leases.append(lease)
        if refused:
            raise LockedError([_conflict(sl, area, lease, code) for lease, code in refused])
    except BaseException:
        _release_all(sl, area, held)
        raise
    return held


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


def _conflict(sl: ModuleType, area: Area, lease: Lease, code: int) -> tuple[str, str, str]:
    found = owners(sl, area, lease)
    text = describe_owners(found, host_names(area) if found else {})
    if code == E_EXIST and not found:
        text = "(exclusive) by another process on this host"
    return lease.label, lease.mode, text


def conflicts(plan: Plan, config: Config) -> list[tuple[str, str, str]]:
    """What would refuse this plan now, from the owners on storage.  Takes nothing."""
    sl = binding()
    area = Area(config)
    names: dict[int, str] | None = None
    out = []
    for lease in leases(plan, config):
        lease.slot = _probe(sl, area, lease, creating=False)
        if lease.slot < 0:
            continue  # not created yet: nobody can hold it
        found = owners(sl, area, lease)
        if lease.mode == SHARED:
            found = [o for o in found if o[2] == EXCLUSIVE]
        if found:
            if names is None:
                names = host_names(area)
            out.append((lease.label, lease.mode, describe_owners(found, names)))
    return out


# -- admin side: init, join, status, doctor ----------------------------------------------


def _local_holders() -> dict[str, list[tuple[int, str]]]:
    """lease name -> [(pid, mode)] held through this host's daemon
    (``sanlock client status``; the python binding has no list of pids)."""
    import subprocess

    try:
        out = subprocess.run(
            ["sanlock", "client", "status"], check=False, capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found: dict[str, list[tuple[int, str]]] = {}
    for line in out.splitlines():
        parts = line.split()
        # r LOCKSPACE:NAME:PATH:OFFSET[:SH] p PID
        if len(parts) >= 4 and parts[0] == "r" and parts[-2] == "p" and parts[-1].isdigit():
            fields = parts[1].split(":")
            if len(fields) >= 2:
                mode = SHARED if fields[-1] == "SH" else EXCLUSIVE
                found.setdefault(fields[1], []).append((int(parts[-1]), mode))
    return found


def key_of(resource: str) -> str:
    """The resource key of a path (file or block device) or a ``domain:`` key."""
    if resource.startswith("domain:"):
        return resource
    return disk_key(resource, images.check(resource))


def lease_table(config: Config, resources: list[str] | None = None) -> dict[str, Any]:
    """Everything ``sanlock status`` shows: the lockspace, its hosts, every lease
    (only those of ``resources``, paths or ``domain:`` keys, when given)."""
    from qemu_locked import holders

    sl = binding()
    area = Area(config)
    labels = {lease_name(key_of(r)): r for r in resources or []}
    names = host_names(area)
    joined = False
    try:
        for ls in sl.get_lockspaces():
            if _text(ls.get("lockspace", b"")) == area.lockspace.decode():
                joined = ls.get("flags", 0) == 0
    except sl.SanlockException as exc:
        raise _daemon_error(exc, "get_lockspaces") from None
    hosts: list[dict[str, Any]] = []
    host_note = ""
    if joined:
        states = {
            sl.HOST_FREE: "free",
            sl.HOST_LIVE: "live",
            sl.HOST_FAIL: "failing",
            sl.HOST_DEAD: "dead",
            sl.HOST_UNKNOWN: "unknown",
        }
        try:
            for h in sl.get_hosts(area.lockspace):
                hid = int(h["host_id"])
                hosts.append(
                    {
                        "host_id": hid,
                        "name": names.get(hid),
                        "generation": int(h.get("generation", 0)),
                        "state": states.get(h.get("flags"), str(h.get("flags"))),
                    }
                )
        except sl.SanlockException as exc:
            if _errno(exc) != E_AGAIN:
                raise _daemon_error(exc, "get_hosts") from None
            host_note = "host states not known yet (this host joined less than ~20 s ago)"
    local = _local_holders()
    rows: list[dict[str, Any]] = []
    n = area.slots(sl)
    for slot in range(1, n):
        got = _read_slot(sl, area, slot)
        if not isinstance(got, tuple) or (resources and got[1] not in labels):
            continue
        lease = Lease("", "", EXCLUSIVE)
        lease.name, lease.slot = got[1], slot
        owner_rows = [
            {"host_id": h, "host": names.get(h), "generation": g, "mode": m}
            for h, g, m in owners(sl, area, lease)
        ]
        path, offset = area.disk(slot)[0]
        rows.append(
            {
                "lease": got[1],
                "resource": labels.get(got[1]),
                "slot": slot,
                "path": path,
                "offset": offset,
                "owners": owner_rows,
                "local": [
                    {"pid": p, "mode": m, "guest": holders.guest_of(p)[0]}
                    for p, m in local.get(got[1], [])
                ],
            }
        )
    return {
        "lockspace": area.lockspace.decode(),
        "path": area.ls_path,
        "offset": area.ls_offset,
        "host_id": config.sanlock_host_id,
        "joined": joined,
        "hosts": hosts,
        "hosts_note": host_note,
        "slots": n,
        "resources": area.res_path,
        "leases": rows,
    }


def status_rows(config: Config, paths: list[str] | None = None) -> list[dict[str, object]]:
    """Rows for ``qemu-lockctl status``: one per lease owner seen on storage."""
    from qemu_locked import holders

    try:
        table = lease_table(config)
    except QemuLockedError:
        return []
    wanted: set[str] | None = None
    if paths:
        wanted = set()
        for p in paths:
            try:
                wanted.add(lease_name(disk_key(p, os.stat(p))))
            except OSError:
                continue
    rows: list[dict[str, object]] = []
    me = config.sanlock_host_id
    for lease in table["leases"]:
        if wanted is not None and lease["lease"] not in wanted:
            continue
        for owner in lease["owners"]:
            pid: int | None = None
            guest = uuid = None
            if owner["host_id"] == me and lease["local"]:
                pid = lease["local"][0]["pid"]
                guest, uuid, _comm = holders.guest_of(pid)
            rows.append(
                {
                    "path": f"sanlock:{lease['lease']}",
                    "mode": owner["mode"],
                    "pid": pid,
                    "host": owner["host"] or f"host id {owner['host_id']}",
                    "guest": guest,
                    "uuid": uuid,
                    "since": None,
                    "host_id": owner["host_id"],
                    "slot": lease["slot"],
                }
            )
    return rows


def _ensure_file(path: str, size: int) -> bool:
    """Create (or grow) a regular lease file; True if it was created.  A block
    device must already be big enough."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o660)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return True
    if stat.S_ISREG(st.st_mode):
        if st.st_size < size:
            os.truncate(path, size)
        return False
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            have = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        if have < size:
            raise BackendError(f"sanlock: {path}: device has {have} bytes, needs {size}")
        return False
    raise BackendError(f"sanlock: {path}: not a regular file or block device")


def init(config: Config, slots: int = DEFAULT_SLOTS, force: bool = False) -> dict[str, Any]:
    """Write the lockspace (with the configured io_timeout: the one written here
    is the one every host uses) and the resource lease area."""
    sl = binding()
    area = Area(config)
    if not 2 <= slots <= 1 << 20:
        raise ConfigError("--slots", None, "must be between 2 and 1048576")
    if not 1 <= config.sanlock_io_timeout <= 300:
        raise ConfigError(config.source, "sanlock_io_timeout", "must be between 1 and 300")
    try:
        info = sl.read_lockspace(area.ls_path, area.ls_offset)
    except sl.SanlockException as exc:
        if _errno(exc) in (E_NOENT, 111, 13) and not os.path.exists(f"{_run_dir()}/sanlock.sock"):
            raise _daemon_error(exc, "init") from None
        info = None
    if info is not None and force:
        try:
            joined = [_text(ls.get("lockspace", b"")) for ls in sl.get_lockspaces()]
        except sl.SanlockException as exc:
            raise _daemon_error(exc, "get_lockspaces") from None
        if _text(info.get("lockspace", b"")) in joined:
            raise BackendError(
                f"sanlock: {area.ls_path}: this host is in lockspace "
                f"{_text(info.get('lockspace', b''))!r}: run qemu-lockctl sanlock leave on every "
                "host before init --force"
            )
    if info is not None and not force:
        raise BackendError(
            f"sanlock: {area.ls_path}: already holds lockspace "
            f"{_text(info.get('lockspace', b''))!r} (io_timeout {info.get('iotimeout')}); "
            "--force re-initialises it and forgets every lease (stop every VM on every host first)"
        )
    same_file = area.res_path == area.ls_path
    try:
        if same_file:
            created = _ensure_file(area.ls_path, area.res_offset + slots * ALIGN)
            res_created = created
        else:
            created = _ensure_file(area.ls_path, area.ls_offset + ALIGN)
            res_created = _ensure_file(area.res_path, area.res_offset + slots * ALIGN)
    except OSError as exc:
        raise BackendError(f"sanlock: init: {exc.filename}: {exc.strerror}") from None
    t0 = time.monotonic()
    try:
        sl.write_lockspace(
            area.lockspace, area.ls_path, area.ls_offset, iotimeout=config.sanlock_io_timeout
        )
    except sl.SanlockException as exc:
        raise _daemon_error(exc, f"writing the lockspace to {area.ls_path}") from None
    cleared = 0
    try:
        if not res_created:
            # Old leases (an earlier init) would be found by name: clear every slot.
            for slot in range(1, slots):
                if isinstance(_read_slot(sl, area, slot), tuple):
                    sl.write_resource(area.lockspace, b"", area.disk(slot), clear=True)
                    cleared += 1
        sl.write_resource(area.lockspace, f"{ALLOC_PREFIX}{slots}".encode(), area.disk(0))
    except sl.SanlockException as exc:
        raise _daemon_error(exc, f"writing the lease area to {area.res_path}") from None
    return {
        "lockspace": area.lockspace.decode(),
        "path": area.ls_path,
        "offset": area.ls_offset,
        "io_timeout": config.sanlock_io_timeout,
        "resources": area.res_path,
        "resources_offset": area.res_offset,
        "slots": slots,
        "cleared": cleared,
        "seconds": round(time.monotonic() - t0, 3),
    }


def join(config: Config) -> dict[str, Any]:
    """add_lockspace with the configured host id; takes ~2*io_timeout+1 s."""
    sl = binding()
    area = Area(config)
    host_id = config.sanlock_host_id
    if not 1 <= host_id <= MAX_HOSTS:
        raise ConfigError(
            config.source, "sanlock_host_id", f"must be 1..{MAX_HOSTS}, unique to this host"
        )
    t0 = time.monotonic()
    already = False
    try:
        sl.add_lockspace(
            area.lockspace,
            host_id,
            area.ls_path,
            area.ls_offset,
            iotimeout=config.sanlock_io_timeout,
        )
    except sl.SanlockException as exc:
        if _errno(exc) != E_EXIST:
            raise _daemon_error(
                exc, f"joining lockspace {area.lockspace.decode()!r} as host id {host_id}"
            ) from None
        already = True
    return {
        "lockspace": area.lockspace.decode(),
        "host_id": host_id,
        "already_joined": already,
        "seconds": round(time.monotonic() - t0, 3),
    }


def leave(config: Config) -> None:
    sl = binding()
    area = Area(config)
    try:
        sl.rem_lockspace(area.lockspace, config.sanlock_host_id, area.ls_path, area.ls_offset)
    except sl.SanlockException as exc:
        raise _daemon_error(exc, f"leaving lockspace {area.lockspace.decode()!r}") from None


def _watchdog() -> tuple[bool, list[str]]:
    """(wdmd running, sanlock daemons started with -w 0)."""
    wdmd = False
    no_wd: list[str] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read(4096).split(b"\0")
        except OSError:
            continue
        prog = os.path.basename(argv[0]).decode(errors="replace")
        if prog == "wdmd":
            wdmd = True
        if prog == "sanlock" and b"daemon" in argv[1:2]:
            for i, a in enumerate(argv[:-1]):
                if a == b"-w" and argv[i + 1] == b"0":
                    no_wd.append(entry)
    return wdmd, no_wd


def doctor_findings(config: Config) -> list[tuple[str, str, str, str]]:
    """(status OK|WARN|FAIL, check, message, fix) tuples, for qemu-lockctl doctor."""
    used = config.backend == "sanlock"
    bad = "FAIL" if used else "WARN"
    out: list[tuple[str, str, str, str]] = []
    try:
        sl = binding()
    except QemuLockedError as exc:
        out.append((bad, "sanlock binding", exc.message, "apt-get install python3-sanlock"))
        return out
    how = "loaded explicitly" if _binding_origin.startswith(DIST_PACKAGES) else "imported"
    out.append(("OK", "sanlock binding", f"{_binding_origin} ({how})", ""))
    sock = f"{_run_dir()}/sanlock.sock"
    try:
        fd = sl.register()
        os.close(fd)
        out.append(("OK", "sanlock daemon", f"reachable at {sock}", ""))
    except sl.SanlockException as exc:
        out.append(
            (bad, "sanlock daemon", f"not reachable at {sock}: {_why(exc)}", "start sanlock")
        )
        return out
    wdmd, no_wd = _watchdog()
    if not wdmd or no_wd:
        why = "wdmd is not running" if not wdmd else "sanlock runs with -w 0"
        out.append(
            (
                "WARN",
                "sanlock fencing",
                f"no watchdog ({why}): there is NO fencing. If this host's sanlock daemon "
                "dies or loses its storage, its VMs keep running while another host takes "
                "their leases after the failover time (~60 s + 8 x io_timeout), so two "
                "QEMUs can write one disk",
                "run wdmd with a real /dev/watchdog and sanlock without -w 0",
            )
        )
    else:
        out.append(("OK", "sanlock fencing", "wdmd is running: hosts are fenced", ""))
    if not config.sanlock_path:
        out.append((bad, "sanlock lockspace", "sanlock_path is not set", "set sanlock_path"))
        return out
    try:
        area = Area(config)
        info = sl.read_lockspace(area.ls_path, area.ls_offset)
        out.append(
            (
                "OK",
                "sanlock lockspace",
                f"{area.ls_path}:{area.ls_offset}: lockspace "
                f"{_text(info.get('lockspace', b''))!r}, io_timeout {info.get('iotimeout')}",
                "",
            )
        )
        out.append(
            (
                "OK",
                "sanlock leases",
                f"{area.res_path}:{area.res_offset}: {area.slots(sl) - 1} lease slots",
                "",
            )
        )
    except sl.SanlockException as exc:
        out.append(
            (
                bad,
                "sanlock lockspace",
                f"{config.sanlock_path}: {_why(exc)}",
                "qemu-lockctl sanlock init",
            )
        )
        return out
    except QemuLockedError as exc:
        out.append((bad, "sanlock lockspace", exc.message, "qemu-lockctl sanlock init"))
        return out
    state = "not joined"
    for ls in sl.get_lockspaces():
        if _text(ls.get("lockspace", b"")) == area.lockspace.decode():
            state = "joined" if ls.get("flags", 0) == 0 else "joining"
            if state == "joined":
                state += f" as host id {ls.get('host_id')}"
    ok = state.startswith("joined")
    out.append(
        (
            "OK" if ok else bad,
            "sanlock join",
            f"lockspace {area.lockspace.decode()!r}: {state}",
            "" if ok else "qemu-lockctl sanlock join",
        )
    )
    return out


__all__ = [
    "EXCLUSIVE",
    "SHARED",
    "Area",
    "Held",
    "Lease",
    "acquire",
    "binding",
    "conflicts",
    "doctor_findings",
    "init",
    "join",
    "lease_table",
    "leases",
    "status_rows",
]
