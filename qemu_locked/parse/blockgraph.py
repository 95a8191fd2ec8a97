"""The block graph of a QEMU command line, walked down to the files QEMU opens.

Every ``-drive`` (and ``-hda``, positional image...) is a block tree whose top
is writable unless it says otherwise; every ``-blockdev`` is a node, linked
to others by node-name (``file``, ``backing``, ``data-file``...).  Roots of
the graph, and nodes that a ``-device`` attaches, are walked down to the
protocol leaves (``file``, ``host_device``, ``host_cdrom``): those are the
paths QEMU opens, each in the mode DESIGN section 4 gives.  Pure: no I/O.
"""

from __future__ import annotations

from qemu_locked.model.errors import ArgumentError
from qemu_locked.model.plan import (
    BACKING,
    EXCLUSIVE,
    READONLY,
    SHAREABLE,
    SHARED,
    WRITABLE,
    DiskRef,
    Skipped,
)  # fmt: skip
from qemu_locked.parse.keyval import as_bool, load_json, nest

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FILE_DRIVERS = frozenset({"file", "host_device", "host_cdrom"})
_NETWORK_DRIVERS = frozenset(
    {
        "nbd", "rbd", "iscsi", "iser", "gluster", "ssh", "http", "https", "ftp", "ftps", "nfs",
        "sheepdog", "vxhs", "curl",
    }
)  # fmt: skip
_PASSTHROUGH_DRIVERS = frozenset(
    {
        "nvme", "nvme-io_uring", "virtio-blk-vfio-pci", "virtio-blk-vhost-user",
        "virtio-blk-vhost-vdpa", "vhost-user-blk", "vdpa",
    }
)  # fmt: skip
_NO_STORAGE_DRIVERS = frozenset({"null-co", "null-aio"})
# Child links of format and filter drivers; "backing" is handled apart (read-only).
CHILD_KEYS = ("file", "data-file", "image", "test", "raw", "target", "log", "children")
_REF_KEYS = (*CHILD_KEYS, "backing")
IMPLICIT_BACKING = frozenset({"qcow2", "qed", "vmdk", "qcow"})
PROBE_BACKING, PROBE_DATA = 1, 2  # what a file's header may name (start/chains.py reads it)
# Devices that never write their medium (scsi-block, a LUN, passes writes through).
CD_DEVICES = frozenset({"ide-cd", "scsi-cd", "usb-cd"})
_PROTOCOL_PREFIXES = {
    "nbd+tcp": "nbd", "nbd+unix": "nbd", "nbds": "nbd", "gluster+tcp": "gluster",
    "gluster+unix": "gluster", "gluster+rdma": "gluster", "fat": "vvfat",
}  # fmt: skip


def _protocol(filename: str) -> tuple[str | None, str]:
    """QEMU's path_has_protocol: a ':' before any '/' names a protocol."""
    for idx, ch in enumerate(filename):
        if ch == "/":
            return None, filename
        if ch == ":":
            return filename[:idx], filename[idx + 1 :]
    return None, filename


class _Root:
    """A block tree QEMU attaches: a -drive, or a -blockdev graph root."""

    __slots__ = ("cd", "ids", "node", "origin", "share", "writable")

    def __init__(self, origin: str, node: object, writable: bool, ids: tuple[str, ...]) -> None:
        self.origin = origin
        self.node = node
        self.writable = writable
        self.ids = ids
        self.cd = False
        self.share = False


