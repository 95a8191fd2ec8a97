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
``incoming_timeout_action``: ``kill`` the VM (fail closed) or ``warn``; so
does every other way a lock can stay untaken (an errno, a bug).  A QEMU that
daemonizes is followed to its child (same open file descriptions).

With the sanlock backend the keeper cannot hand what it takes to QEMU (a
sanlock lease belongs to the registration that acquired it), so it registers
itself, takes the leases, and holds them until QEMU exits.

It keeps no fd but its pending locks, the pidfd and stderr.  Its comm is
``ql-keeper``; ``qemu-lockctl status`` finds pending locks by it.
"""

from __future__ import annotations

import os

from qemu_locked.beside import spawn
from qemu_locked.model.errors import QemuLockedError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

    from qemu_locked.lock.held import Pending
    from qemu_locked.model.config import Config
    from qemu_locked.model.plan import Plan
    from qemu_locked.model.row import StatusRow

COMM = b"ql-keeper"
_SIGKILL = 9


class VM:
    """The QEMU this keeper serves, followed across ``-daemonize``.

    ``ref_fd`` is an fd whose open file description QEMU holds too: when the
    watched pid exits, the process still holding that description (the
    daemonized child) is the VM; none left means the VM is gone.
    """

    def __init__(self, pid: int, pidfd: int, ref_fd: int) -> None:
        self.pid, self.pidfd, self.ref_fd = pid, pidfd, ref_fd

    def gone(self, timeout: float | None) -> bool:
        while spawn.vm_gone(self.pidfd, timeout):
            new = spawn.sharer(self.ref_fd) if self.ref_fd >= 0 else None
            if new is None:
                return True
            try:
                pidfd = os.pidfd_open(new)
            except ProcessLookupError:
                continue  # exited meanwhile: look again
            os.close(self.pidfd)
            self.pid, self.pidfd = new, pidfd
            timeout = 0
        return False


def _act(config: Config, vm: VM, text: str) -> str:
    """One line, then ``incoming_timeout_action``; returns what was done."""
    kill = config.incoming_timeout_action == "kill"
    action = (
        "killing the VM (incoming_timeout_action = kill)"
        if kill
        else "the VM runs without that lock (incoming_timeout_action = warn)"
    )
    spawn.say(f"{text}; {action}")
    if kill:
        try:
            os.kill(vm.pid, _SIGKILL)
        except ProcessLookupError:
            pass
    return action


def _why(exc: BaseException, label: str) -> str:
    if isinstance(exc, QemuLockedError):
        text = exc.message
        return text[len(label) + 2 :] if text.startswith(label + ": ") else text
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return f"internal error: {type(exc).__name__}: {exc}"


class Wait:
    """The keeper's work, one attempt at a time: driven by the keeper process
    (run) or by the supervisor's loop (beside/supervisor), which then is the one
    process beside QEMU.

    Every way out that leaves a lock untaken -- the wait running out, an error
    from the lock call (ENOLCK...), a bug of ours -- writes one line and applies
    ``incoming_timeout_action``: it fails closed, never open.
    """

    def __init__(self, pending: list[Pending], config: Config, plan: Plan, vm: VM,
                 close_taken: bool) -> None:  # fmt: skip
        import time

        self.pending, self.config, self.plan, self.vm = list(pending), config, plan, vm
        self.deadline = time.monotonic() + config.incoming_wait
        # The keeper closes what it took (QEMU holds the description); in the
        # supervisor the fd is the lock's carrier and stays.
        self.close_taken = close_taken
        self.keep_alive = False  # something taken must be held for QEMU's life
        self.killed = False

    def step(self) -> None:
        """One attempt at the first lock still pending."""
        import time

        p = self.pending[0]
        try:
            if p.try_take():
                p.taken(self.config, self.plan, self.vm.pid)
                self.pending.pop(0)
                self._audit("locked", p)
                if p.holds_for_life:
                    self.keep_alive = True
                elif self.close_taken:
                    os.close(p.fd)
                return
            if time.monotonic() < self.deadline:
                return
            from qemu_locked.model.plan import EXCLUSIVE, SHARED
            from qemu_locked.model.words import refusal

            holder = p.holders()
            why = f"after {self.config.incoming_wait:g} s of incoming migration"
            text = refusal(p.label, EXCLUSIVE if p.exclusive else SHARED, holder, why)
        except Exception as exc:
            holder, why = None, f"cannot take the lock ({_why(exc, p.label)})"
            text = f"{p.label}: {why}"
        self.fail(text, why, holder)

    def fail(self, text: str, why: str | None = None, holder: str | None = None) -> None:
        """``text`` in the domain log, then the action; in the audit trail, the
        lock left untaken (``why``, ``holder``: what the line says of it)."""
        p = self.pending[0] if self.pending else None
        self.pending.clear()
        done = _act(self.config, self.vm, text)
        if self.config.incoming_timeout_action == "kill":
            self.killed, self.keep_alive = True, False
        self._audit("timeout" if holder else "failed", p, holder, f"{why or text}; {done}")

    def _audit(self, action: str, p: Pending | None, holder: str | None = None,
               detail: str | None = None) -> None:  # fmt: skip
        from qemu_locked.beside import audit

        mode = None if p is None else "exclusive" if p.exclusive else "shared"
        audit.note(self.config, self.plan, self.vm.pid, action, p.label if p else None, mode,
                   holder, "incoming migration", detail)  # fmt: skip


def run(
    pending: list[Pending], config: Config, plan: Plan, vm_pid: int, pidfd: int, ref_fd: int
) -> NoReturn:
    """The keeper's whole life (in the forked grandchild); never returns."""
    code = 0
    vm = VM(vm_pid, pidfd, ref_fd)
    try:
        spawn.close_all_but({2, pidfd, ref_fd} | {p.fd for p in pending if p.fd >= 0})
        spawn.set_comm(COMM)
        wait = Wait(pending, config, plan, vm, close_taken=True)
        while wait.pending:
            wait.step()
            if wait.pending and vm.gone(0.1):
                wait.keep_alive = False  # the VM is gone: nothing left to keep
                break
        code = 1 if wait.killed else 0
        if wait.keep_alive:
            vm.gone(None)  # hold what we took until QEMU exits
    except BaseException as exc:  # never a traceback into the domain log, never fail open
        code = 70
        text = f"keeper: {_why(exc, '')}"
        done = _act(config, vm, text)
        from qemu_locked.beside import audit

        audit.note(config, plan, vm.pid, "failed", None, origin="incoming migration",
                   detail=f"{text}; {done}")  # fmt: skip
    os._exit(code)


