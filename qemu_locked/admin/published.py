"""What the guards and supervisors beside running VMs publish for ``qemu-lockctl
status``: each lock's origin and the command line's network disks, in a memfd
each keeps (beside/locks.py, ``Locks.publish``), read through /proc."""

from __future__ import annotations

import os

from qemu_locked.beside.locks import MEMFD_NAME, NET

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator


def published_network() -> dict[int, list[tuple[str, str]]]:
    """QEMU pid -> (source, reason) of each network disk of its command line."""
    out: dict[int, list[tuple[str, str]]] = {}
    for line in _published_lines():
        kind, _tab, rest = line.partition("\t")
        qemu, _tab, rest = rest.partition("\t")
        source, _tab, reason = rest.partition("\t")
        if kind == NET and qemu.isdigit():
            out.setdefault(int(qemu), []).append((source, reason))
    return out


def published() -> dict[tuple[int, str], str]:
    """(QEMU pid, real path) -> origin, from every guard and supervisor this host
    lets us read."""
    out: dict[tuple[int, str], str] = {}
    for line in _published_lines():
        qemu, _tab, rest = line.partition("\t")
        path, _tab, origin = rest.partition("\t")
        if qemu.isdigit():
            out[(int(qemu), os.path.realpath(path))] = origin
    return out


def _published_lines() -> Iterator[str]:
    from qemu_locked.lock import procfs

    for pid in procfs.pids():
        if procfs.comm(pid) not in procfs.HELPER_COMMS:
            continue
        for fd, target, _info in procfs.fd_entries(pid):
            if not target.startswith(f"/memfd:{MEMFD_NAME}"):
                continue
            try:
                with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
                    text = f.read(1 << 20).decode("utf-8", "surrogateescape")
            except OSError:
                continue
            yield from text.splitlines()