class Graph:
    """What the argv walk collected; :meth:`build` turns it into disks."""

    def __init__(self) -> None:
        self.drives: list[tuple[str, dict[str, Any], str]] = []  # origin, opts, default if=
        self.blockdevs: list[tuple[str, dict[str, Any]]] = []
        self.devices: list[dict[str, Any]] = []
        self.sets: list[tuple[str, str, str]] = []  # -set group.id.key=value
        self.fdsets: dict[str, list[str]] = {}
        self.snapshot = False
        self.disks: list[DiskRef] = []
        self.skipped: list[Skipped] = []
        self.names: dict[str, dict[str, Any]] = {}
        self.visited: set[str] = set()
        # QEMU's own locking=off on a file node: lock it anyway only when told to
        # (config honor_locking_off = false); README "QEMU's locking=off".
        self.honor_locking_off = True

    def build(self) -> None:
        """Walk every root down to the files QEMU opens (into disks, skipped)."""
        drive_roots = self._drive_roots()
        self.names = self._node_names([r.node for r in drive_roots])
        roots = drive_roots + self._blockdev_roots()
        by_id: dict[str, list[_Root]] = {}
        for root in roots:
            for ident in root.ids:
                by_id.setdefault(ident, []).append(root)
        for dev in self.devices:
            drive = dev.get("drive")
            if not isinstance(drive, str):
                continue
            targets = by_id.get(drive)
            if targets is None:
                # Attaching a non-root node (e.g. a backing node) walks it as its own tree.
                node = self.names.get(drive)
                if node is None:
                    continue
                targets = [_Root(f"-device drive={drive}", drive, not _ro(node, "-device"), ())]
                roots.extend(targets)
            for root in targets:
                if as_bool(dev.get("share-rw", False), "-device", "share-rw"):
                    root.share = True
                if dev.get("driver") in CD_DEVICES:
                    root.cd = True
        for root in roots:
            writable = root.writable and not root.cd
            role = SHAREABLE if root.share else WRITABLE
            self._walk(root.origin, root.node, writable, role, probe=0, seen=())
        # Nodes no root reaches can only sit in a reference cycle (QEMU itself
        # would refuse them); walking one raises the error instead of skipping it.
        for name, node in self.names.items():
            if name not in self.visited:
                self._walk("-blockdev", name, not _ro(node, "-blockdev"), WRITABLE, False, ())

    def _apply_sets(self, group: str, opts: dict[str, Any], option: str) -> dict[str, Any]:
        ident = opts.get("id")
        extra = [kv for g, i, kv in self.sets if g == group and i == ident]
        if not extra:
            return opts
        merged = dict(opts)
        merged.update(nest([tuple(kv.split("=", 1)) for kv in extra], option))  # type: ignore[misc]
        return merged

    def _drive_roots(self) -> list[_Root]:
        roots: list[_Root] = []
        for origin, raw, _default_if in self.drives:
            opts = self._apply_sets("drive", raw, "-drive")
            media = opts.get("media", "disk")
            readonly = as_bool(opts.get("readonly", False), "-drive", "readonly")
            snapshot = as_bool(opts.get("snapshot", self.snapshot), "-drive", "snapshot")
            node = self._drive_node(origin, opts)
            if node is None:
                continue
            ids = tuple(v for v in (opts.get("id"), opts.get("node-name")) if isinstance(v, str))
            root = _Root(origin, node, not (readonly or snapshot or media == "cdrom"), ids)
            roots.append(root)
        return roots

    def _drive_node(self, origin: str, opts: dict[str, Any]) -> dict[str, Any] | None:
        """The block tree of one -drive: a format layer over a protocol leaf."""
        drive_keys = {"if", "media", "readonly", "snapshot", "index", "bus", "unit", "id", "serial",
                      "addr", "werror", "rerror", "copy-on-read", "boot", "trans", "cyls", "heads",
                      "secs", "format"}  # fmt: skip
        node = {k: v for k, v in opts.items() if k not in drive_keys}
        if "format" in opts and "driver" not in node:
            node["driver"] = opts["format"]
        file = node.get("file")
        if isinstance(file, str) and file.startswith("json:"):
            inner = load_json(file[5:], origin)
            node.pop("file")
            inner.update({k: v for k, v in node.items() if k not in inner})
            return inner
        if isinstance(file, str):
            node["file"] = self._leaf_from_filename(file)
            if not node["file"]:
                self.skipped.append(Skipped(origin, "no medium"))
                return None
        elif file is None and "filename" not in node and not _has_child(node):
            if node.get("driver") in _NETWORK_DRIVERS | _PASSTHROUGH_DRIVERS:
                return node
            self.skipped.append(Skipped(origin, "no medium"))
            return None
        if "driver" not in node:
            node["driver"] = "(probed)"
        return node

    def _leaf_from_filename(self, filename: str) -> dict[str, Any]:
        return _leaf_from_filename(filename)

    def _blockdev_roots(self) -> list[_Root]:
        referenced: set[str] = set()
        for _origin, node in self.blockdevs:
            _collect_refs(node, referenced)
        roots = []
        for origin, node in self.blockdevs:
            name = node.get("node-name")
            if not isinstance(name, str) or not name:
                raise ArgumentError("-blockdev", f"{origin[10:]}: needs a node-name")
            if name not in referenced:
                roots.append(_Root(origin, name, not _ro(node, "-blockdev"), (name,)))
        return roots

    def _node_names(self, drive_nodes: list[object]) -> dict[str, dict[str, Any]]:
        """Every node-name, inline ones too: ``file.node-name=f`` names a node that a
        later ``-blockdev ...,file=f`` may use, as in QEMU."""
        names: dict[str, dict[str, Any]] = {}
        for node in [n for _o, n in self.blockdevs] + drive_nodes:
            _inline_names(node, names)
        return names

    def _walk(
        self, origin: str, node: object, writable: bool, role: str, probe: int,
        seen: tuple[str, ...], nolock: str = "", protocol: bool = False,
    ) -> None:  # fmt: skip
        if node is None:
            return
        if isinstance(node, str):
            if node in seen:
                raise ArgumentError("-blockdev", f"node '{node}' refers to itself")
            target = self.names.get(node)
            if target is None:
                raise ArgumentError("-blockdev", f"no node named '{node}'")
            origin = f"-blockdev {node}"
            seen = seen + (node,)
            self.visited.add(node)
            node = target
        if not isinstance(node, dict):
            raise ArgumentError(origin, f"block node must be an object, not {node!r}")
        if isinstance(node.get("node-name"), str):
            self.visited.add(node["node-name"])  # an inline node with a name
        if "driver" not in node:
            node = _driverless(node, origin, protocol)
        driver = node.get("driver")
        writable = writable and not _ro(node, origin)
        if as_bool(node.get("force-share", False), origin, "force-share"):
            if writable:
                raise ArgumentError(origin, "force-share=on can only be used with read-only images")
            # QEMU passes force-share down to every child: the whole tree is read
            # without its locks, beside any writer (like qemu-img -U).
            nolock = "force-share=on: read without a lock, writers allowed (as QEMU does)"
        if driver in FILE_DRIVERS:
            self._leaf(origin, node, writable, role, probe, nolock)
            return
        if driver == "(json)":
            inner = load_json(str(node["json"]), origin)
            self._walk(origin, inner, writable, role, probe, seen, nolock)
            return
        if driver in _NETWORK_DRIVERS:
            self.skipped.append(Skipped(origin, f"network disk ({driver}): not a local file"))
            return
        if driver in _PASSTHROUGH_DRIVERS:
            self.skipped.append(Skipped(origin, f"{driver}: device passthrough, no image file"))
            return
        if driver in _NO_STORAGE_DRIVERS:
            self.skipped.append(Skipped(origin, f"{driver}: no storage"))
            return
        if driver == "vvfat":
            self.skipped.append(Skipped(origin, "vvfat: a directory, not an image"))
            return
        if not isinstance(driver, str):
            raise ArgumentError(origin, "block node has no driver")
        found = False
        backing = node.get("backing")
        # Options for the chain the header names (backing.node-name=x; QEMU's iotests write
        # backing.backing.node-name=base): no image, and the names there are no roots.
        header_backing = isinstance(backing, dict) and "driver" not in backing and not (
            "filename" in backing or _has_child(backing))  # fmt: skip
        if header_backing and isinstance(backing, dict):
            self.visited.update(_inline_names(backing, {}))
        # A qcow2 node without "backing" opens the backing file named in its header.
        # Bits of what the header may make QEMU open besides the file itself.
        child_probe = (PROBE_BACKING if ("backing" not in node or header_backing) and (
            driver in IMPLICIT_BACKING or driver == "(probed)") else 0) | (
            PROBE_DATA if "data-file" not in node and driver in ("qcow2", "(probed)") else 0
        )  # fmt: skip
        for key in CHILD_KEYS:
            child = node.get(key)
            if child is None:
                continue
            found = True
            children = child.values() if key == "children" and isinstance(child, dict) else (
                child if key == "children" and isinstance(child, list) else [child])  # fmt: skip
            for c in children:
                probe_c = child_probe if key == "file" else 0
                self._walk(origin, c, writable, role, probe_c, seen, nolock, key == "file")
        if backing is not None and not header_backing:
            found = True
            self._walk(origin, backing, False, BACKING, 0, seen, nolock)
        if not found:
            if "filename" in node:
                why = f"unknown block driver '{driver}'"
                self.skipped.append(Skipped(origin, why, unknown=True))
            else:
                self.skipped.append(Skipped(origin, f"'{driver}' node has no image file"))

    def _leaf(
        self, origin: str, node: dict[str, Any], writable: bool, role: str, probe: int,
        nolock: str,
    ) -> None:  # fmt: skip
        filename = node.get("filename")
        if not isinstance(filename, str) or not filename:
            raise ArgumentError(origin, f"'{node.get('driver')}' node needs a filename")
        named = "" if filename.startswith("/dev/fdset/") else filename
        if nolock:
            self.skipped.append(Skipped(origin, nolock, path=named))
            return
        if self.honor_locking_off and node.get("locking") in ("off", False):
            why = "locking=off: QEMU locks nothing here (config honor_locking_off)"
            self.skipped.append(Skipped(origin, why, path=named, writes=True))
            return
        paths = [filename]
        if filename.startswith("/dev/fdset/"):
            fds = self.fdsets.get(filename[len("/dev/fdset/") :])
            if not fds:
                raise ArgumentError(origin, f"{filename}: no -add-fd for that set")
            paths = [f"/proc/self/fd/{fd}" for fd in fds]
        if role == BACKING:
            mode, role_out = SHARED, BACKING
        elif not writable:
            mode, role_out = SHARED, READONLY
        elif role == SHAREABLE:
            mode, role_out = SHARED, SHAREABLE
        else:
            mode, role_out = EXCLUSIVE, WRITABLE
        for path in paths:
            self.disks.append(DiskRef(path, mode, origin, role_out, bool(probe & PROBE_BACKING),
                                      bool(probe & PROBE_DATA)))  # fmt: skip


