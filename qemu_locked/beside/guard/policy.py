"""Which QMP commands need which locks, before QEMU sees them; what frees them.

DESIGN section 4's modes, applied at run time:
- a protocol node (``file``/``host_device``) is opened read-only at first
  (libvirt sets ``auto-read-only``): shared;
- a writable format node above it: exclusive; if another VM shares the disk,
  shared until a device attaches it (libvirt adds the nodes before the device
  says ``share-rw``), then exclusive unless the device is shareable or a cdrom;
- new snapshot overlays, mirror and backup targets, images being formatted by
  ``blockdev-create``: exclusive from the start; the old top of a snapshot is
  downgraded to shared once QEMU no longer writes it;
- media: shared on cdroms or with ``read-only-mode = read-only``.
A lock is released when no node, device or medium uses its file any more
(``blockdev-del``, ``DEVICE_DELETED`` of a drive that dies with its device,
eject, a failed add) *and* QEMU holds no fd on it (:mod:`locks`).
"""

from __future__ import annotations

import os

from qemu_locked.beside.guard import media
from qemu_locked.beside.guard.chain import header_files
from qemu_locked.beside.guard.nodes import Graph, Node, truthy
from qemu_locked.beside.locks import FD_NAME_PREFIX, Locks, Refused
from qemu_locked.model.plan import EXCLUSIVE, SHARED
from qemu_locked.parse.blockgraph import CD_DEVICES, IMPLICIT_BACKING

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from qemu_locked.beside.guard.view import After


def _args(obj: object) -> dict[str, Any]:
    return obj if isinstance(obj, dict) else {}


def _str(obj: object) -> str | None:
    return obj if isinstance(obj, str) else None


