"""The wrapper's side: start the supervisor, then filter this process and exec.

Order matters.  The supervisor is forked first (double fork, beside QEMU), so
it is not filtered itself; then the filter goes on the wrapper, whose exec
becomes QEMU, and the listener goes to the supervisor over a socket pair.
The supervisor receives copies of the start-time lock fds as the first
carriers: QEMU's later opens of those images are served by the locks it
already holds.  Runs in the wrapper: the start path's imports only.
"""

from __future__ import annotations

import _socket
import os

from qemu_locked.model.errors import BackendError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

    from qemu_locked.beside.locks import Locks
    from qemu_locked.lock.held import Pending
    from qemu_locked.model.config import Config
    from qemu_locked.model.plan import Plan

_SCM_RIGHTS = 1
_SOL_SOCKET = 1


def attach(lock_fds: list[int], config: Config, plan: Plan, pending: list[Pending]) -> None:
    """Supervise the QEMU this process is about to become; raises BackendError
    (nothing started, nothing filtered) when the kernel cannot.  ``pending``:
    locks an incoming migration's source still holds, which the supervisor
    takes as the keeper would (beside/keeper.py), in its own loop."""
    from qemu_locked.beside import spawn
    from qemu_locked.beside.supervisor import kernel

    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)

    def life(vm_pid: int, pidfd: int) -> NoReturn:
        ours.close()
        _serve(theirs, vm_pid, pidfd, lock_fds, config, plan, pending)

    spawn.beside(life)
    theirs.close()
    try:
        seccomp = kernel.Filter()  # meanwhile, the supervisor starts
        pid = int(ours.recv(16) or b"0")
        listener = seccomp.install(pid)
    except (OSError, ValueError) as exc:
        ours.close()  # the supervisor sees the end of the socket and leaves
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise BackendError(
            f"seccomp user notification is not available here ({why}): disks QEMU opens after "
            "start could not be locked; set supervisor = false to lock the command line's disks "
            "at start only"
        ) from None
    try:
        ours.sendmsg([b"L"], [(_SOL_SOCKET, _SCM_RIGHTS, listener.to_bytes(4, "little"))])
    except OSError as exc:
        raise BackendError(f"the supervisor ended before QEMU started ({exc.strerror})") from None
    finally:
        os.close(listener)
        ours.close()


def _serve(sock: _socket.socket, vm_pid: int, pidfd: int, lock_fds: list[int],
           config: Config, plan: Plan, pending: list[Pending]) -> NoReturn:  # fmt: skip
    from qemu_locked.beside import spawn

    try:
        # The pidfd: how the supervisor learns QEMU is gone (and how procfs tells a
        # helper outliving its QEMU).
        spawn.close_all_but({sock.fileno(), pidfd, 2, *lock_fds})
        sock.send(str(os.getpid()).encode())  # first: the wrapper waits for it to filter itself
        from qemu_locked.lock import procfs

        try:
            spawn.set_comm(procfs.SUPERVISOR_COMM.encode())
        except OSError as exc:  # status then lists our lock copies apart: say why
            spawn.say(f"supervisor: cannot name itself {procfs.SUPERVISOR_COMM}: {exc.strerror}")
        if plan.daemonize and not _is_file(2):
            # As QEMU's own: a caller reading a pipe must see it close.  A log
            # file is kept: a refusal or a migration's timeout is written there.
            null = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
            os.dup2(null, 2)
            os.close(null)
        # While the wrapper installs the filter and execs QEMU: QEMU's first open
        # waits for this process, so only what the loop needs is imported before
        # then; the locks' machinery comes in the loop's first idle moment (the
        # loader's ~50 library opens need none of it).
        from qemu_locked.beside import keeper
        from qemu_locked.beside.supervisor.loop import Supervisor
        from qemu_locked.beside.supervisor.paths import real_paths

        # QEMU is followed across -daemonize by an fd it shares with us; with
        # none, the listener's hang-up alone says when it is gone.
        ref = next((fd for fd in lock_fds if fd >= 0), -1)
        vm = keeper.VM(vm_pid, pidfd, ref) if ref >= 0 or not plan.daemonize else None
        wait = None
        if pending:
            wait = keeper.Wait(pending, config, plan, vm or keeper.VM(vm_pid, pidfd, ref),
                               close_taken=False)  # fmt: skip
        keep = frozenset(p.fd for p in pending)

        def locks() -> Locks:
            from qemu_locked.beside import audit
            from qemu_locked.beside.locks import Locks

            held = Locks(config, plan, vm_pid)
            held.adopt(lock_fds, keep=keep)
            if lock_fds:  # the start's locks, recorded here rather than on the VM's start path
                audit.started(config, plan, vm_pid, [p.label for p in pending])
            return held

        _msg, anc, _flags, _addr = sock.recvmsg(1, 64)
        sock.close()
        if not anc:
            os._exit(0)  # the wrapper could not install the filter: it says why
        listener = int.from_bytes(anc[0][2][:4], "little")
        bookkeeping = real_paths(plan.bookkeeping)
        supervisor = Supervisor(listener, vm_pid, locks, lock_fds, bookkeeping, vm, wait)
        supervisor.run()
        supervisor.ended()
    finally:
        os._exit(0)


def _is_file(fd: int) -> bool:
    import stat

    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False
