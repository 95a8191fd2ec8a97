"""QEMU argv -> Plan.  Pure: no file is touched (``-readconfig`` content comes
through the ``read_config`` callback).

The model follows QEMU's own: every ``-drive``/``-hda``/positional image is a
block tree whose top is writable unless it says otherwise; every
``-blockdev`` is a node, linked to others by node-name (``file``,
``backing``, ``data-file``...).  Roots of the node graph, and nodes that a
``-device`` attaches, are walked down to the protocol leaves (``file``,
``host_device``, ``host_cdrom``), which are the paths QEMU opens.
"""

from __future__ import annotations

from qemu_locked import _json
from qemu_locked.errors import ArgumentError
from qemu_locked.model import (
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

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    ReadConfig = Callable[[str], str]

# QEMU 7.2 options that consume the next argument (qemu-options.hx HAS_ARG,
# plus older spellings still seen in scripts).  An option we do not know is
# taken to have no value, as QEMU itself would reject it.
ARG_OPTIONS = frozenset(
    [
        "accel",
        "acpitable",
        "action",
        "add-fd",
        "append",
        "async-teardown",
        "audio",
        "audiodev",
        "balloon",
        "bios",
        "blockdev",
        "boot",
        "cdrom",
        "chardev",
        "chroot",
        "compat",
        "cpu",
        "D",
        "d",
        "debugcon",
        "device",
        "dfilter",
        "display",
        "drive",
        "dtb",
        "dump-vmstate",
        "echr",
        "fda",
        "fdb",
        "fsdev",
        "fw_cfg",
        "g",
        "gdb",
        "global",
        "hda",
        "hdb",
        "hdc",
        "hdd",
        "icount",
        "incoming",
        "initrd",
        "iscsi",
        "k",
        "kernel",
        "L",
        "loadvm",
        "M",
        "m",
        "machine",
        "mem-path",
        "mon",
        "monitor",
        "msg",
        "mtdblock",
        "name",
        "net",
        "netdev",
        "nic",
        "numa",
        "object",
        "option-rom",
        "overcommit",
        "parallel",
        "pflash",
        "pidfile",
        "plugin",
        "prom-env",
        "qmp",
        "qmp-pretty",
        "qtest",
        "qtest-log",
        "readconfig",
        "rotate",
        "rtc",
        "runas",
        "sandbox",
        "sd",
        "seed",
        "semihosting-config",
        "serial",
        "set",
        "smbios",
        "smp",
        "soundhw",
        "spice",
        "tb-size",
        "tpmdev",
        "trace",
        "usbdevice",
        "uuid",
        "vga",
        "virtfs",
        "vnc",
        "watchdog",
        "watchdog-action",
        "xen-domid",
    ]
)

# Image options: (if=, media=) they stand for.
_IMAGE_OPTIONS = {
    "hda": ("ide", "disk"),
    "hdb": ("ide", "disk"),
    "hdc": ("ide", "disk"),
    "hdd": ("ide", "disk"),
    "cdrom": ("ide", "cdrom"),
    "fda": ("floppy", "disk"),
    "fdb": ("floppy", "disk"),
    "pflash": ("pflash", "disk"),
    "sd": ("sd", "disk"),
    "mtdblock": ("mtd", "disk"),
}

_FILE_DRIVERS = frozenset({"file", "host_device", "host_cdrom"})
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
_CHILD_KEYS = ("file", "data-file", "image", "test", "raw", "target", "log", "children")
_REF_KEYS = (*_CHILD_KEYS, "backing")
_IMPLICIT_BACKING = frozenset({"qcow2", "qed", "vmdk", "qcow"})
_CD_DEVICES = frozenset({"ide-cd", "scsi-cd", "usb-cd"})
_PROTOCOL_PREFIXES = {
    "nbd+tcp": "nbd", "nbd+unix": "nbd", "nbds": "nbd", "gluster+tcp": "gluster",
    "gluster+unix": "gluster", "gluster+rdma": "gluster", "fat": "vvfat",
}  # fmt: skip

_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})