def _ro(node: dict[str, Any], origin: str) -> bool:
    return as_bool(node.get("read-only", False), origin, "read-only")


def _collect_refs(node: object, out: set[str]) -> None:
    """Every node-name a block node refers to, inline children included."""
    if not isinstance(node, dict):
        return
    for key in _REF_KEYS:
        child = node.get(key)
        if child is None:
            continue
        if isinstance(child, str):
            out.add(child)
            continue
        items = child.values() if isinstance(child, dict) and key == "children" else (
            child if isinstance(child, list) else (child,))  # fmt: skip
        for c in items:
            if isinstance(c, str):
                out.add(c)
            else:
                _collect_refs(c, out)


def _leaf_from_filename(filename: str) -> dict[str, Any]:
    if not filename:
        return {}
    proto, rest = _protocol(filename)
    if proto is None:
        return {"driver": "file", "filename": filename}
    if proto in FILE_DRIVERS:
        return {"driver": proto, "filename": rest}
    if proto == "json":
        return {"driver": "(json)", "json": rest}
    return {"driver": _PROTOCOL_PREFIXES.get(proto, proto), "filename": filename}


def _has_child(node: dict[str, Any]) -> bool:
    return any(key in node for key in CHILD_KEYS)


def _driverless(node: dict[str, Any], origin: str, protocol: bool) -> dict[str, Any]:
    """A node given without a driver, as QEMU opens it: with child nodes, a format
    QEMU probes; with a filename, the protocol its prefix names (else a file), under
    a probed format unless it is a format's ``file`` child (a protocol node)."""
    if _has_child(node):
        return {**node, "driver": "(probed)"}
    filename = node.get("filename")
    if not isinstance(filename, str):
        raise ArgumentError(origin, "block node has no driver")
    leaf = {**node, **_leaf_from_filename(filename)}
    if protocol or leaf.get("driver") not in FILE_DRIVERS:
        return leaf
    return {"driver": "(probed)", "file": leaf}


def _inline_names(node: object, names: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    if not isinstance(node, dict):
        return names
    name = node.get("node-name")
    if isinstance(name, str):
        if name in names:
            raise ArgumentError("-blockdev", f"node-name '{name}' defined twice")
        names[name] = node
    for key in _REF_KEYS:
        child = node.get(key)
        items = child.values() if isinstance(child, dict) and key == "children" else (
            child if isinstance(child, list) else (child,))  # fmt: skip
        for c in items:
            _inline_names(c, names)
    return names