class Policy:
    def __init__(self, graph: Graph, locks: Locks) -> None:
        self.graph = graph
        self.locks = locks
        self.release_due: set[str] = set()
        self.downgrade_due: set[str] = set()
        self.legacy: set[str] = set()  # drives that die with their device (drive_add)
        self.media: dict[str, str] = {}  # device -> user name of its path-given medium
        self._serial = 0

    # -- the users of a lock ----------------------------------------------------------

    def _use(self, path: str, mode: str, user: str, origin: str, defer_ok: bool = False) -> None:
        lock = self.locks.want(path, mode, user, origin, defer_ok)
        if mode == EXCLUSIVE:
            self.downgrade_due.discard(lock.key)

    def _unuse(self, users: set[str]) -> None:
        for lock in list(self.locks.by_key.values()):
            if lock.nodes & users:
                lock.nodes -= users
                if not lock.nodes:
                    self.release_due.add(lock.key)

    def _files(self, name: str | None, extra: list[Node] | None = None) -> list[Node]:
        if name is None:
            return []
        if extra:
            saved = dict(self.graph.nodes)
            self.graph.commit(extra)
            try:
                return self.graph.files_under(name)
            finally:
                self.graph.nodes = saved
        return self.graph.files_under(name)

    # -- commands ---------------------------------------------------------------------

    def before(self, cmd: str, args: dict[str, Any]) -> After | None:
        """Take what ``cmd`` needs (raises Refused); the returned callable gets
        whether QEMU said it succeeded."""
        handler = _HANDLERS.get(cmd)
        if handler is None:
            return None
        self._serial += 1
        tag = f"#cmd{self._serial}"
        self.locks.added.clear()
        try:
            return handler(self, args, tag)
        except Refused as exc:  # a command refused keeps nothing it took, whatever its users' names
            for key, user in self.locks.added:
                lock = self.locks.by_key.get(key)
                if lock is not None and user in lock.nodes:
                    lock.nodes.discard(user)
                    if not lock.nodes:
                        self.release_due.add(key)
            from qemu_locked.beside import audit

            held = self.locks
            audit.refused(held.config, held.plan, held.qemu_pid, exc.conflicts, cmd, exc.line)
            raise

    def _tagged(self, tag: str, on_ok: Callable[[], None] | None = None) -> After:
        """Users named ``tag`` are kept if the command succeeds, dropped if not."""

        def after(ok: bool) -> None:
            if ok:
                if on_ok is not None:
                    on_ok()
                self._rename(tag)
            else:
                self._unuse({tag})

        return after

    def _rename(self, tag: str) -> None:
        for lock in self.locks.by_key.values():
            if tag in lock.nodes:
                lock.nodes.discard(tag)
                lock.nodes.add(tag + "-kept")

    def blockdev_add(self, args: dict[str, Any], tag: str) -> After:
        try:
            new = self.graph.parse(args)
        except ValueError:
            raise Refused("qemu-locked: blockdev-add: block graph too deep to check") from None
        origin = f"blockdev-add {new[0].name if new else None}"
        fresh = [n for n in new if n.name not in self.graph.nodes]  # a duplicate name fails in QEMU
        names = {n.name for n in fresh} | {n.name + "#backing" for n in fresh}
        self._add_nodes(new, origin)

        def after(ok: bool) -> None:
            if ok:
                self.graph.commit(new)
            else:
                self._unuse(names)

        return after

    def _add_nodes(self, new: list[Node], origin: str) -> None:
        for node in new:
            if node.protocol:
                assert node.filename is not None
                mode = SHARED if node.read_only or node.auto_ro else EXCLUSIVE
                self._use(node.filename, mode, node.name, origin, defer_ok=True)
        for node in new:
            if node.protocol or node.read_only:
                continue
            for leaf in self._files(node.name, new):
                assert leaf.filename is not None
                self._use(leaf.filename, EXCLUSIVE, leaf.name, origin, defer_ok=True)
            implicit = node.driver in IMPLICIT_BACKING and not node.has_backing_key
            if implicit or (node.driver == "qcow2" and not node.has_data_key):
                for leaf in self._files(node.name, new):
                    assert leaf.filename is not None
                    header_files(self, leaf.filename, EXCLUSIVE, node.name + "#backing", origin,
                                backing=implicit, defer_ok=True)  # fmt: skip

    def block_commit(self, args: dict[str, Any], tag: str) -> After:
        """A commit writes into its base, which was a read-only backing file."""
        base = _str(args.get("base-node"))
        if base is not None:
            self._writer(base, tag, f"block-commit into {base}")
        elif _str(args.get("base")):
            self._use(str(args["base"]), EXCLUSIVE, tag, "block-commit base")
        return self._tagged(tag)

    def blockdev_del(self, args: dict[str, Any], tag: str) -> After:
        name = _str(args.get("node-name"))

        def after(ok: bool) -> None:
            if ok and name is not None:
                self.graph.nodes.pop(name, None)
                self._unuse({name, name + "#backing"})

        return after

    def _writer(self, name: str | None, tag: str, origin: str) -> None:
        """Everything under node ``name`` must be exclusive now."""
        for leaf in self._files(name):
            assert leaf.filename is not None
            self._use(leaf.filename, EXCLUSIVE, leaf.name, origin)  # held while the node is

    def device_add(self, args: dict[str, Any], tag: str) -> After | None:
        drive = _str(args.get("drive"))
        if drive is None:
            return None
        dev_id = _str(args.get("id")) or drive
        share = truthy(args.get("share-rw", False))
        driver = str(args.get("driver", ""))
        origin = f"hot-plug {dev_id}"
        writer = not share and driver not in CD_DEVICES and self.graph.writable(drive)
        if writer:
            self._writer(drive, tag, origin)

        def on_ok() -> None:
            self.graph.add_device(args)
            self._named(drive, origin)
            for leaf in self._files(drive):
                lock = self.locks.by_key.get(self._key(leaf))
                if lock is not None and share and lock.mode == EXCLUSIVE:
                    self.locks.downgrade(lock)

        return self._tagged(tag, on_ok)

    def _named(self, node: str | None, origin: str) -> None:
        """What the files under ``node`` are for, now that a device uses them (a
        hot-plugged disk, a medium): no longer the ``blockdev-add`` that opened them."""
        for leaf in self._files(node):
            lock = self.locks.by_key.get(self._key(leaf))
            if lock is not None and not lock.start:
                lock.origin = origin

    def _key(self, leaf: Node) -> str:
        from qemu_locked.lock import safeopen

        try:
            return safeopen.identity_key(os.stat(leaf.filename or ""))
        except OSError:
            return ""

    def blockdev_create(self, args: dict[str, Any], tag: str) -> After:
        options = _args(args.get("options"))
        self._writer(_str(options.get("file")), tag, "blockdev-create")
        return self._tagged(tag)

    def blockdev_mirror(self, args: dict[str, Any], tag: str) -> After:
        self._writer(_str(args.get("target")), tag, "block copy target")
        return self._tagged(tag)

    def _new_image(self, path: str | None, tag: str, origin: str) -> Callable[[], None] | None:
        """A target named by path: locked now if it exists, else once QEMU made it."""
        if path is None:
            return None
        if os.path.exists(path):
            self._use(path, EXCLUSIVE, tag, origin)
            return None

        def made() -> None:
            try:
                self._use(path, EXCLUSIVE, tag, origin)
            except Refused as exc:
                from qemu_locked.beside.spawn import say

                say(exc.line.removeprefix("qemu-locked: ") + " (created by QEMU, locked too late)")

        return made

    def drive_mirror(self, args: dict[str, Any], tag: str) -> After:
        made = self._new_image(_str(args.get("target")), tag, "block copy target")
        return self._tagged(tag, made)

    def snapshot(self, args: dict[str, Any], tag: str) -> After:
        """blockdev-snapshot: the overlay takes over writing; the old top is read."""
        overlay, old = _str(args.get("overlay")), _str(args.get("node"))
        self._writer(overlay, tag, f"snapshot overlay {overlay}")
        return self._tagged(tag, lambda: self._old_top(old))

    def snapshot_sync(self, args: dict[str, Any], tag: str) -> After:
        path = _str(args.get("snapshot-file"))
        old = _str(args.get("node-name")) or _str(args.get("device"))
        made = self._new_image(path, tag, f"snapshot overlay {path}")

        def on_ok() -> None:
            if made is not None:
                made()
            self._old_top(old)

        return self._tagged(tag, on_ok)

    def _old_top(self, name: str | None) -> None:
        dev = self.graph.devices.get(name or "")
        if dev is not None:
            name = dev.drive
        for leaf in self._files(name):
            self.downgrade_due.add(self._key(leaf))

    def backup(self, args: dict[str, Any], tag: str) -> After:
        self._writer(_str(args.get("target")), tag, "backup target")
        return self._tagged(tag)

    def transaction(self, args: dict[str, Any], tag: str) -> After:
        afters: list[After] = []
        actions = args.get("actions")
        for action in actions[:256] if isinstance(actions, list) else []:
            act = _args(action)
            handler = _TX.get(str(act.get("type", "")))
            if handler is not None:
                afters.append(handler(self, _args(act.get("data")), tag))

        def after(ok: bool) -> None:
            for each in afters:
                each(ok)

        return after

    def reopen(self, args: dict[str, Any], tag: str) -> After:
        opts = args.get("options")
        changed: list[tuple[str, bool]] = []
        for item in opts[:256] if isinstance(opts, list) else []:
            node = _args(item)
            name = _str(node.get("node-name"))
            if name is None:
                continue
            ro = truthy(node.get("read-only", False))
            changed.append((name, ro))
            if not ro:
                self._writer(name, tag, f"blockdev-reopen {name}")

        def on_ok() -> None:
            for name, ro in changed:
                if name in self.graph.nodes:
                    self.graph.nodes[name].read_only = ro
                    if ro:
                        self._old_top(name)

        return self._tagged(tag, on_ok)

    def getfd(self, args: dict[str, Any], tag: str) -> None:
        name = _str(args.get("fdname")) or ""
        if name.startswith(FD_NAME_PREFIX):
            raise Refused(f"qemu-locked: fd names starting with {FD_NAME_PREFIX!r} are reserved "
                          "for the monitor guard's locks")  # fmt: skip

    def hmp(self, args: dict[str, Any], tag: str) -> After | None:
        from qemu_locked.beside.guard.hmp import hmp_command

        return hmp_command(self, _str(args.get("command-line")) or "", tag)

    # -- events and the sweep ---------------------------------------------------------

    def event(self, name: str, data: dict[str, Any]) -> None:
        """QEMU's word: only ever a reason to look again, never to release."""
        if name == "DEVICE_DELETED":
            dev_id = _str(data.get("device"))
            dev = self.graph.devices.pop(dev_id or "", None)
            if dev is not None and dev.drive in self.legacy:
                self.legacy.discard(dev.drive)
                self.graph.nodes.pop(dev.drive, None)
                self._unuse({dev.drive})

    def sweep(self) -> None:
        for key in list(self.release_due):
            lock = self.locks.by_key.get(key)
            if lock is None or lock.nodes:
                self.release_due.discard(key)
            elif not self.locks.qemu_uses(lock):
                self.locks.release(lock)
                self.release_due.discard(key)
        for key in list(self.downgrade_due):
            lock = self.locks.by_key.get(key)
            if lock is None or lock.mode != EXCLUSIVE:
                self.downgrade_due.discard(key)
            elif not self.locks.qemu_uses(lock, writable_only=True):
                self.locks.downgrade(lock)
                self.downgrade_due.discard(key)

    @property
    def due(self) -> bool:
        return bool(self.release_due or self.downgrade_due)


