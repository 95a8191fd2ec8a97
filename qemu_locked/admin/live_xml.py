"""The names a user knows (``disk vda``, ``cdrom hdc medium``) for the files of a
running libvirt domain, from libvirt's live status XML (/run/libvirt/qemu/NAME.xml,
readable by root), and the ORIGIN ``status`` shows with them.

A name is given only to a file the live XML still lists as that device's
source: a disk detached since, or an alias now worn by another disk, is never
named (issue 23: the origin column named a detached disk).
"""

from __future__ import annotations

import os

from qemu_locked.model.value import frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

LIBVIRT_STATUS = "/run/libvirt/qemu"
HOT_PLUG = "hot-plug "
_AFTER_START = "after start"


@frozen
class Live:
    """What libvirt's live XML says of a running domain's disks."""

    names: dict[str, str]  # realpath of each local source -> ``disk vda``...
    network: tuple[tuple[str, str], ...]  # (``nbd://host:10809/export``, ``disk vdb``)


def read(data: bytes) -> Live:
    """:class:`Live` from a domain (status) XML."""
    from lxml import etree

    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    root = etree.fromstring(data, parser)
    out: dict[str, str] = {}
    network = []
    for disk in root.iterfind(".//devices/disk"):
        element = disk.find("target")
        target = element.get("dev") if element is not None else None
        if not target:
            continue
        kind = disk.get("device", "disk")
        name = f"{kind} {target}" + (" medium" if kind in ("cdrom", "floppy") else "")
        if disk.get("type") == "network":
            network.append((_url(disk.find("source")), name))
            continue
        for depth, source in enumerate(_chain(disk)):
            path = source.get("file") or source.get("dev")
            if path:
                out.setdefault(os.path.realpath(path), name if depth == 0 else f"{name} backing")
    return Live(out, tuple(network))


def names_in(data: bytes) -> dict[str, str]:
    return read(data).names


def _url(source: Any) -> str:
    """``nbd://host:10809/export`` for a network source, as QEMU's URLs read."""
    if source is None:
        return "?"
    protocol = source.get("protocol") or "?"
    name = (source.get("name") or "").lstrip("/")
    host = source.find("host")
    if host is None or not host.get("name"):
        where = host.get("socket") if host is not None else None
        return f"{protocol}:{where or ''}{'/' + name if name else ''}"
    port = f":{host.get('port')}" if host.get("port") else ""
    return f"{protocol}://{host.get('name')}{port}/{name}"


def _chain(disk: Any) -> Iterator[Any]:
    """The disk's own source, then each backingStore's, top to bottom."""
    node = disk
    while node is not None:
        source = node.find("source")
        if source is not None:
            yield source
        node = node.find("backingStore")


def live(guest: str) -> Live | None:
    """:func:`read` of the guest's live XML; None when it cannot be read."""
    if not guest or "/" in guest or guest.startswith("."):
        return None
    from lxml import etree

    from qemu_locked.model.errors import UsageError
    from qemu_locked.parse.domain_xml import read_limited

    try:
        return read(read_limited(os.path.join(LIBVIRT_STATUS, guest + ".xml")))
    except (OSError, etree.XMLSyntaxError, ValueError, UsageError):
        return None


def exact(origin: str, real: str, names: dict[str, str] | None) -> str:
    """The ORIGIN for a lock on ``real`` that its guard or supervisor published
    as ``origin``: a start-time argument (``-drive ...``), ``opened after start``
    (the supervisor), ``hot-plug ALIAS`` / ``blockdev-add NODE`` / ``media change
    DEV`` (the QMP guard)."""
    if names is None:
        return origin  # no live XML here (not libvirt, or not root): as published
    named = names.get(real)
    start = origin.startswith("-")
    if named is None:
        # No device of the domain has it (any more): a hot-plugged disk detached
        # since (QEMU still has it open), a mirror target, nvram...  The alias of
        # a detached device may be worn by another disk now: not repeated.
        return "hot-plug, since detached" if origin.startswith(HOT_PLUG) else origin
    if start:
        return f"{named} ({origin})"
    if origin.startswith(HOT_PLUG) and not named.endswith("medium"):
        return HOT_PLUG + named.split(" ", 1)[1]  # hot-plug sdb: the name libvirt shows
    return f"{named} ({_AFTER_START})"
