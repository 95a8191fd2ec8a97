"""The monitor guard's relay: libvirt's monitor socket on one side, QEMU's on the other.

QEMU's side is one connection for QEMU's whole life, made before exec.  Its
greeting is kept and sent to every client that connects to libvirt's socket
(libvirtd connects at start and again after a restart); the first client's
``qmp_capabilities`` goes to QEMU, later ones are answered here, since QEMU's
session is already negotiated.  Commands go to QEMU one at a time, in order,
each with the fds it arrived with; the next is read only once the previous
one was answered, so every reply is matched to its command and the lock
policy learns whether it succeeded (QEMU's own monitor runs them one at a
time too).  Replies and events go back byte for byte.  Plain traffic
(libvirt's queries) takes guard/steady's short loop instead of this one.
"""

from __future__ import annotations

import _socket
import select
import struct
from time import monotonic

from qemu_locked.beside.guard import frame, steady
from qemu_locked.beside.guard.io import DONTWAIT, Out, close_fds, recv
from qemu_locked.beside.guard.reply import Inflight, oops, own_command
from qemu_locked.beside.locks import Refused

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Callable
    from typing import Any

    from qemu_locked.beside.guard.policy import Policy

else:  # as in guard/io: the C type, without importing `collections`
    from _collections import deque

_READ = 1 << 16
_MAX_QUEUED = 64  # client units waiting for their turn...
_MAX_QUEUED_BYTES = 2 << 20  # ...and their bytes
_MAX_OUT = 8 << 20  # bytes waiting for a slow client before QEMU is read again
_UNREADABLE = "qemu-locked: the monitor guard could not read this command, so it is not forwarded"
_POLLIN, _POLLOUT = select.POLLIN, select.POLLOUT
_ERRS = select.POLLERR | select.POLLHUP | select.POLLNVAL


