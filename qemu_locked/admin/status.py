"""The rows of ``qemu-lockctl status``: who holds which byte-0 lock.

:func:`status_rows` is the one entry point.  Its rows come from the OFD
locks this host can see in /proc (every backend locks that way here); a
backend whose locks reach beyond this host (lockspace records, sanlock)
adds rows of its own.  Every row is a :class:`StatusRow`, so ``--json``
keeps one shape whatever produced it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from qemu_locked.lock import procfs
from qemu_locked.model.config import Config
from qemu_locked.model.errors import QemuLockedError, UsageError
from qemu_locked.model.row import StatusRow, iso_time


def _identities(paths: Iterable[str]) -> set[tuple[int, int]]:
    out: set[tuple[int, int]] = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror}") from None
        except ValueError:
            raise UsageError(f"{path}: path contains a NUL byte") from None
        out.add((st.st_dev, st.st_ino))
    return out


def local_rows(config: Config, paths: list[str] | None = None) -> list[StatusRow]:
    """Every byte-0 OFD lock held through a process this host lets us see."""
    match = _identities(paths) if paths else None
    host = config.effective_host()
    seen: set[tuple[int, int, int, str]] = set()
    procs: dict[int, tuple[str | None, str | None, str, float | None]] = {}
    rows: list[StatusRow] = []
    for lock in procfs.scan(match):
        if lock.kind != "OFDLCK":
            continue  # POSIX/flock locks at byte 0 are pidfiles and such, not ours
        key = (lock.pid, lock.dev, lock.ino, lock.mode)
        if key in seen:
            continue  # the same open file description reached through a dup'd fd
        seen.add(key)
        if lock.pid not in procs:
            guest, uuid, comm = procfs.guest_of(lock.pid)
            procs[lock.pid] = (guest, uuid, comm, procfs.start_time(lock.pid))
        guest, uuid, comm, since = procs[lock.pid]
        rows.append(StatusRow(lock.path, lock.mode, lock.pid, host, guest, uuid, iso_time(since),
                              source="ofd", comm=comm, fd=lock.fd,
                              key=_key(lock.path, f"/proc/{lock.pid}/fd/{lock.fd}")))  # fmt: skip
    return rows


def _key(path: str, fd_link: str) -> str | None:
    """The stable key of what a holder's fd is open on (its path is the holder's:
    another mount namespace may not show it here, the fd does)."""
    from qemu_locked.lock import keys

    st = _stat(fd_link)
    if st is None or path.endswith(".lease"):
        return None  # gone, or a lease file: the lease's own row has the key
    try:
        return keys.disk_key(path, st)
    except (OSError, QemuLockedError):
        return None


def backend_rows(config: Config, paths: list[str] | None = None) -> list[StatusRow]:
    """Rows a backend knows beyond this host's /proc."""
    if config.backend == "sanlock":
        from qemu_locked.backends.sanlock import admin

        return admin.status_rows(config, paths)
    # Leases (lockspace backend, block devices and domain leases of direct) live in lockspace_dir.
    if config.backend == "direct" and not os.path.isdir(config.lockspace_dir):
        return []
    from qemu_locked.backends.lockspace import status

    return status.status_rows(config, paths)


def status_rows(config: Config, paths: list[str] | None = None) -> list[StatusRow]:
    """All rows, local first, sorted by path then pid.

    Lease files seen through /proc are left to the lockspace rows, which name
    the resource (image path or domain) instead of a hashed file name; so are
    the images those leases stand for.  Locks
    that a migration keeper still waits for are rows in state ``pending``.
    """
    from qemu_locked.beside import keeper
    from qemu_locked.model.value import replace

    space = os.path.realpath(config.lockspace_dir) + os.sep
    local = [r for r in local_rows(config, paths) if not r.path.startswith(space)]
    # An image (or device) the lockspace/sanlock backend leases is also byte-0
    # locked by the same VM: one row, the lease's (state, host, the path the VM
    # was given), with the holder's fd on it (status of the lock, command name).
    mine = {r.identity(): r for r in local}
    leased = [replace(r, fd=m.fd, comm=m.comm) if (m := mine.get(r.identity())) else r
              for r in backend_rows(config, paths)]  # fmt: skip
    have = {r.identity() for r in leased}
    rows = [r for r in local if r.identity() not in have]
    pending = keeper.pending_rows(config.effective_host(), space)
    if paths:
        wanted = _identities(paths)
        pending = [r for r in pending if (st := _stat(r.path)) and (st.st_dev, st.st_ino) in wanted]
    rows += pending
    have = {r.identity() for r in rows}
    rows += [r for r in leased if r.identity() not in have]
    rows += unseen_rows(paths or [], rows, config.effective_host())
    rows.sort(key=lambda r: (r.path, str(r.host), r.pid or 0))
    return _with_origins(rows, paths, config.effective_host())


def unseen_rows(paths: list[str], rows: list[StatusRow], host: str) -> list[StatusRow]:
    """A named file no row shows held is asked the way a start asks (F_OFD_GETLK):
    held, it gets a row saying so even when its holder cannot be named, so
    status never calls free what a start would be refused."""
    from qemu_locked.lock import ofd, safeopen, unseen

    seen = {(st.st_dev, st.st_ino) for st in map(_row_stat, _holding(rows)) if st}
    out = []
    for path in paths:
        st = _stat(path)
        if st is None or (st.st_dev, st.st_ino) in seen:
            continue
        try:
            fd = safeopen.open_checked(path, False, safeopen.identity_key(st))
        except QemuLockedError:
            continue  # not a disk, or unreadable here: nothing a start would ask
        try:
            found = ofd.conflicting(fd, True)
        finally:
            os.close(fd)
        if found is None:
            continue
        holders = procfs.holders_of(st.st_dev, st.st_ino)
        # A POSIX lock on byte 0 refuses an OFD lock too (the rows show OFD locks
        # only), or the holder came since the rows were read: named all the same.
        out += [StatusRow(path, h.mode, h.pid, host, h.guest, h.uuid, iso_time(h.since),
                          source="ofd", comm=h.comm) for h in holders]  # fmt: skip
        if holders:
            continue
        why = unseen.explain(st.st_dev, st.st_ino)
        out.append(StatusRow(path, found[0], state=why.state, source="ofd", held_by=why.holder))
    return out


