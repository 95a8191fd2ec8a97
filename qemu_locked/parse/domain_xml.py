"""libvirt domain XML -> Plan: the same plan the argv path gives for the
QEMU command line libvirt would build from this XML.

Every XML field is declared once, next to its XPath, on a small view class
(virt-manager's virtinst style); the rules that turn fields into locks live
in :func:`_plan`.  The parser is hardened: no entity expansion, no network,
no DTD loading, no huge trees, a size limit checked before parsing, and a
DOCTYPE that declares entities or names an external DTD is refused.

Admin side only (qemu-lockctl): this imports lxml, the VM start path never does.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from lxml import etree

from qemu_locked.model.errors import UsageError
from qemu_locked.model.plan import (
    BACKING,
    EXCLUSIVE,
    READONLY,
    SHAREABLE,
    SHARED,
    WRITABLE,
    DiskRef,
    Plan,
    Skipped,
    merge_by_path,
)

MAX_XML = 10 << 20  # 10 MiB: real domain XML is a few KiB

# Formats whose images name a backing file in their header, which libvirt
# probes at start when the XML has no <backingStore> for the disk.
_HEADER_BACKING = frozenset({"qcow2", "qed", "vmdk", "qcow"})

_NOT_LOCAL = {
    "dir": "directory disk (vvfat): not an image file",
    "nvme": "NVMe passthrough: no image file",
    "vhostuser": "vhost-user disk: no image file",
    "vhostvdpa": "vhost-vDPA disk: no image file",
}


# -- field declarations ------------------------------------------------------


class _Field:
    """One XML value: an attribute (``@x`` paths) or an element's text."""

    def __init__(self, xpath: str) -> None:
        self.xpath = xpath

    def __get__(self, view: _View, owner: object) -> str | None:
        found: Any = view.node.xpath(self.xpath)
        if not found:
            return None
        first = found[0]
        text = first if isinstance(first, str) else first.text
        return None if text is None else str(text).strip()


class _Flag:
    """True when an element exists (``<readonly/>``)."""

    def __init__(self, xpath: str) -> None:
        self.xpath = xpath

    def __get__(self, view: _View, owner: object) -> bool:
        return bool(view.node.xpath(self.xpath))


class _View:
    def __init__(self, node: Any) -> None:
        self.node = node

    def children(self, xpath: str) -> list[Any]:
        found: Any = self.node.xpath(xpath)
        return list(found)


class _Source(_View):
    """Fields shared by <disk>, <backingStore> and <dataStore>."""

    type = _Field("./@type")  # file | block | dir | network | volume | nvme | vhostuser
    file = _Field("./source/@file")
    dev = _Field("./source/@dev")
    protocol = _Field("./source/@protocol")
    name = _Field("./source/@name")
    pool = _Field("./source/@pool")
    volume = _Field("./source/@volume")
    has_source = _Flag("./source")
    has_backing = _Flag("./backingStore")

    def path(self) -> str | None:
        return self.file if self.type in (None, "file") else self.dev

    def backing(self) -> _Backing | None:
        found = self.children("./backingStore")
        return _Backing(found[0]) if found else None

    def data_store(self) -> _Backing | None:
        found = self.children("./source/dataStore")
        return _Backing(found[0]) if found else None


class _Backing(_Source):
    format = _Field("./format/@type")


class _Disk(_Source):
    device = _Field("./@device")  # disk | cdrom | floppy | lun
    format = _Field("./driver/@type")
    target = _Field("./target/@dev")
    readonly = _Flag("./readonly")
    shareable = _Flag("./shareable")
    transient = _Flag("./transient")
    share_backing = _Field("./transient/@shareBacking")


class _Lease(_View):
    lockspace = _Field("./lockspace")
    key = _Field("./key")
    target = _Field("./target/@path")


