"""The block graph the monitor guard follows while QEMU runs.

Nodes come from the command line (``-blockdev``) and from ``blockdev-add``;
devices from ``-device`` and ``device_add``.  Only what the lock policy needs
is kept: which protocol nodes open which file, which nodes are children of
which (``file``, ``data-file``... and apart from them ``backing``), which are
read-only, and which devices (of which kind) use which node.
"""

from __future__ import annotations

# The start path's own definitions, so that a disk hot-plugged is locked as the
# same disk on the command line is.
from qemu_locked.parse.blockgraph import CD_DEVICES, CHILD_KEYS, FILE_DRIVERS
from qemu_locked.parse.keyval import TRUE

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_MAX_NODES = 4096  # a bound on what a (misbehaving) client can make us keep
_MAX_DEPTH = 32


def truthy(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return isinstance(value, str) and value.lower() in TRUE


class Node:
    __slots__ = (
        "auto_ro",
        "children",
        "driver",
        "filename",
        "has_backing_key",
        "has_data_key",
        "name",
        "read_only",
    )

    def __init__(self, name: str, driver: str, read_only: bool, auto_ro: bool) -> None:
        self.name = name
        self.driver = driver
        self.read_only = read_only
        self.auto_ro = auto_ro
        self.filename: str | None = None
        self.children: list[str] = []
        self.has_backing_key = False
        self.has_data_key = False  # "data-file" given: QEMU reads no name from the header

    @property
    def protocol(self) -> bool:
        return self.driver in FILE_DRIVERS and self.filename is not None


class Device:
    __slots__ = ("drive", "driver")

    def __init__(self, driver: str, drive: str | None) -> None:
        self.driver = driver
        self.drive = drive

    @property
    def cd(self) -> bool:
        return self.driver in CD_DEVICES


class Graph:
    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.devices: dict[str, Device] = {}
        self._anon = 0

    def parse(self, args: dict[str, Any]) -> list[Node]:
        """The nodes one ``blockdev-add`` (or ``-blockdev``) describes, inline
        children flattened; not yet part of the graph (see :meth:`commit`)."""
        out: list[Node] = []
        self._parse(args, out, False, 0)
        return out

    def _parse(self, args: dict[str, Any], out: list[Node], ro_parent: bool, depth: int) -> str:
        if depth > _MAX_DEPTH or len(out) > _MAX_NODES:
            raise ValueError("block graph nested too deeply")
        name = args.get("node-name")
        if not isinstance(name, str):
            self._anon += 1
            name = f"#guard-anon-{self._anon}"
        driver = str(args.get("driver", ""))
        ro = truthy(args.get("read-only", False)) or ro_parent
        node = Node(name, driver, ro, truthy(args.get("auto-read-only", False)))
        out.append(node)
        fname = args.get("filename")
        if isinstance(fname, str):
            node.filename = fname
        for key in CHILD_KEYS:
            self._link(node, args.get(key), out, ro, depth, node.children)
        node.has_data_key = "data-file" in args
        if "backing" in args:
            node.has_backing_key = True
            # inline backing nodes are parsed (read-only); their files are locked
            # apart from the children's, shared
            self._link(node, args["backing"], out, True, depth, [])
        return name

    def _link(self, node: Node, value: object, out: list[Node], ro: bool, depth: int,
              into: list[str]) -> None:  # fmt: skip
        if isinstance(value, str):
            into.append(value)
        elif isinstance(value, dict):
            into.append(self._parse(value, out, ro, depth + 1))
        elif isinstance(value, list):
            for item in value[:_MAX_NODES]:
                self._link(node, item, out, ro, depth, into)

    def commit(self, nodes: list[Node]) -> None:
        for node in nodes:
            if len(self.nodes) < _MAX_NODES or node.name in self.nodes:
                self.nodes[node.name] = node

    def files_under(self, name: str) -> list[Node]:
        """Protocol nodes reached from ``name`` through child links, ``name``
        itself included (backing files are locked apart, shared)."""
        seen: set[str] = set()
        out: list[Node] = []
        todo = [name]
        while todo and len(seen) < _MAX_NODES:
            cur = todo.pop()
            if cur in seen:
                continue
            seen.add(cur)
            node = self.nodes.get(cur)
            if node is None:
                continue
            if node.protocol:
                out.append(node)
            todo.extend(node.children)
        return out

    def writable(self, name: str) -> bool:
        node = self.nodes.get(name)
        return node is not None and not node.read_only

    def add_device(self, args: dict[str, Any]) -> Device | None:
        dev_id = args.get("id")
        if not isinstance(dev_id, str):
            return None
        drive = args.get("drive")
        dev = Device(str(args.get("driver", "")), drive if isinstance(drive, str) else None)
        if len(self.devices) < _MAX_NODES:
            self.devices[dev_id] = dev
        return dev
