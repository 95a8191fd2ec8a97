"""Media changes: removable devices (cdrom, floppy) whose medium changes while
the VM runs, by node (``blockdev-insert-medium``, libvirt) or by path
(``blockdev-change-medium``, HMP ``change``).  A cdrom's medium is shared; a
writable medium in another device is exclusive; the old medium is let go once
the change succeeded.
"""

from __future__ import annotations

from qemu_locked.beside.guard.chain import header_files
from qemu_locked.model.plan import EXCLUSIVE, SHARED

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from qemu_locked.beside.guard.view import After, PolicyView


def _str(obj: object) -> str | None:
    return obj if isinstance(obj, str) else None


def _device_id(args: dict[str, Any]) -> str:
    return _str(args.get("id")) or _str(args.get("device")) or ""


def change_medium(policy: PolicyView, args: dict[str, Any], tag: str) -> After:
    dev_id = _device_id(args)
    path = _str(args.get("filename"))
    return medium_path(policy, dev_id, path, args.get("read-only-mode") == "read-only", tag)


def medium_path(policy: PolicyView, dev_id: str, path: str | None, ro: bool, tag: str) -> After:
    dev = policy.graph.devices.get(dev_id)
    cd = dev.cd if dev is not None else False
    user = f"medium:{dev_id}:{tag}"
    if path:
        mode = SHARED if ro or cd else EXCLUSIVE
        policy._use(path, mode, user, f"media change {dev_id}")
        header_files(policy, path, mode, user, f"media change {dev_id}")
    old = policy.media.get(dev_id)

    def after(ok: bool) -> None:
        if not ok:
            policy._unuse({user})
            return
        policy.media[dev_id] = user
        if old is not None:
            policy._unuse({old})

    return after


def insert_medium(policy: PolicyView, args: dict[str, Any], tag: str) -> After:
    dev_id = _device_id(args)
    node = _str(args.get("node-name"))
    dev = policy.graph.devices.get(dev_id)
    if node is not None and policy.graph.writable(node) and not (dev is not None and dev.cd):
        policy._writer(node, tag, f"media change {dev_id}")
    # A new medium is the device's, not the blockdev-add that opened it.
    return policy._tagged(tag, lambda: policy._named(node, f"medium {dev_id}"))


def remove_medium(policy: PolicyView, args: dict[str, Any], tag: str) -> After:
    dev_id = _device_id(args)

    def after(ok: bool) -> None:
        old = policy.media.pop(dev_id, None) if ok else None
        if old is not None:
            policy._unuse({old})

    return after
