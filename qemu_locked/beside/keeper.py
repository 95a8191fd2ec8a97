"""The migration keeper: takes the locks a migration source still holds.

A destination QEMU (``-incoming``) starts while the source still holds the
disks and the domain lease.  We cannot tell the source from any other holder,
so instead of refusing, the wrapper opens everything (the fds go to QEMU),
takes what is free, and forks this keeper for the rest before it execs QEMU.

The keeper shares QEMU's open file descriptions.  OFD locks belong to the
open file description, so a lock the keeper takes stays held by QEMU's fd
after the keeper exits.  It waits up to ``incoming_wait`` seconds, then writes
one line to QEMU's stderr (libvirt's domain log) and applies
``incoming_timeout_action``: ``kill`` the VM (fail closed) or ``warn``.

With the sanlock backend the keeper cannot hand what it takes to QEMU (a
sanlock lease belongs to the registration that acquired it), so it registers
itself, takes the leases, and holds them until QEMU exits.

It is not QEMU's child: QEMU never reaps children it did not start, so a
keeper forked straight from the wrapper (with PR_SET_PDEATHSIG, QEMU being its
parent after exec) stays a zombie under the VM for its whole life (measured).
The keeper is double-forked instead (the wrapper reaps the middle process
before exec) and watches QEMU through a pidfd: it wakes the instant QEMU dies
and exits.  It keeps no fd but its pending locks, the pidfd and stderr.  Its
comm is ``ql-keeper``; ``qemu-lockctl status`` finds pending locks by it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.lock.held import Pending
    from qemu_locked.model.config import Config
    from qemu_locked.model.plan import Plan

COMM = b"ql-keeper"
_PR_SET_NAME = 15
_SIGKILL = 9


def _set_comm(name: bytes) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def _lock_or_vm_gone(p: Pending, pidfd: int, deadline: float) -> bool | None:
    """True once locked, False on timeout, None when QEMU died first."""
    import select
    import time

    while not p.try_take():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _w, _x = select.select([pidfd], [], [], min(0.1, left))
        if ready:
            return None
    return True


def _close_all_but(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def _say(text: str) -> None:
    try:
        os.write(2, ("qemu-locked: " + text.replace("\n", "\\n") + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


def run(pending: list[Pending], config: Config, plan: Plan, vm_pid: int, pidfd: int) -> None:
    """The keeper's whole life (in the forked grandchild); never returns."""
    code = 0
    try:
        _close_all_but({2, pidfd} | {p.fd for p in pending if p.fd >= 0})
        _set_comm(COMM)
        import time

        deadline = time.monotonic() + config.incoming_wait
        keep_alive = False
        for p in pending:
            got = _lock_or_vm_gone(p, pidfd, deadline)
            if got is None:
                keep_alive = False
                break  # the VM is gone: nothing left to keep
            if got and p.holds_for_life:
                keep_alive = True
                continue
            if got:
                if p.record_key is not None:
                    from qemu_locked.backends.lockspace import leases

                    slot = leases.take_slot(p.fd)
                    if slot is not None:
                        mode = "exclusive" if p.exclusive else "shared"
                        leases.write_record(p.fd, slot, p.record_key, mode, config.effective_host(),
                                            plan.guest, plan.uuid, vm_pid)  # fmt: skip
                os.close(p.fd)
                continue
            holders = p.holders()
            action = config.incoming_timeout_action
            _say(
                f"{p.label} is still locked {holders} after {config.incoming_wait:g} s of "
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
            import select

            select.select([pidfd], [], [])  # hold what we took until QEMU exits
    except BaseException as exc:  # never a traceback into the domain log
        _say(f"keeper: internal error: {type(exc).__name__}: {exc}")
        code = 70
    os._exit(code)


def spawn(pending: list[Pending], config: Config, plan: Plan) -> None:
    """Double-fork the keeper; the caller goes on to exec QEMU (same pid)."""
    vm_pid = os.getpid()
    pidfd = os.pidfd_open(vm_pid)  # survives our exec: it names the process, not the program
    middle = os.fork()
    if middle == 0:
        if os.fork() == 0:
            run(pending, config, plan, vm_pid, pidfd)
        os._exit(0)
    os.waitpid(middle, 0)
    os.close(pidfd)


def _lease_key(path: str) -> str:
    """The resource a lease file stands for, from any record in it (the holder's)."""
    from qemu_locked.backends.lockspace import leases

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return path
    try:
        keys = {r.key for r in leases.read_records(fd, lease_held=False) if r.key}
    finally:
        os.close(fd)
    if len(keys) != 1:
        return path
    from qemu_locked.lock.keys import display

    return display(keys.pop())


def pending_rows(host: str, lockspace_prefix: str) -> list[dict[str, object]]:
    """Locks a keeper still waits for, as ``qemu-lockctl status`` rows.

    A keeper is found by its comm; the VM it serves by its pidfd's ``Pid:``
    line; what it waits for by its other fds.
    """
    from qemu_locked.lock import holders

    rows: list[dict[str, object]] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/comm", "rb") as f:
                if f.read().strip() != COMM:
                    continue
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        vm_pid = 0
        waiting: list[str] = []
        for fd in fds:
            if fd in ("0", "1", "2"):
                continue
            try:
                target = os.readlink(f"/proc/{name}/fd/{fd}")
                with open(f"/proc/{name}/fdinfo/{fd}") as f:
                    info = f.read()
            except OSError:
                continue
            pid_line = [ln for ln in info.splitlines() if ln.startswith("Pid:")]
            if pid_line:
                vm_pid = int(pid_line[0].split()[1])
            else:
                waiting.append(target)
        if not vm_pid:
            continue
        guest, uuid, _comm = holders.guest_of(vm_pid)
        for target in waiting:
            lease = target.startswith(lockspace_prefix)
            row: dict[str, object] = {"path": _lease_key(target) if lease else target}
            row.update(mode="pending", pid=vm_pid, host=host, guest=guest, uuid=uuid, since=None)
            row.update(state="pending (incoming migration)", keeper=int(name))
            row["source"] = "lease" if lease else "ofd"
            rows.append(row)
    return rows
