"""sanlock administration: init, join, leave, and the lease table status reads."""

from __future__ import annotations

import os
import stat
import time

from qemu_locked.backends.sanlock.area import (
    Area,
    Lease,
    host_names,
    lease_name,
    owners,
    read_slot,
    text,
)
from qemu_locked.backends.sanlock.binding import (
    ALIGN,
    ALLOC_PREFIX,
    DEFAULT_SLOTS,
    E_AGAIN,
    E_EXIST,
    E_NOENT,
    MAX_HOSTS,
    binding,
    daemon_error,
    errno_of,
    run_dir,
)  # fmt: skip
from qemu_locked.lock import safeopen as images
from qemu_locked.lock.keys import disk_key
from qemu_locked.model.errors import BackendError, ConfigError, QemuLockedError
from qemu_locked.model.plan import EXCLUSIVE, SHARED
from qemu_locked.model.row import StatusRow

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from qemu_locked.model.config import Config

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
    from qemu_locked.lock import procfs

    sl = binding()
    area = Area(config)
    labels = {lease_name(key_of(r)): r for r in resources or []}
    names = host_names(area)
    joined = False
    try:
        for ls in sl.get_lockspaces():
            if text(ls.get("lockspace", b"")) == area.lockspace.decode():
                joined = ls.get("flags", 0) == 0
    except sl.SanlockException as exc:
        raise daemon_error(exc, "get_lockspaces") from None
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
            if errno_of(exc) != E_AGAIN:
                raise daemon_error(exc, "get_hosts") from None
            host_note = "host states not known yet (this host joined less than ~20 s ago)"
    local = _local_holders()
    rows: list[dict[str, Any]] = []
    n = area.slots(sl)
    for slot in range(1, n):
        got = read_slot(sl, area, slot)
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
                    {"pid": p, "mode": m, "guest": procfs.guest_of(p)[0]}
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


def status_rows(config: Config, paths: list[str] | None = None) -> list[StatusRow]:
    """Rows for ``qemu-lockctl status``: one per lease owner seen on storage."""
    from qemu_locked.lock import procfs

    try:
        table = lease_table(config)
    except QemuLockedError:
        return []
    # Lease name -> (the path asked about, its key): a sanlock lease is named by a hash
    # and keeps neither, so a row can say them only when the path was given.
    wanted: dict[str, tuple[str, str]] | None = None
    if paths:
        wanted = {}
        for p in paths:
            try:
                key = disk_key(p, os.stat(p))
            except OSError:
                continue
            wanted[lease_name(key)] = (p, key)
    rows: list[StatusRow] = []
    me = config.sanlock_host_id
    for lease in table["leases"]:
        if wanted is not None and lease["lease"] not in wanted:
            continue
        for owner in lease["owners"]:
            pid: int | None = None
            guest = uuid = None
            if owner["host_id"] == me and lease["local"]:
                pid = lease["local"][0]["pid"]
                guest, uuid, _comm = procfs.guest_of(pid)
            given = (wanted or {}).get(lease["lease"])
            path = given[0] if given else f"sanlock:{lease['lease']}"
            row_key = given[1] if given else None
            rows.append(StatusRow(
                path, owner["mode"], pid, owner["host"] or f"host id {owner['host_id']}", guest,
                uuid, None, source="sanlock", host_id=owner["host_id"], slot=lease["slot"],
                key=row_key,
            ))  # fmt: skip
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
        if errno_of(exc) in (E_NOENT, 111, 13) and not os.path.exists(f"{run_dir()}/sanlock.sock"):
            raise daemon_error(exc, "init") from None
        info = None
    if info is not None and force:
        try:
            joined = [text(ls.get("lockspace", b"")) for ls in sl.get_lockspaces()]
        except sl.SanlockException as exc:
            raise daemon_error(exc, "get_lockspaces") from None
        if text(info.get("lockspace", b"")) in joined:
            raise BackendError(
                f"sanlock: {area.ls_path}: this host is in lockspace "
                f"{text(info.get('lockspace', b''))!r}: run qemu-lockctl sanlock leave on every "
                "host before init --force"
            )
    if info is not None and not force:
        raise BackendError(
            f"sanlock: {area.ls_path}: already holds lockspace "
            f"{text(info.get('lockspace', b''))!r} (io_timeout {info.get('iotimeout')}); "
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
        raise daemon_error(exc, f"writing the lockspace to {area.ls_path}") from None
    cleared = 0
    try:
        if not res_created:
            # Old leases (an earlier init) would be found by name: clear every slot.
            for slot in range(1, slots):
                if isinstance(read_slot(sl, area, slot), tuple):
                    sl.write_resource(area.lockspace, b"", area.disk(slot), clear=True)
                    cleared += 1
        sl.write_resource(area.lockspace, f"{ALLOC_PREFIX}{slots}".encode(), area.disk(0))
    except sl.SanlockException as exc:
        raise daemon_error(exc, f"writing the lease area to {area.res_path}") from None
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
        if errno_of(exc) != E_EXIST:
            raise daemon_error(
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
        raise daemon_error(exc, f"leaving lockspace {area.lockspace.decode()!r}") from None
