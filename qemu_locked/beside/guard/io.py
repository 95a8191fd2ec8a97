"""Socket I/O for the monitor guard: reads that keep the fds passed with the
bytes (SCM_RIGHTS), and writes that never block (what a slow peer does not
take yet waits, bounded by the relay)."""

from __future__ import annotations

import _socket
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections import deque
else:  # the C type itself: `collections` costs the guard ~1.2 ms at every VM start
    from _collections import deque  # (guard/relay does the same)

_READ = 1 << 16
_MAX_FDS = 32
ANC = _socket.CMSG_SPACE(_MAX_FDS * 4)
FLAGS = getattr(_socket, "MSG_CMSG_CLOEXEC", 0x40000000)
# Every read and write but one names MSG_DONTWAIT: QEMU's socket is left in
# blocking mode so that the relay can wait for a reply inside recv itself.
DONTWAIT = _socket.MSG_DONTWAIT


def recv(sock: _socket.socket) -> tuple[bytes, list[int]]:
    data, anc, _flags, _addr = sock.recvmsg(_READ, ANC, FLAGS | DONTWAIT)
    return data, fds_of(anc)


def fds_of(anc: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds in ``recvmsg``'s ancillary data (SCM_RIGHTS)."""
    fds: list[int] = []
    for level, kind, raw in anc:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(raw) - len(raw) % 4
            fds += [int.from_bytes(raw[i : i + 4], "little") for i in range(0, usable, 4)]
    return fds


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Out:
    """Bytes (and fds) waiting for a socket to take them; never blocks."""

    def __init__(self) -> None:
        self.items: deque[tuple[bytes, list[int]]] = deque()
        self.size = 0

    def put(self, data: bytes, fds: list[int] | None = None) -> None:
        if self.items and not fds and len(self.items[-1][0]) < 1 << 16:
            last, last_fds = self.items[-1]  # one write for a reply and its line end
            self.items[-1] = (last + data, last_fds)
            self.size += len(data)
        elif data or fds:
            self.items.append((data, fds or []))
            self.size += len(data)

    def flush(self, sock: _socket.socket) -> bool:
        """False once the peer is gone."""
        while self.items:
            data, fds = self.items[0]
            try:
                if fds:
                    raw = b"".join(fd.to_bytes(4, "little") for fd in fds)
                    sent = sock.sendmsg(
                        [data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, raw)], DONTWAIT
                    )
                else:
                    sent = sock.send(data, DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            close_fds(fds)  # the peer has its own copies now
            self.size -= sent
            if sent < len(data):
                self.items[0] = (data[sent:], [])
                return True
            self.items.popleft()
        return True

    def drop(self) -> None:
        for _data, fds in self.items:
            close_fds(fds)
        self.items.clear()
        self.size = 0
