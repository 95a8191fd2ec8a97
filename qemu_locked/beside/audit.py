"""What the VM's side records in the audit trail (model/audit.py).

The wrapper: a refused start, one line per resource refused, and, when no
supervisor follows it, the locks the start took; the supervisor: those start
locks (in its first idle moment, off QEMU's path), then every lock taken,
changed or let go beside the running VM (beside/locks.py, so the monitor
guard's too) and every open it refuses; the keeper, or the supervisor in its
stead: a migration's lock taken at last, its timeout, its failure.

Nothing here raises: the trail records, it decides nothing.  A key that
cannot be read leaves that field out; a bug of ours drops the line.
"""

from __future__ import annotations

import os

from qemu_locked.model.audit import Event, send
from qemu_locked.model.words import held

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    from qemu_locked.model.config import Config
    from qemu_locked.model.errors import Conflict
    from qemu_locked.model.plan import Plan


# (action, path, mode, holder, origin, detail)
_Entry = tuple[str, "str | None", "str | None", "str | None", "str | None", "str | None"]


def key_for(label: str, plan: Plan) -> str | None:
    """The stable key of what a message names: a disk's (lock/keys.py), or the
    domain lease's; None when it cannot be read (a file gone meanwhile)."""
    from qemu_locked.lock import keys

    if label == keys.domain_label(plan.uuid, plan.guest):
        return keys.domain_key(plan.uuid, plan.guest)
    try:
        return keys.disk_key(label, os.stat(label))
    except Exception:  # OSError, a mount table we cannot read: the line goes without it
        return None


def note(config: Config, plan: Plan, vm_pid: int, action: str, path: str | None,
         mode: str | None = None, holder: str | None = None, origin: str | None = None,
         detail: str | None = None) -> None:  # fmt: skip
    """One line about ``path`` (a disk's path or a domain lease's label);
    ``holder`` as a refusal names it (``(exclusive) by pid 9, guest 'a'``)."""
    _record(config, plan, vm_pid, [(action, path, mode, holder, origin, detail)])


def refused(config: Config, plan: Plan, vm_pid: int, conflicts: Iterable[Conflict],
            origin: str | None = None, line: str | None = None, path: str | None = None,
            mode: str | None = None) -> None:  # fmt: skip
    """A refusal: one line per resource refused, naming what holds it; with no
    holder to name (a security policy, a file changed meanwhile), one line with
    the reason (``line``, about ``path`` wanted in ``mode``)."""
    entries: list[_Entry] = [
        ("refused", res, wanted, who, origin or _origin(plan, res), None)
        for res, wanted, who in conflicts
    ]
    if not entries and line:
        entries.append(("refused", path, mode, None, origin, line.removeprefix("qemu-locked: ")))
    _record(config, plan, vm_pid, entries)


def started(config: Config, plan: Plan, vm_pid: int, pending: Iterable[str] = ()) -> None:
    """The locks a start took: one line per disk (``qemu-lockctl log PATH`` finds
    each), but for those an incoming migration still waits for (``pending``: their
    labels), which the keeper records once taken."""
    waiting = set(pending)
    entries: list[_Entry] = [
        ("locked", d.path, d.mode, None, d.origin, None)
        for d in plan.disks
        if d.path not in waiting
    ]
    _record(config, plan, vm_pid, entries)


def _origin(plan: Plan, path: str) -> str | None:
    return next((d.origin for d in plan.disks if d.path == path), None)


def _record(config: Config, plan: Plan, vm_pid: int, entries: list[_Entry]) -> None:
    if not config.audit or not config.audit_socket or not entries:
        return  # before any work: off means nothing is even computed
    if not os.path.exists(config.audit_socket):
        return  # no syslog on this host (a container): not even the keys are read
    try:
        host = config.effective_host()
        events = [
            Event(action, path, key_for(path, plan) if path else None, mode, plan.guest, vm_pid,
                  host, held(holder) if holder else None, origin, detail)
            for action, path, mode, holder, origin, detail in entries
        ]  # fmt: skip
        send(events, config)
    except Exception:  # noqa: S110  (a bug of ours here must not fail the VM, nor the start)
        pass
