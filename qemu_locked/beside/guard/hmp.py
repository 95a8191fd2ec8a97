"""HMP commands (``human-monitor-command``) that open or drop disks.

HMP answers every command with a string (an error is text, not a QMP error),
so success is an empty answer (``drive_add`` says ``OK``).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.beside.guard.view import After, PolicyView


def _words(line: str) -> list[str]:
    return line.split()


def hmp_command(policy: PolicyView, line: str, tag: str) -> After | None:
    from qemu_locked.beside.guard.media import medium_path, remove_medium

    words = _words(line)
    if not words:
        return None
    cmd, rest = words[0], [w for w in words[1:] if not w.startswith("-")]
    if cmd == "drive_add" and len(rest) >= 2:
        return _drive_add(policy, rest[-1], tag)
    if cmd == "drive_del" and rest:
        return _drive_del(policy, rest[0])
    if cmd == "change" and len(rest) >= 2:
        ro = len(rest) >= 4 and rest[3] == "read-only"
        return medium_path(policy, rest[0], rest[1], ro, tag)
    if cmd == "eject" and rest:
        return remove_medium(policy, {"device": rest[0]}, tag)
    if cmd in ("snapshot_blkdev", "drive_mirror", "drive_backup") and len(rest) >= 2:
        if cmd == "snapshot_blkdev":
            return policy.snapshot_sync({"device": rest[0], "snapshot-file": rest[1]}, tag)
        return policy.drive_mirror({"device": rest[0], "target": rest[1]}, tag)
    return None


def _drive_add(policy: PolicyView, opts: str, tag: str) -> After | None:
    from qemu_locked.beside.guard.chain import header_files
    from qemu_locked.beside.guard.nodes import Node, truthy
    from qemu_locked.lock.safeopen import plain_name
    from qemu_locked.model.plan import EXCLUSIVE, SHARED
    from qemu_locked.parse.keyval import split_opts

    kv = dict(split_opts(opts))
    path, drive_id = kv.get("file"), kv.get("id")
    if not path or not drive_id or not plain_name(path):
        return None
    ro = truthy(kv.get("readonly", "off")) or truthy(kv.get("snapshot", "off"))
    policy._use(path, SHARED if ro else EXCLUSIVE, drive_id, f"drive_add {drive_id}", defer_ok=True)
    if kv.get("format", "qcow2") in ("qcow2", "qcow", "qed", "vmdk"):
        header_files(policy, path, SHARED if ro else EXCLUSIVE, drive_id + "#backing",
                      f"drive_add {drive_id}")  # fmt: skip
    node = Node(drive_id, "file", ro, False)
    node.filename = path

    def after(ok: bool) -> None:
        if ok:
            policy.graph.commit([node])
            policy.legacy.add(drive_id)
        else:
            policy._unuse({drive_id, drive_id + "#backing"})

    return after


def _drive_del(policy: PolicyView, drive_id: str) -> After:
    def after(ok: bool) -> None:
        if ok:
            policy.graph.nodes.pop(drive_id, None)
            policy.legacy.discard(drive_id)
            policy._unuse({drive_id, drive_id + "#backing"})

    return after


def hmp_ok(ret: object) -> bool:
    return isinstance(ret, str) and ret.strip() in ("", "OK")
