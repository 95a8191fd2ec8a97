"""The monitor guard's steady state: one plain command at a time, relayed with
as little work as a bare relay does.

Most monitor traffic is libvirt's queries and their replies, and each costs the
VM's management a round trip through the guard.  While nothing is queued,
half-read or owed (``is_steady``), a command that is one object for certain
(``guard/frame.plain``) naming no watched word goes straight to QEMU, and
QEMU's one-line answer or event straight back; anything else is handed to the
relay's general loop, which cuts, parses and checks.  On a busy host each step
here runs with cold caches, so the loop is written flat, with local names, and
the "may it pass?" verdict is remembered (``Verdicts``).
"""

from __future__ import annotations

import select
from time import monotonic

from qemu_locked.beside.guard.frame import plain
from qemu_locked.beside.guard.io import ANC, DONTWAIT, FLAGS, fds_of

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from collections import deque
    from typing import Protocol

    from qemu_locked.beside.guard.frame import Lines, Splitter, Unit
    from qemu_locked.beside.guard.io import Out
    from qemu_locked.beside.guard.reply import Inflight

    class RelayView(Protocol):
        """What this loop uses of guard/relay's Relay (which imports this module)."""

        qemu: _socket.socket
        client: _socket.socket | None
        client_ready: bool
        qemu_open: bool
        queue: deque[Unit]
        mine: deque[tuple[bytes, list[int], Inflight]]
        inflight: Inflight | None
        passing: Inflight
        verdicts: Verdicts
        q_out: Out
        c_out: Out
        q_split: Lines
        c_split: Splitter
        sweep_at: float

        def qemu_data(self, data: bytes) -> None: ...

        def client_data(self, data: bytes, fds: list[int]) -> None: ...


# Words in every command the policy watches (tests/test_guard.py pins that):
# a command containing none of them passes without being parsed.
GUARDED = (
    b"blockdev", b"device_add", b"drive", b"medium", b"transaction", b"snapshot", b"mirror",
    b"backup", b"human-monitor", b"getfd", b"closefd", b"eject", b"\\u", b"change", b"commit",
)  # fmt: skip
REPLY_STARTS = (b'{"return"', b'{"error"')
ANY = object()  # an unparsed command's id: its reply is the next one
WAIT_S = 1  # how long a plain command's answer is awaited in recv itself
_READ = 1 << 16
_POLLIN = select.POLLIN
_DIGITS = b"0123456789"
_WS = b" \t\r\n"
_MAX_VERDICTS = 512


def watched(data: bytes) -> bool:
    """Could these bytes name a command the policy watches?"""
    return any(word in data for word in GUARDED)


class Verdicts:
    """May a command pass unparsed?  Remembered by its bytes without digits
    (libvirt's commands differ only in the numbers of their ids).  Inside the
    object that changes neither check (no brace, quote or watched word contains
    a digit); outside it a number is a unit of its own, so the bytes themselves
    must begin and end with the object's braces."""

    def __init__(self) -> None:
        self.known: dict[bytes, bool] = {}

    def passes(self, data: bytes) -> bool:
        """The steady loop's question (written out there, inline, for speed)."""
        if data[:1] != b"{" or data.rstrip(b" \t\r\n")[-1:] != b"}":
            return False
        key = data.translate(None, _DIGITS)
        verdict = self.known.get(key)
        return self.judge(key) if verdict is None else verdict

    def judge(self, key: bytes) -> bool:
        if len(self.known) >= _MAX_VERDICTS:  # a client sending ever new commands
            self.known.clear()
        verdict = self.known[key] = plain(key) and not watched(key)
        return verdict


def is_steady(relay: RelayView) -> bool:
    """Nothing queued, half-read or owed on either side: the steady loop may run."""
    return (
        relay.client is not None and relay.client_ready and relay.qemu_open
        and not relay.queue and not relay.mine and not relay.q_out.items
        and not relay.c_out.items and relay.c_split.idle() and relay.q_split.idle()
    )  # fmt: skip


def steady_loop(relay: RelayView, poller: select.poll, ready: list[tuple[int, int]],
                timeout: int | None) -> list[tuple[int, int]]:  # fmt: skip
    """Relay while only plain commands, their answers and events happen.

    Returns the poll events left for the general loop, or [] once one was read
    here but must be finished there.  While a plain command is in flight only
    QEMU can say anything that matters (a client's next command waits its turn
    anyway), so the answer is awaited in recv itself: one poll fewer per round
    trip.  QEMU answers every object it reads and its socket closes if it dies;
    an answer slower than ``WAIT_S`` (SO_RCVTIMEO) hands the wait back to poll,
    where a client going away and QEMU's exit are seen.  With releases due
    (``timeout`` set) it hands over to the general loop once a second.
    """
    client, qemu = relay.client, relay.qemu
    assert client is not None
    cfd, qfd = client.fileno(), qemu.fileno()
    c_recvmsg, c_send, q_recv, q_send = client.recvmsg, client.send, qemu.recv, qemu.send
    poll, one_pass, known = poller.poll, relay.passing, relay.verdicts.known
    waiting = False  # for the answer to a plain command
    while waiting or len(ready) == 1:
        if waiting:
            fd, flags = qfd, 0
        else:
            fd, ev = ready[0]
            if ev != _POLLIN:
                return ready
            flags = DONTWAIT
        if fd == qfd:
            try:
                data = q_recv(_READ, flags)
            except (BlockingIOError, InterruptedError):  # slow: back to poll
                waiting = False
                ready = poll(timeout)
                continue
            except OSError:
                data = b""
            if data.count(b"\n") != 1 or data[-1:] != b"\n":
                relay.qemu_data(data)
                return []
            if data.startswith(REPLY_STARTS) and relay.inflight is one_pass:
                relay.inflight = None
            elif not data.startswith(b'{"timestamp"') or b"DEVICE_DELETED" in data:
                relay.qemu_data(data)
                return []
            try:
                sent = c_send(data, DONTWAIT)
            except OSError:  # BlockingIOError too: the general loop flushes or cleans up
                sent = 0
            if sent != len(data):
                relay.c_out.put(data[sent:])
                return []
            waiting = relay.inflight is one_pass  # that was an event: the answer is still due
        elif fd == cfd and relay.inflight is None:
            try:
                data, anc, _flags, _addr = c_recvmsg(_READ, ANC, FLAGS | DONTWAIT)
            except (BlockingIOError, InterruptedError):
                ready = poll(timeout)
                continue
            except OSError:
                data, anc = b"", []
            key = data.translate(None, _DIGITS)
            verdict = known.get(key)
            if verdict is None:
                verdict = relay.verdicts.judge(key)
            if anc or not verdict or data[:1] != b"{" or data.rstrip(_WS)[-1:] != b"}":
                relay.client_data(data, fds_of(anc))
                return []
            relay.inflight = one_pass
            try:
                sent = q_send(data, DONTWAIT)
            except OSError:
                sent = 0
            if sent != len(data):
                relay.q_out.put(data[sent:])
                return []
            waiting = True
            continue
        else:
            return ready
        if timeout is not None and monotonic() >= relay.sweep_at:
            return []  # releases are due: the general loop sweeps, even under traffic
        if not waiting:
            ready = poll(timeout)
    return ready