class _Domain(_View):
    name = _Field("./name")
    uuid = _Field("./uuid")
    emulator = _Field("./devices/emulator")
    firmware = _Field("./os/@firmware")
    loader = _Field("./os/loader")
    loader_type = _Field("./os/loader/@type")  # rom | pflash
    loader_readonly = _Field("./os/loader/@readonly")
    nvram = _Field("./os/nvram")
    nvram_type = _Field("./os/nvram/@type")  # file | block | network (libvirt >= 8.5)
    nvram_file = _Field("./os/nvram/source/@file")
    nvram_dev = _Field("./os/nvram/source/@dev")

    def disks(self) -> list[_Disk]:
        return [_Disk(n) for n in self.children("./devices/disk")]

    def leases(self) -> list[_Lease]:
        return [_Lease(n) for n in self.children("./devices/lease")]


# -- parsing -------------------------------------------------------------------


def _parser(encoding: str | None) -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_pis=True,
        remove_comments=True,
        encoding=encoding,
    )


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def parse(data: bytes, source: str, encoding: str | None = None) -> Any:
    """The <domain> root of ``data``, or UsageError (one line)."""
    if len(data) > MAX_XML:
        raise UsageError(f"{source}: larger than {MAX_XML >> 20} MiB; not a domain XML")
    prolog = data[: data.find(b"<domain")] if b"<domain" in data else data
    if b"<!ENTITY" in prolog:  # refused before the parser sees it (UTF-16 input: below)
        raise UsageError(f"{source}: DOCTYPE declares entities; refused (XML bomb or XXE)")
    try:
        root: Any = etree.fromstring(data, _parser(encoding))
    except etree.XMLSyntaxError as exc:
        raise UsageError(f"{source}: not valid XML: {_one_line(exc.msg or str(exc))}") from None
    except ValueError as exc:  # e.g. an encoding lxml cannot decode
        raise UsageError(f"{source}: not valid XML: {_one_line(str(exc))}") from None
    if root is None:
        raise UsageError(f"{source}: empty document")
    info = root.getroottree().docinfo
    dtd = info.internalDTD
    if dtd is not None and any(True for _ in dtd.iterentities()):
        raise UsageError(f"{source}: DOCTYPE declares entities; refused (XML bomb or XXE)")
    if info.system_url or info.public_id:
        raise UsageError(f"{source}: DOCTYPE names an external DTD; refused")
    if root.tag != "domain":
        raise UsageError(f"{source}: not a libvirt domain XML (root element <{root.tag}>)")
    return root