class Relay:
    def __init__(self, qemu: _socket.socket, listener: _socket.socket, pidfd: int,
                 policy: Policy | None) -> None:  # fmt: skip
        self.qemu = qemu
        self.listener = listener
        self.pidfd = pidfd
        self.policy = policy
        self.client: _socket.socket | None = None
        self.gen = 0
        self.greeting: bytes | None = None
        self.qemu_ready = False  # QEMU's session negotiated
        self.client_ready = False
        self.q_split = frame.Lines()
        self.c_split = frame.Splitter()
        self.q_out = Out()
        self.c_out = Out()
        self.queue: deque[frame.Unit] = deque()
        self.mine: deque[tuple[bytes, list[int], Inflight]] = deque()
        self.inflight: Inflight | None = None
        self.qemu_open = True
        self._serial = 0
        self._to_client = False  # where QEMU's whitespace and oversized pieces go
        # What is in flight while a command passed unparsed: one per client (gen).
        self.passing = Inflight(steady.ANY, self.gen, None, False, False)
        self.verdicts = steady.Verdicts()
        self.sweep_at = 0.0  # when due releases are looked at next
        listener.setblocking(False)
        qemu.setblocking(True)  # see guard/io.DONTWAIT and guard/steady
        wait = struct.pack("@ll", steady.WAIT_S, 0)  # struct timeval
        qemu.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO, wait)

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        """Until QEMU exits."""
        poller = select.poll()
        registered: dict[int, int] = {}
        while True:
            self._process()
            fds = {self.pidfd: _POLLIN}
            if self.qemu_open:
                fds[self.qemu.fileno()] = (_POLLIN if self.c_out.size < _MAX_OUT else 0) | (
                    _POLLOUT if self.q_out.items else 0)  # fmt: skip
            if self.client is None:
                fds[self.listener.fileno()] = _POLLIN
            else:
                fds[self.client.fileno()] = (_POLLIN if self._room() else 0) | (
                    _POLLOUT if self.c_out.items else 0)  # fmt: skip
            if fds != registered:
                for fd in registered.keys() - fds.keys():
                    poller.unregister(fd)
                for fd, ev in fds.items():
                    poller.register(fd, ev)  # registers or modifies
                registered = fds
            due = self.policy is not None and self.policy.due
            ready = poller.poll(1000 if due else None)
            if steady.is_steady(self):
                ready = steady.steady_loop(self, poller, ready, 1000 if due else None)
            if due and (not ready or monotonic() >= self.sweep_at):  # idle or not: each second
                self.sweep()
            for fd, ev in ready:
                if fd == self.pidfd:
                    return
                if self.qemu_open and fd == self.qemu.fileno():
                    self._qemu_event(ev)
                elif self.client is not None and fd == self.client.fileno():
                    self._client_event(ev)
                elif fd == self.listener.fileno():
                    self._accept()

    def _qemu_event(self, ev: int) -> None:
        if ev & _POLLOUT and not self.q_out.flush(self.qemu):
            self._qemu_gone()
            return
        if ev & (_POLLIN | _ERRS):
            try:
                # A plain recv: QMP passes no fds to the client, and any QEMU sends
                # (its side is not trusted) is discarded by the kernel unseen.
                data = self.qemu.recv(_READ, DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            self.qemu_data(data)

    def qemu_data(self, data: bytes) -> None:
        if not data:
            self._qemu_gone()
            return
        for unit in self.q_split.feed(data):
            self._from_qemu(unit)
        self._flush_client()

    def _qemu_gone(self) -> None:
        """QEMU closed its monitor: it is exiting.  The client sees the close as from QEMU."""
        self.qemu_open = False
        self._drop_client()

    def _client_event(self, ev: int) -> None:
        assert self.client is not None
        if ev & _POLLOUT:
            self._flush_client()
        if self.client is not None and ev & (_POLLIN | _ERRS):
            try:
                data, fds = recv(self.client)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            self.client_data(data, fds)

    def client_data(self, data: bytes, fds: list[int]) -> None:
        if not data:
            close_fds(fds)
            self._drop_client()
            return
        self.queue.extend(self.c_split.feed(data, fds))

    def _room(self) -> bool:
        """May more of the client's input be read?  (Bounded by count and bytes.)"""
        return len(self.queue) < _MAX_QUEUED and (
            sum(len(u.data) for u in self.queue) < _MAX_QUEUED_BYTES
        )

    def _accept(self) -> None:
        try:
            # _socket (not socket, which imports enum) names it _accept
            sock, _addr = self.listener._accept()  # type: ignore[attr-defined]
        except OSError:
            return
        self.client = _socket.socket(fileno=sock)
        self.client.setblocking(False)
        self.gen += 1
        self.passing = Inflight(steady.ANY, self.gen, None, False, False)
        self.client_ready = False
        self.c_split = frame.Splitter()
        if self.greeting is not None:
            self.c_out.put(self.greeting)
            self._flush_client()

    def _drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        self._to_client = False  # the rest of a long answer goes nowhere now
        self.c_out.drop()
        for unit in self.queue:
            close_fds(unit.fds)
        self.queue.clear()
        close_fds(self.c_split.take_fds())
        self.client_ready = False

    def _flush_client(self) -> None:
        if self.client is not None and not self.c_out.flush(self.client):
            self._drop_client()

    # -- QEMU to client ---------------------------------------------------------------

    def _from_qemu(self, unit: frame.Unit) -> None:
        send: bool | None
        if unit.kind == frame.PIECE:
            send = self._to_client  # the rest of a long message goes where its head went
        elif unit.kind == frame.HEAD:
            send = self._to_client = self._qemu_head(unit.data)
        elif (send := self._passes(unit.data)) is None:
            send = self._qemu_object(frame.parse_object(unit.data), unit)
        if send and self.client is not None:
            self.c_out.put(unit.data)

    def _qemu_head(self, head: bytes) -> bool:
        """The start of a message too long to keep, judged by how it begins."""
        cur = self.inflight
        if head.startswith(steady.REPLY_STARTS) and cur is not None:
            self.inflight = None
            return self._finish(cur, head.startswith(b'{"return"'), None)
        return self.client is not None and self.client_ready

    def _passes(self, line: bytes) -> bool | None:
        """The common case, decided without parsing: the reply to a command the
        policy does not watch (for the client that sent it, if still there), or
        an event it does not need.  None: parse it."""
        cur = self.inflight
        if line.startswith(steady.REPLY_STARTS) and cur is not None and cur.id is steady.ANY:
            self.inflight = None
            return cur.gen == self.gen and self.client is not None
        if line.startswith(b'{"timestamp"') and b"DEVICE_DELETED" not in line:
            return self.client is not None and self.client_ready
        return None

    def _qemu_object(self, obj: dict[str, Any], unit: frame.Unit) -> bool:
        """Handle one object from QEMU; True if the client gets its bytes."""
        if "QMP" in obj and self.greeting is None:
            self.greeting = unit.data[: 1 << 16]
            return self.client is not None
        if "event" in obj:
            if self.policy is not None:
                name, data = obj.get("event"), obj.get("data")
                if isinstance(name, str) and isinstance(data, dict):
                    self.policy.event(name, data)
                    self.sweep()
            return self.client is not None and self.client_ready
        if "return" not in obj and "error" not in obj:
            return self.client is not None and self.client_ready
        cur = self.inflight
        if cur is None or (cur.id not in (None, steady.ANY) and obj.get("id") != cur.id):
            return self.client is not None  # a reply to input QEMU could not parse
        self.inflight = None
        return self._finish(cur, "return" in obj, obj.get("return"))

    def _finish(self, cur: Inflight, ok: bool, ret: object) -> bool:
        """A command answered: the policy learns how; True if the client gets the reply."""
        if ok and cur.hmp:
            from qemu_locked.beside.guard.hmp import hmp_ok

            ok = hmp_ok(ret)
        if cur.after is not None:
            try:
                cur.after(ok)
            except Exception as exc:  # what it held stays held: stricter, never weaker
                oops("after a reply", exc)
        self.sweep()
        return not cur.mine and cur.gen == self.gen and self.client is not None

    # -- client to QEMU ---------------------------------------------------------------

    def _process(self) -> None:
        while self.inflight is None and self.qemu_open:
            if self.mine:
                data, fds, self.inflight = self.mine.popleft()
                self.q_out.put(data, fds)
            elif self.queue and self.c_out.size < _MAX_OUT:  # a client that reads no answers waits
                self._from_client(self.queue.popleft())
                while self.queue and self.queue[0].kind == frame.SPACE:
                    unit = self.queue.popleft()  # its line end goes with it, in one write
                    self.q_out.put(unit.data, unit.fds)
            else:
                break
        if self.qemu_open and not self.q_out.flush(self.qemu):
            self._qemu_gone()
        self._flush_client()

    def _from_client(self, unit: frame.Unit) -> None:
        if unit.kind == frame.SPACE:
            self.q_out.put(unit.data, unit.fds)
            return
        if unit.kind == frame.OVERSIZE:
            self._refuse(unit, None, "GenericError", "qemu-locked: a QMP command over 1 MiB is "
                         "not forwarded (the monitor guard cannot check it)")  # fmt: skip
            return
        if (unit.kind == frame.OBJECT and self.client_ready
                and not steady.watched(unit.data)):  # fmt: skip
            # Names no command the policy watches: on to QEMU unparsed; its reply
            # is the next one (QEMU answers in order).
            self.q_out.put(unit.data, unit.fds)
            self.inflight = self.passing
            return
        obj = frame.parse_object(unit.data) if unit.kind == frame.OBJECT else {}
        cmd = obj.get("execute", obj.get("exec-oob"))
        if not obj or not isinstance(cmd, str):
            if steady.watched(unit.data):
                self._refuse(unit, obj.get("id"), "GenericError", _UNREADABLE)
                return
            self.q_out.put(unit.data, unit.fds)
            if obj:
                self.inflight = Inflight(obj.get("id"), self.gen, None, False, False)
            return
        cmd_id = obj.get("id")
        if not self.client_ready:
            if cmd == "qmp_capabilities" and self.qemu_ready:
                close_fds(unit.fds)
                self.client_ready = True
                self._say({"return": {}}, cmd_id)
                return
            if cmd != "qmp_capabilities" and self.qemu_ready:
                expect = "Expecting capabilities negotiation with 'qmp_capabilities'"  # QEMU's
                self._refuse(unit, cmd_id, "CommandNotFound", expect)
                return
            if cmd == "qmp_capabilities":
                self.q_out.put(unit.data, unit.fds)
                self.inflight = Inflight(cmd_id, self.gen, self._negotiated(self.gen), False, False)
                return
        args = obj.get("arguments")
        after = None
        if self.policy is not None:
            try:
                after = self.policy.before(cmd, args if isinstance(args, dict) else {})
            except Refused as exc:
                self._refuse(unit, cmd_id, "GenericError", exc.line)
                return
            except Exception as exc:  # a bug of ours: the command is refused, the VM goes on
                self._refuse(unit, cmd_id, "GenericError", oops(f"cannot check {cmd}", exc))
                return
        self._hand_over()
        hmp = cmd == "human-monitor-command"
        sending = Inflight(cmd_id, self.gen, after, False, hmp)
        if self.mine:  # after the getfds that hand QEMU its new locks
            self.mine.append((unit.data, unit.fds, sending))
            return
        self.q_out.put(unit.data, unit.fds)
        self.inflight = sending

    def _negotiated(self, gen: int) -> Callable[[bool], None]:
        """QEMU's session is negotiated; the client is, if it is still the one that asked."""

        def after(ok: bool) -> None:
            if ok:
                self.qemu_ready = True
                self.client_ready = self.client_ready or gen == self.gen

        return after

    def _hand_over(self) -> None:
        """getfd / closefd for the lock fds the policy took or let go."""
        if self.policy is None:
            return
        locks = self.policy.locks
        for name, fd in locks.give:
            self._mine("getfd", name, [fd])
        for name in locks.take_back:
            self._mine("closefd", name, [])
        locks.give.clear()
        locks.take_back.clear()

    def _mine(self, cmd: str, name: str, fds: list[int]) -> None:
        self._serial += 1
        self.mine.append(own_command(cmd, name, fds, self._serial, self.gen))

    def sweep(self) -> None:
        """Let go of what is due (QEMU no longer uses it); at most once a second."""
        self.sweep_at = monotonic() + 1
        if self.policy is not None:
            try:
                self.policy.sweep()
                self.policy.locks.publish()
            except Exception as exc:  # keep what is held rather than retry forever
                self.policy.release_due.clear()
                self.policy.downgrade_due.clear()
                oops("letting go", exc)
            self._hand_over()

    def _say(self, obj: dict[str, Any], cmd_id: object) -> None:
        if cmd_id is not None:
            obj["id"] = cmd_id
        if self.client is not None:
            self.c_out.put(frame.dumps(obj).encode() + b"\r\n")

    def _refuse(self, unit: frame.Unit, cmd_id: object, cls: str, desc: str) -> None:
        """Answer a command here, with an error, instead of passing it on."""
        close_fds(unit.fds)
        self._say({"error": {"class": cls, "desc": desc}}, cmd_id)
