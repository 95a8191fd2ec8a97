"""The audit trail: one line in the system log per refusal, lock and keeper timeout.

A datagram to the syslog socket (``audit_socket``, /dev/log: journald or
rsyslog), RFC 3164 style without a timestamp (the daemon stamps time and host
on receipt, as it does for glibc's ``syslog()``)::

    <28>qemu-locked[4242]: action=refused path=/x.img key=file:/x.img mode=exclusive ...

Facility ``daemon``: qemu-locked works for the VM service (libvirt's daemon
starts it; the supervisor and the keeper live beside QEMU), and Debian's
rsyslog writes ``daemon.*`` to /var/log/syslog, where an operator looks;
``auth`` is for logins and credentials, which a lock refusal is not.

Recording never blocks the VM nor fails what it records: the send is
non-blocking, and any error (no listener, a full queue, a security policy
saying no) drops the line.  Imported only when there is something to record,
and then only ``_socket`` with it.
"""

from __future__ import annotations

from qemu_locked.model.value import frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.model.config import Config

TAG = "qemu-locked"
_DAEMON = 3  # syslog facility
# Severity per action: a refusal is a warning, a VM killed or left unlocked an
# error, a lock taken or let go information.
_SEVERITY = {"refused": 4, "timeout": 3, "failed": 3}
_INFO = 6
# In this order on every line; ``log --json`` gives every one (null when absent).
FIELDS = ("action", "path", "key", "mode", "guest", "pid", "host", "holder", "origin", "detail")


@frozen
class Event:
    """One line of the trail.  ``pid``: the VM's (QEMU's) process; ``mode``: what
    this VM wanted or holds; ``holder``: who holds it instead (a refusal, a
    timeout); ``time``: when the log daemon received it (read back only)."""

    action: str
    path: str | None = None
    key: str | None = None
    mode: str | None = None
    guest: str | None = None
    pid: int | None = None
    host: str | None = None
    holder: str | None = None
    origin: str | None = None
    detail: str | None = None
    time: float | None = None


def _plain(c: str) -> bool:
    if " " < c < "\x7f":
        return c not in '"\\'
    return c >= "\xa0" and not "\ud800" <= c <= "\udfff"


def quote(value: str) -> str:
    """A value as one word: as it is, else in double quotes, with ``\\\\``, ``\\"``,
    ``\\xHH`` for control characters (below 80) and the bytes of a path that are
    not UTF-8 (surrogate escapes, 80 and up), ``\\u00HH`` for C1 controls: a line
    is one line of valid UTF-8."""
    if value and all(_plain(c) for c in value):
        return value
    out = []
    for c in value:
        if c in '"\\':
            out.append("\\" + c)
        elif c < " " or c == "\x7f":
            out.append(f"\\x{ord(c):02x}")
        elif "\x80" <= c < "\xa0":  # C1 controls: \\x80 and up are a path's raw bytes
            out.append(f"\\u{ord(c):04x}")
        elif "\udc80" <= c <= "\udcff":
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif "\ud800" <= c <= "\udfff":
            out.append("\ufffd")  # no byte a path could have: UTF-8 cannot carry it
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def format_event(ev: Event) -> str:
    """``action=... path=...``: the fields that have a value, in FIELDS order."""
    words = []
    for name in FIELDS:
        value = getattr(ev, name)
        if value is not None and value != "":
            words.append(f"{name}={quote(str(value))}")
    return " ".join(words)


def parse_event(message: str, time: float | None = None) -> Event | None:
    """The Event a line of ours carries; None for any other text."""
    try:
        fields = _words(message)
    except ValueError:  # a bad \\x escape: not a line of ours
        return None
    if fields is None or "action" not in fields:
        return None
    pid = fields.get("pid", "")
    kept = {k: v for k, v in fields.items() if k in FIELDS and k != "pid"}
    return Event(pid=int(pid) if pid.isdigit() else None, time=time, **kept)


def _words(message: str) -> dict[str, str] | None:
    fields: dict[str, str] = {}
    i, n = 0, len(message)
    while i < n:
        if message[i] == " ":
            i += 1
            continue
        eq = message.find("=", i)
        if eq < 0:
            return None
        name = message[i:eq]
        if " " in name:
            return None
        i = eq + 1
        if message[i : i + 1] == '"':
            out: list[str] = []
            i += 1
            while i < n and message[i] != '"':
                c = message[i]
                if c == "\\" and message[i + 1 : i + 2] == "x":
                    code = int(message[i + 2 : i + 4], 16)
                    out.append(chr(code if code < 0x80 else 0xDC00 + code))
                    i += 4
                    continue
                if c == "\\" and message[i + 1 : i + 2] == "u":
                    out.append(chr(int(message[i + 2 : i + 6], 16)))
                    i += 6
                    continue
                if c == "\\":
                    i += 1
                out.append(message[i : i + 1])
                i += 1
            if i >= n:
                return None  # unterminated: not a line of ours
            value = "".join(out)
            i += 1
        else:
            end = message.find(" ", i)
            end = n if end < 0 else end
            value, i = message[i:end], end
        fields[name] = value
    return fields


def datagram(ev: Event, sender: int) -> bytes:
    """What goes to the socket: ``<PRI>qemu-locked[SENDER]: FIELDS``."""
    pri = _DAEMON * 8 + _SEVERITY.get(ev.action, _INFO)
    return f"<{pri}>{TAG}[{sender}]: {format_event(ev)}".encode()


def send(events: list[Event], config: Config) -> None:
    """Each event as one datagram to ``config.audit_socket``, or nowhere."""
    if not config.audit or not config.audit_socket or not events:
        return
    import _socket
    import os

    try:
        sock = _socket.socket(
            _socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_NONBLOCK | _socket.SOCK_CLOEXEC
        )
    except OSError:
        return
    try:
        for ev in events:
            try:
                sock.sendto(datagram(ev, os.getpid()), config.audit_socket)
            except OSError:
                # ENOENT, ECONNREFUSED (nobody listens), EAGAIN (its queue is full),
                # EACCES (AppArmor, SELinux), EMSGSIZE: the line is dropped, never the VM.
                pass
    finally:
        sock.close()