def read_limited(path: str) -> bytes:
    """The bytes of a regular file, at most MAX_XML + 1 of them."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
    except ValueError:
        raise UsageError(f"{path}: path contains a NUL byte") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path}: not a regular file")
        if st.st_size > MAX_XML:
            raise UsageError(f"{path}: larger than {MAX_XML >> 20} MiB; not a domain XML")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_XML:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def plan_from_file(path: str | os.PathLike[str]) -> Plan:
    name = os.fspath(path)
    return plan_from_bytes(read_limited(name), name)


def plan_from_bytes(data: bytes, source: str) -> Plan:
    return _plan(_Domain(parse(data, source)))


def plan_from_string(text: str, source: str) -> Plan:
    data = text.encode("utf-8", "surrogateescape")
    return _plan(_Domain(parse(data, source, encoding="utf-8")))


def emulator_of(data: bytes, source: str) -> str | None:
    """The <emulator> path of a domain XML (for doctor)."""
    return _Domain(parse(data, source)).emulator


# -- XML -> Plan ---------------------------------------------------------------


def _mode_role(disk: _Disk) -> tuple[str, str]:
    if disk.readonly or disk.device == "cdrom":
        return SHARED, READONLY
    if disk.transient and disk.share_backing == "yes":
        # libvirt adds such a disk after start, on an overlay over a read-only base.
        return SHARED, BACKING
    if disk.shareable:
        return SHARED, SHAREABLE
    # <transient/> alone: QEMU opens the base writable; libvirt adds the overlay later.
    return EXCLUSIVE, WRITABLE


def _why_not_local(src: _Source) -> str | None:
    kind = src.type or "file"
    if kind in ("file", "block"):
        return None
    if kind == "network":
        what = src.protocol or "?"
        return f"network disk ({what}{' ' + src.name if src.name else ''}): not a local file"
    if kind == "volume":
        return (
            f"storage pool volume {src.pool or '?'}/{src.volume or '?'}: "
            "its path is known to libvirt only"
        )
    return _NOT_LOCAL.get(kind, f"disk type '{kind}': not locked")


def _chain(
    first: _Backing | None, label: str, disks: list[DiskRef], skipped: list[Skipped]
) -> None:
    """Add a <backingStore> chain, shared.  An element with no nested
    <backingStore> leaves the rest to its header, as libvirt probes it."""
    node, depth = first, 0
    while node is not None:
        depth += 1
        origin = f"{label} backingStore {depth}"
        if not node.type and not node.has_source:
            return  # <backingStore/>: the chain ends here
        why = _why_not_local(node)
        path = node.path()
        if why is not None or not path:
            skipped.append(Skipped(origin, why or "backingStore without a source path"))
            return
        probe = not node.has_backing and (node.format or "") in _HEADER_BACKING
        disks.append(DiskRef(path, SHARED, origin, BACKING, probe, node.format == "qcow2"))
        if depth >= 256:
            raise UsageError(f"{label}: backingStore chain deeper than 256")
        node = node.backing()


def _disk(disk: _Disk, index: int, disks: list[DiskRef], skipped: list[Skipped]) -> None:
    label = f"disk {disk.target or f'#{index}'}"
    why = _why_not_local(disk)
    if why is not None:
        skipped.append(Skipped(label, why))
        return
    path = disk.path()
    if not path:
        if disk.device in ("cdrom", "floppy"):
            skipped.append(Skipped(label, f"{disk.device}: no medium"))
        else:
            skipped.append(Skipped(label, "no source path"))
        return
    mode, role = _mode_role(disk)
    fmt = disk.format or "raw"  # libvirt does not probe formats: no <driver type> means raw
    probe = not disk.has_backing and fmt in _HEADER_BACKING
    data = disk.data_store()
    # without <dataStore>, QEMU opens the data file its header names, if any
    disks.append(DiskRef(path, mode, label, role, probe, fmt == "qcow2" and data is None))
    if data is not None:
        data_path = data.path()
        if _why_not_local(data) is None and data_path:
            disks.append(DiskRef(data_path, mode, f"{label} dataStore", role))
        else:
            skipped.append(Skipped(f"{label} dataStore", _why_not_local(data) or "no path"))
    _chain(disk.backing(), label, disks, skipped)


def _firmware(dom: _Domain, disks: list[DiskRef], skipped: list[Skipped]) -> None:
    loader = dom.loader
    if loader:
        if dom.loader_type == "rom" or (dom.loader_type is None and dom.loader_readonly is None):
            skipped.append(Skipped("<os><loader>", "firmware ROM (-bios): read once, not locked"))
        elif dom.loader_readonly == "yes":
            disks.append(DiskRef(loader, SHARED, "<os><loader>", READONLY))
        else:
            disks.append(DiskRef(loader, EXCLUSIVE, "<os><loader>", WRITABLE))
    elif dom.firmware:
        skipped.append(
            Skipped(
                f"<os firmware='{dom.firmware}'>", "firmware files are chosen by libvirt at start"
            )
        )
    if dom.nvram_type == "network":
        skipped.append(Skipped("<os><nvram>", "network NVRAM: not a local file"))
        return
    nvram = dom.nvram_file or dom.nvram_dev or dom.nvram
    if nvram:
        disks.append(DiskRef(nvram, EXCLUSIVE, "<os><nvram>", WRITABLE))


def _plan(dom: _Domain) -> Plan:
    disks: list[DiskRef] = []
    skipped: list[Skipped] = []
    _firmware(dom, disks, skipped)
    for index, disk in enumerate(dom.disks()):
        _disk(disk, index, disks, skipped)
    for lease in dom.leases():
        what = "/".join(x for x in (lease.lockspace, lease.key) if x) or "?"
        skipped.append(Skipped(f"<lease> {what}", "libvirt <lease>: not used by qemu-locked"))
    return Plan(disks=merge_by_path(disks), skipped=tuple(skipped), guest=dom.name, uuid=dom.uuid)


__all__ = [
    "MAX_XML",
    "emulator_of",
    "parse",
    "plan_from_bytes",
    "plan_from_file",
    "plan_from_string",
]