def split_opts(text: str, implied: str | None = None) -> list[tuple[str, str]]:
    """QemuOpts/keyval ``a=b,c=d`` with ``,,`` for a literal comma.

    A bare first item is the ``implied`` key's value; any other bare item is
    a flag (``readonly`` means ``readonly=on``), as in QEMU.
    """
    items: list[str] = []
    buf: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == ",":
            if i + 1 < n and text[i + 1] == ",":
                buf.append(",")
                i += 2
                continue
            items.append("".join(buf))
            buf = []
        else:
            buf.append(c)
        i += 1
    items.append("".join(buf))
    out: list[tuple[str, str]] = []
    for idx, item in enumerate(items):
        key, eq, value = item.partition("=")
        if eq:
            out.append((key, value))
        elif idx == 0 and implied is not None:
            out.append((implied, item))
        elif item:
            out.append((item, "on"))
    return out


def _nest(pairs: list[tuple[str, str]], option: str) -> dict[str, Any]:
    """Dotted keys (``file.filename=x``) into nested dicts, as keyval does."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = key.split(".")
        node = root
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ArgumentError(option, f"'{part}' is both a value and an object")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise ArgumentError(option, f"'{key}' is both a value and an object")
        node[parts[-1]] = value
    return root


def _as_bool(value: object, option: str, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise ArgumentError(option, f"{key}={value!r} is not on/off")


def _load_json(text: str, option: str) -> dict[str, Any]:
    try:
        value = _json.loads(text)
    except ValueError as exc:
        raise ArgumentError(option, f"bad JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ArgumentError(option, "JSON must be an object")
    return value


def _dict_or_opts(text: str, option: str, implied: str | None) -> dict[str, Any]:
    if text.lstrip().startswith("{"):
        return _load_json(text, option)
    return _nest(split_opts(text, implied), option)


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


class _Parser:
    def __init__(self, read_config: ReadConfig | None) -> None:
        self.read_config = read_config
        self.drives: list[tuple[str, dict[str, Any], str]] = []  # origin, opts, default if=
        self.blockdevs: list[tuple[str, dict[str, Any]]] = []
        self.devices: list[dict[str, Any]] = []
        self.sets: list[tuple[str, str, str]] = []  # -set group.id.key=value
        self.fdsets: dict[str, list[str]] = {}
        self.snapshot = False
        self.daemonize = False
        self.guest: str | None = None
        self.uuid: str | None = None
        self.incoming: str | None = None
        self.disks: list[DiskRef] = []
        self.skipped: list[Skipped] = []
        self.readconfig_depth = 0
        self.names: dict[str, dict[str, Any]] = {}
        self.visited: set[str] = set()

    # -- argv walk ---------------------------------------------------------

    def parse(self, args: Sequence[str]) -> None:
        i, n = 0, len(args)
        while i < n:
            arg = args[i]
            if not arg.startswith("-") or arg in ("-", "--"):
                if arg.startswith("-"):
                    i += 1
                    continue
                # A bare argument is an image for the first IDE disk.
                self._image(f"image argument #{i + 1}", arg, "ide", "disk")
                i += 1
                continue
            name = arg[2:] if arg.startswith("--") else arg[1:]
            if name not in ARG_OPTIONS:
                if name == "snapshot":
                    self.snapshot = True
                elif name == "daemonize":
                    self.daemonize = True
                i += 1
                continue
            if i + 1 >= n:
                raise ArgumentError(arg, "missing its value (last argument)")
            self._option(arg, name, args[i + 1])
            i += 2

    def _option(self, arg: str, name: str, value: str) -> None:
        if name == "drive":
            self.drives.append((f"{arg} {value}", _nest(split_opts(value), arg), "ide"))
        elif name == "blockdev":
            self.blockdevs.append((f"{arg} {value}", _dict_or_opts(value, arg, None)))
        elif name == "device":
            self.devices.append(_dict_or_opts(value, arg, "driver"))
        elif name in _IMAGE_OPTIONS:
            if_, media = _IMAGE_OPTIONS[name]
            self._image(f"{arg} {value}", value, if_, media)
        elif name == "add-fd":
            opts = dict(split_opts(value))
            if "fd" not in opts or "set" not in opts:
                raise ArgumentError(arg, "needs fd= and set=")
            self.fdsets.setdefault(opts["set"], []).append(opts["fd"])
        elif name == "name":
            self.guest = dict(split_opts(value, "guest")).get("guest") or self.guest
        elif name == "uuid":
            self.uuid = value
        elif name == "incoming":
            self.incoming = value
        elif name == "set":
            self._set(arg, value)
        elif name == "readconfig":
            self._readconfig(arg, value)

    def _image(self, origin: str, filename: str, if_: str, media: str) -> None:
        if not filename:
            self.skipped.append(Skipped(origin, "no medium"))
            return
        self.drives.append((origin, {"file": filename, "media": media}, if_))

    def _set(self, arg: str, value: str) -> None:
        target, eq, val = value.partition("=")
        parts = target.split(".", 2)
        if not eq or len(parts) != 3:
            raise ArgumentError(arg, f"'{value}' is not group.id.key=value")
        self.sets.append((parts[0], parts[1], parts[2] + "=" + val))

    def _readconfig(self, arg: str, path: str) -> None:
        if self.read_config is None:
            self.skipped.append(Skipped(f"{arg} {path}", "config file not read here"))
            return
        self.readconfig_depth += 1
        if self.readconfig_depth > 16:
            raise ArgumentError(arg, "more than 16 -readconfig files")
        text = self.read_config(path)
        group: str | None = None
        opts: list[tuple[str, str]] = []

        def flush() -> None:
            if group == "drive":
                self.drives.append((f"{arg} {path} [drive]", _nest(opts, arg), "ide"))
            elif group == "device":
                self.devices.append(_nest(opts, arg))

        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("[") and line.endswith("]"):
                flush()
                head = line[1:-1].split(None, 1)
                if not head:
                    raise ArgumentError(arg, f"{path}:{lineno}: empty group")
                group, opts = head[0], []
                if len(head) > 1:
                    ident = head[1].strip()
                    if len(ident) < 2 or ident[0] != '"' or ident[-1] != '"':
                        raise ArgumentError(arg, f"{path}:{lineno}: bad group id")
                    opts.append(("id", ident[1:-1]))
                continue
            key, eq, val = line.partition("=")
            val = val.strip()
            if not eq or group is None or len(val) < 2 or val[0] != '"' or val[-1] != '"':
                raise ArgumentError(arg, f"{path}:{lineno}: parse error")
            opts.append((key.strip(), val[1:-1]))
        flush()

    # -- build the plan ----------------------------------------------------

    def plan(self) -> Plan:
        self.names = self._node_names()
        roots = self._drive_roots() + self._blockdev_roots()
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
                if _as_bool(dev.get("share-rw", False), "-device", "share-rw"):
                    root.share = True
                if dev.get("driver") in _CD_DEVICES:
                    root.cd = True
        for root in roots:
            writable = root.writable and not root.cd
            role = SHAREABLE if root.share else WRITABLE
            self._walk(root.origin, root.node, writable, role, probe=False, seen=())
        # Nodes no root reaches can only sit in a reference cycle (QEMU itself
        # would refuse them); walking one raises the error instead of skipping it.
        for name, node in self.names.items():
            if name not in self.visited:
                self._walk("-blockdev", name, not _ro(node, "-blockdev"), WRITABLE, False, ())
        return Plan(
            disks=merge_by_path(self.disks),
            skipped=tuple(self.skipped),
            guest=self.guest,
            uuid=self.uuid,
            incoming=self.incoming,
            daemonize=self.daemonize,
        )

    def _apply_sets(self, group: str, opts: dict[str, Any], option: str) -> dict[str, Any]:
        ident = opts.get("id")
        extra = [kv for g, i, kv in self.sets if g == group and i == ident]
        if not extra:
            return opts
        merged = dict(opts)
        merged.update(_nest([tuple(kv.split("=", 1)) for kv in extra], option))  # type: ignore[misc]
        return merged

    def _drive_roots(self) -> list[_Root]:
        roots: list[_Root] = []
        for origin, raw, _default_if in self.drives:
            opts = self._apply_sets("drive", raw, "-drive")
            media = opts.get("media", "disk")
            readonly = _as_bool(opts.get("readonly", False), "-drive", "readonly")
            snapshot = _as_bool(opts.get("snapshot", self.snapshot), "-drive", "snapshot")
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
            inner = _load_json(file[5:], origin)
            node.pop("file")
            inner.update({k: v for k, v in node.items() if k not in inner})
            return inner
        if isinstance(file, str):
            node["file"] = self._leaf_from_filename(file)
            if not node["file"]:
                self.skipped.append(Skipped(origin, "no medium"))
                return None
        elif file is None and "filename" not in node:
            if node.get("driver") in _NETWORK_DRIVERS | _PASSTHROUGH_DRIVERS:
                return node
            self.skipped.append(Skipped(origin, "no medium"))
            return None
        if "driver" not in node:
            node["driver"] = "(probed)"
        return node

    def _leaf_from_filename(self, filename: str) -> dict[str, Any]:
        if not filename:
            return {}
        proto, rest = _protocol(filename)
        if proto is None:
            return {"driver": "file", "filename": filename}
        if proto in _FILE_DRIVERS:
            return {"driver": proto, "filename": rest}
        if proto == "json":
            return {"driver": "(json)", "json": rest}
        return {"driver": _PROTOCOL_PREFIXES.get(proto, proto), "filename": filename}

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

    def _node_names(self) -> dict[str, dict[str, Any]]:
        names: dict[str, dict[str, Any]] = {}
        for _origin, node in self.blockdevs:
            name = node.get("node-name")
            if isinstance(name, str):
                if name in names:
                    raise ArgumentError("-blockdev", f"node-name '{name}' defined twice")
                names[name] = node
        return names

    def _walk(
        self, origin: str, node: object, writable: bool, role: str, probe: bool,
        seen: tuple[str, ...],
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
        driver = node.get("driver")
        writable = writable and not _ro(node, origin)
        if driver in _FILE_DRIVERS:
            self._leaf(origin, node, writable, role, probe)
            return
        if driver == "(json)":
            inner = _load_json(str(node["json"]), origin)
            self._walk(origin, inner, writable, role, probe, seen)
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
        # A qcow2 node without "backing" opens the backing file named in its header.
        child_probe = "backing" not in node and (
            driver in _IMPLICIT_BACKING or driver == "(probed)"
        )
        for key in _CHILD_KEYS:
            child = node.get(key)
            if child is None:
                continue
            found = True
            children = child.values() if key == "children" and isinstance(child, dict) else (
                child if key == "children" and isinstance(child, list) else [child])  # fmt: skip
            for c in children:
                self._walk(origin, c, writable, role, child_probe and key == "file", seen)
        backing = node.get("backing")
        if backing is not None:
            found = True
            self._walk(origin, backing, False, BACKING, False, seen)
        if not found:
            if "filename" in node:
                self.skipped.append(Skipped(origin, f"unknown block driver '{driver}'"))
            else:
                self.skipped.append(Skipped(origin, f"'{driver}' node has no image file"))

    def _leaf(
        self, origin: str, node: dict[str, Any], writable: bool, role: str, probe: bool
    ) -> None:
        filename = node.get("filename")
        if not isinstance(filename, str) or not filename:
            raise ArgumentError(origin, f"'{node.get('driver')}' node needs a filename")
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
            self.disks.append(DiskRef(path, mode, origin, role_out, probe))


def _ro(node: dict[str, Any], origin: str) -> bool:
    return _as_bool(node.get("read-only", False), origin, "read-only")


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


def parse_argv(args: Sequence[str], read_config: ReadConfig | None = None) -> Plan:
    """The lock plan for a QEMU command line (without the program name)."""
    p = _Parser(read_config)
    p.parse(args)
    return p.plan()