_HANDLERS: dict[str, Callable[[Policy, dict[str, Any], str], After | None]] = {
    "blockdev-add": Policy.blockdev_add,
    "blockdev-del": Policy.blockdev_del,
    "device_add": Policy.device_add,
    "blockdev-create": Policy.blockdev_create,
    "blockdev-mirror": Policy.blockdev_mirror,
    "block-commit": Policy.block_commit,
    "drive-mirror": Policy.drive_mirror,
    "blockdev-snapshot": Policy.snapshot,
    "blockdev-snapshot-sync": Policy.snapshot_sync,
    "blockdev-backup": Policy.backup,
    "drive-backup": Policy.drive_mirror,
    "transaction": Policy.transaction,
    "blockdev-reopen": Policy.reopen,
    "x-blockdev-reopen": Policy.reopen,
    "blockdev-change-medium": media.change_medium,
    "blockdev-insert-medium": media.insert_medium,
    "blockdev-remove-medium": media.remove_medium,
    "eject": media.remove_medium,
    "getfd": Policy.getfd,
    "closefd": Policy.getfd,
    "human-monitor-command": Policy.hmp,
}
_TX: dict[str, Callable[[Policy, dict[str, Any], str], After]] = {
    "blockdev-snapshot": Policy.snapshot,
    "blockdev-snapshot-sync": Policy.snapshot_sync,
    "blockdev-backup": Policy.backup,
    "drive-backup": Policy.drive_mirror,
}
