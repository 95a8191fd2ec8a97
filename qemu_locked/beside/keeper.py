"""The migration keeper: takes the locks a migration source still holds.

A destination QEMU (``-incoming``) starts while the source still holds the
disks and the domain lease.  We cannot tell the source from any other holder,
so instead of refusing, the wrapper opens everything (the fds go to QEMU),
takes what is free, and starts this keeper beside QEMU (beside/spawn.py) for
the rest before it execs QEMU.

The keeper shares QEMU's open file descriptions.  OFD locks belong to the
open file description, so a lock the keeper takes stays held by QEMU's fd
after the keeper exits.  It waits up to ``incoming_wait`` seconds, then writes
one line to QEMU's stderr (libvirt's domain log) and applies
``incoming_timeout_action``: ``kill`` the VM (fail closed) or ``warn``.

With the sanlock backend the keeper cannot hand what it takes to QEMU (a
sanlock lease belongs to the registration that acquired it), so it registers
itself, takes the leases, and holds them until QEMU exits.

It keeps no fd but its pending locks, the pidfd and stderr.  Its comm is
``ql-keeper``; ``qemu-lockctl status`` finds pending locks by it.
"""

from __future__ import annotations

import os

from qemu_locked.beside import spawn

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

    from qemu_locked.lock.held import Pending
    from qemu_locked.model.config import Config
    from qemu_locked.model.plan import Plan
    from qemu_locked.model.row import StatusRow

COMM = b"ql-keeper"
_SIGKILL = 9


def _lock_or_vm_gone(p: Pending, pidfd: int, deadline: float) -> bool | None:
    """True once locked, False on timeout, None when QEMU died first."""
    import time

    while not p.try_take():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if spawn.vm_gone(pidfd, min(0.1, left)):
            return None
    return True


def run(pending: list[Pending], config: Config, plan: Plan, vm_pid: int, pidfd: int) -> NoReturn:
    """The keeper's whole life (in the forked grandchild); never returns."""
    code = 0
    try:
        spawn.close_all_but({2, pidfd} | {p.fd for p in pending if p.fd >= 0})
        spawn.set_comm(COMM)
        import time

        deadline = time.monotonic() + config.incoming_wait
        keep_alive = False
        for p in pending:
            got = _lock_or_vm_gone(p, pidfd, deadline)
            if got is None:
                keep_alive = False
                break  # the VM is gone: nothing left to keep
            if got:
                p.taken(config, plan, vm_pid)
                if p.holds_for_life:
                    keep_alive = True
                else:
                    os.close(p.fd)
                continue
            action = config.incoming_timeout_action
            spawn.say(
                f"{p.label} is still locked {p.holders()} after {config.incoming_wait:g} s of "
                f"incoming migration; "
                + ("killing the VM (incoming_timeout_action = kill)" if action == "kill"
                   else "the VM runs without that lock (incoming_timeout_action = warn)")
            )  # fmt: skip
            if action == "kill":
                os.kill(vm_pid, _SIGKILL)
                code = 1
                keep_alive = False
                break
        if keep_alive:
            spawn.vm_gone(pidfd, None)  # hold what we took until QEMU exits
    except BaseException as exc:  # never a traceback into the domain log
        spawn.say(f"keeper: internal error: {type(exc).__name__}: {exc}")
        code = 70
    os._exit(code)


def start(pending: list[Pending], config: Config, plan: Plan) -> None:
    """Start the keeper beside the QEMU this process is about to become."""
    spawn.beside(lambda vm_pid, pidfd: run(pending, config, plan, vm_pid, pidfd))


def _lease_key(path: str) -> str:
    """The resource a lease file stands for, from any record in it (the holder's)."""
    from qemu_locked.backends.lockspace import leases
    from qemu_locked.lock.keys import display

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return path
    try:
        found = {r.key for r in leases.read_records(fd, lease_held=False) if r.key}
    finally:
        os.close(fd)
    return display(found.pop()) if len(found) == 1 else path


def pending_rows(host: str, lockspace_prefix: str) -> list[StatusRow]:
    """Locks a keeper still waits for, as ``qemu-lockctl status`` rows.

    A keeper is found by its comm; the VM it serves by its pidfd's ``Pid:``
    line; what it waits for by its other fds.
    """
    from qemu_locked.lock import procfs
    from qemu_locked.model.row import StatusRow

    rows: list[StatusRow] = []
    for pid in procfs.pids():
        if procfs.comm(pid).encode() != COMM:
            continue
        vm_pid = 0
        waiting: list[str] = []
        for fd, target, info in procfs.fd_entries(pid):
            if fd in ("0", "1", "2"):
                continue
            pid_line = [ln for ln in info.splitlines() if ln.startswith("Pid:")]
            if pid_line:
                vm_pid = int(pid_line[0].split()[1])
            else:
                waiting.append(target)
        if not vm_pid:
            continue
        guest, uuid, _comm = procfs.guest_of(vm_pid)
        for target in waiting:
            lease = target.startswith(lockspace_prefix)
            rows.append(StatusRow(
                _lease_key(target) if lease else target, "pending", vm_pid, host, guest, uuid,
                None, "pending (incoming migration)", "lease" if lease else "ofd", keeper=pid,
            ))  # fmt: skip
    return rows