def start(pending: list[Pending], config: Config, plan: Plan, ref_fd: int = -1) -> None:
    """Start the keeper beside the QEMU this process is about to become.

    ``ref_fd``: an fd QEMU inherits (any held lock), for following a
    daemonizing QEMU when no pending lock has an fd of its own (sanlock).
    """
    own = [p.fd for p in pending if p.fd >= 0]
    ref = own[0] if own else ref_fd
    spawn.beside(lambda vm_pid, pidfd: run(pending, config, plan, vm_pid, pidfd, ref))


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
    """Locks a keeper (or a supervisor) still waits for, as ``qemu-lockctl
    status`` rows.

    Found by its comm; the VM it serves by its pidfd's ``Pid:`` line; what it
    waits for by its fds on files that carry no lock yet.
    """
    from qemu_locked.lock import procfs
    from qemu_locked.model.row import StatusRow

    rows: list[StatusRow] = []
    waiters = {COMM.decode(), procfs.SUPERVISOR_COMM}
    for pid in procfs.pids():
        if procfs.comm(pid) not in waiters:
            continue
        vm_pid = 0
        waiting: list[str] = []
        for fd, target, info in procfs.fd_entries(pid):
            if fd in ("0", "1", "2"):
                continue
            pid_line = [ln for ln in info.splitlines() if ln.startswith("Pid:")]
            if pid_line:
                vm_pid = int(pid_line[0].split()[1])
            elif _waits_on(target, info):
                waiting.append(target)
        if not vm_pid:
            continue
        guest, uuid, _comm = procfs.guest_of(vm_pid)
        shown: set[str] = set()
        for target in sorted(waiting, key=lambda t: not t.startswith(lockspace_prefix)):
            lease = target.startswith(lockspace_prefix)
            path = _lease_key(target) if lease else target
            if path in shown:
                continue  # an image's lease and its own byte-0 lock: one row
            shown.add(path)
            rows.append(StatusRow(
                path, "pending", vm_pid, host, guest, uuid,
                None, "pending (incoming migration)", "lease" if lease else "ofd", keeper=pid,
            ))  # fmt: skip
    return rows


def _waits_on(target: str, info: str) -> bool:
    """An fd on a file (image, device, lease) that holds no lock: one a keeper
    or supervisor waits to lock (the supervisor's carriers hold theirs; its
    listener, sockets, /proc files and the memfd it publishes its locks in are
    not files of ours)."""
    if not target.startswith("/") or target.startswith(("/proc/", "/memfd:")):
        return False
    return "\nlock:" not in info
