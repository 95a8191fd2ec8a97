"""The monitor guard: a process beside QEMU that sits on its QMP monitor, so
that disks added or changed while the VM runs are locked like the rest.

libvirt hands QEMU its monitor as ``-chardev socket,id=charmonitor,fd=N,
server=on,wait=off`` plus ``-mon chardev=charmonitor,mode=control``: fd N is a
listening socket bound to the domain's ``monitor.sock``, and libvirt connects
to that path at start and after every restart of libvirtd.  Before exec, the
wrapper (here) keeps libvirt's listening socket for the guard and puts a
listening socket of its own at fd N, which the guard connects to at once and
then makes unreachable (its path is unlinked): QEMU accepts that queued
connection when it starts, so QEMU's argv is unchanged and only the guard can
talk to it.  The guard relays between the two (guard/relay), taking and
releasing locks as commands need (guard/policy).

If the guard dies, libvirt sees its monitor close and stops the VM; QEMU holds
every lock fd itself, so nothing stays locked once QEMU is gone.

This module runs in the wrapper: it imports only what the start path may.
"""

from __future__ import annotations

import _socket
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

    from qemu_locked.beside.guard.policy import Policy
    from qemu_locked.model.config import Config
    from qemu_locked.model.plan import Plan


def _listening_unix(fd: int) -> _socket.socket | None:
    try:
        sock = _socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if (sock.family == _socket.AF_UNIX and sock.type == _socket.SOCK_STREAM
                and sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ACCEPTCONN)):  # fmt: skip
            return sock
    except OSError:
        pass
    sock.close()
    return None


def _private_pair(near: str) -> tuple[_socket.socket, _socket.socket]:
    """A listening socket and a connection to it that nobody else can make:
    bound in a fresh 0700 directory, connected, then unlinked."""
    base = os.path.dirname(near) if near.startswith("/") else ""
    if not base or not os.access(base, os.W_OK | os.X_OK):
        base = "/tmp"
    private = f"{base}/.qemu-locked-guard-{os.getpid()}"
    os.mkdir(private, 0o700)
    try:
        path = private + "/m"
        server = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        client = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            server.bind(path)
            server.listen(1)
            client.connect(path)
        except BaseException:
            server.close()
            client.close()
            raise
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass
    finally:
        os.rmdir(private)
    return server, client


def attach(args: list[str], lock_fds: list[int], config: Config, plan: Plan) -> bool:
    """Put the guard on libvirt's monitor before exec; False if there is none to guard."""
    n = plan.monitor_fd
    if n is None or plan.daemonize:  # a daemonizing QEMU leaves the pid the guard would watch
        return False
    libvirt = _listening_unix(n)
    if libvirt is None:
        return False
    try:
        name = libvirt.getsockname()
        server, conn = _private_pair(name if isinstance(name, str) else "")
    except OSError as exc:
        libvirt.close()
        from qemu_locked.model.errors import BackendError

        raise BackendError(f"monitor guard: cannot make QEMU's monitor socket: {exc.strerror}; "
                           "set monitor_guard = false to start without it") from None  # fmt: skip
    os.dup2(server.fileno(), n, inheritable=True)
    server.close()
    keep = {libvirt.fileno(), conn.fileno(), *lock_fds}

    def life(vm_pid: int, pidfd: int) -> NoReturn:
        _life(vm_pid, pidfd, keep, libvirt, conn, lock_fds, args, config, plan)

    from qemu_locked.beside.spawn import beside

    beside(life)
    libvirt.close()
    conn.close()
    return True


def _life(vm_pid: int, pidfd: int, keep: set[int], libvirt: _socket.socket,
          conn: _socket.socket, lock_fds: list[int], args: list[str], config: Config,
          plan: Plan) -> NoReturn:  # fmt: skip
    from qemu_locked.beside import spawn

    code = 0
    try:
        spawn.close_all_but(keep | {2, pidfd})
        from qemu_locked.lock.procfs import GUARD_COMM

        spawn.set_comm(GUARD_COMM.encode())
        from qemu_locked.beside.guard.relay import Relay

        policy = _policy(args, lock_fds, config, plan, vm_pid)
        policy.locks.publish()
        Relay(conn, libvirt, pidfd, policy).run()
        policy.locks.ended()
    except BaseException as exc:  # never a traceback into the domain log
        spawn.say(f"monitor guard: internal error: {type(exc).__name__}: {exc}")
        code = 70
    os._exit(code)


def _policy(args: list[str], lock_fds: list[int], config: Config, plan: Plan, vm_pid: int,
            ) -> Policy:  # fmt: skip
    from qemu_locked.beside.guard.nodes import Graph
    from qemu_locked.beside.guard.policy import Policy
    from qemu_locked.beside.locks import Locks
    from qemu_locked.lock import safeopen
    from qemu_locked.model.errors import QemuLockedError
    from qemu_locked.parse.keyval import dict_or_opts

    graph = Graph()
    locks = Locks(config, plan, vm_pid)
    locks.adopt(list(lock_fds))
    for i, arg in enumerate(args[:-1]):
        if arg in ("-blockdev", "--blockdev", "-device", "--device"):
            try:
                value = dict_or_opts(args[i + 1], arg, "driver")
            except (ValueError, QemuLockedError):
                continue
            if arg.endswith("device"):
                graph.add_device(value)
                continue
            try:
                nodes = graph.parse(value)
            except ValueError:
                continue
            graph.commit(nodes)
            for node in nodes:
                if node.protocol:
                    try:
                        key = safeopen.identity_key(os.stat(node.filename or ""))
                    except OSError:
                        continue
                    if key in locks.by_key:
                        locks.by_key[key].nodes.add(node.name)
    for lock in locks.by_key.values():
        if not lock.nodes:
            lock.nodes.add("argv")  # no node we can follow: held for QEMU's life
    return Policy(graph, locks)