def _holding(rows: list[StatusRow]) -> list[StatusRow]:
    """Rows that show their file held (a stale lease record does not)."""
    return [r for r in rows if r.state != "stale"]


def unlisted(config: Config, rows: list[StatusRow]) -> list[dict[str, object]]:
    """OFD locks on byte 0 this kernel holds that no row shows and no lease file
    explains: their holders have no /proc entry here this user may read (another
    PID namespace, another user's process), and without a PATH there is no name
    to give them.  Listed by device and inode, so that `status` never says
    "no lock held" while the kernel holds some."""
    from qemu_locked.lock import unseen

    found = unseen.kernel_locks() or []
    known = {(st.st_dev, st.st_ino) for st in map(_row_stat, _holding(rows)) if st}
    space = config.lockspace_dir
    try:
        names = os.listdir(space)
    except OSError:
        names = []
    known |= {(st.st_dev, st.st_ino) for st in (_stat(os.path.join(space, n)) for n in names) if st}
    out: dict[tuple[int, int], str] = {}
    for kind, dev, ino, mode in found:
        if kind == "OFDLCK" and (dev, ino) not in known:
            out[dev, ino] = "exclusive" if "exclusive" in (out.get((dev, ino)), mode) else mode
    return [
        {"device": f"{os.major(d):02x}:{os.minor(d):02x}", "inode": i, "mode": m}
        for (d, i), m in sorted(out.items())
    ]


_SHOWN = 4  # unlisted locks named in the text


def footnotes(rows: list[dict[str, object]], others: list[dict[str, object]]) -> list[str]:
    """What the table cannot say: who holds what no pid names, and what is stale."""
    out = []
    said: dict[tuple[object, object], int] = {}
    for r in rows:
        if r.get("held_by"):
            said[r.get("state"), r["held_by"]] = said.get((r.get("state"), r["held_by"]), 0) + 1
    out += [f"{n} {state}: locked by {who}" for (state, who), n in said.items()]
    network = sum(1 for r in rows if r.get("state") == NOT_LOCKED)
    if network:
        from qemu_locked.model.plan import NETWORK_WHY

        out.append(f"{network} {NOT_LOCKED}{'s' if network > 1 else ''}: {NETWORK_WHY}")
    stale = sum(1 for r in rows if r.get("state") == "stale")
    if stale:
        out.append(f"{stale} stale: lease records nobody holds any more (the lock is the truth); "
                   "`qemu-lockctl lockspace gc` removes their files")  # fmt: skip
    if others:
        listed = ", ".join(f"{o['device']}:{o['inode']} ({o['mode']})" for o in others[:_SHOWN])
        listed += ", ..." if len(others) > _SHOWN else ""  # --json lists them all
        out.append(f"{len(others)} more: OFD locks at byte 0 on this machine whose holders no "
                   f"/proc entry here shows (device:inode {listed}); `qemu-lockctl status PATH` "
                   "asks a file")  # fmt: skip
    return out


def _row_stat(row: StatusRow) -> os.stat_result | None:
    """The file a row is about: through the holder's own fd when it has one (its
    path is the holder's, which another mount namespace, a container or a host
    of the two-host lab, may not show here)."""
    if row.pid is not None and row.fd is not None:
        found = _stat(f"/proc/{row.pid}/fd/{row.fd}")
        if found is not None:
            return found
    return _stat(row.path)


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


NOT_LOCKED = "not locked: network disk"


def _with_origins(rows: list[StatusRow], paths: list[str] | None, host: str) -> list[StatusRow]:
    """What each lock of a VM under its supervisor or guard is for (the start-time
    argument, ``opened after start``...), with the device's name where libvirt's
    live XML still lists the file (admin/live_xml.py); and, when no PATH narrows
    it, the network disks of those VMs, which have no lock to show."""
    from qemu_locked.admin import live_xml
    from qemu_locked.admin.published import published, published_network
    from qemu_locked.model.value import replace

    origins = published()
    network = {} if paths else published_network()
    lives: dict[str, live_xml.Live | None] = {}

    def live(guest: str | None) -> live_xml.Live | None:
        if guest and guest not in lives:
            lives[guest] = live_xml.live(guest)
        return lives.get(guest) if guest else None

    out = []
    for row in rows:
        real = os.path.realpath(row.path)
        origin = origins.get((row.pid or 0, real))
        if origin and row.guest:
            found = live(row.guest)
            origin = live_xml.exact(origin, real, found.names if found else None)
        out.append(replace(row, origin=origin) if origin else row)
    for pid, entries in sorted(network.items()):
        guest, uuid, comm = procfs.guest_of(pid)
        found = live(guest)
        # libvirt's live XML has the disks attached since, and not those detached
        shown = list(found.network) if found is not None else [(s, None) for s, _ in entries]
        out += [StatusRow(source, None, pid, host, guest, uuid, state=NOT_LOCKED, comm=comm,
                          origin=origin) for source, origin in shown]  # fmt: skip
    return out
