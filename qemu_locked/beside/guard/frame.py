"""QMP framing for the monitor guard: a byte stream cut into top-level JSON units.

QEMU's own streamer counts braces and brackets outside strings (single- and
double-quoted) and hands over a value when both counts return to zero; this
splitter cuts at the same places, so the guard sees the commands QEMU would.
Bytes are never changed: a unit's ``data`` is exactly what came in, and the
file descriptors that arrived with it (SCM_RIGHTS) stay attached to it.

Memory is bounded: a unit is kept only up to ``limit`` bytes; past that the
splitter drops the rest and reports an OVERSIZE unit (the guard answers such a
command itself: it cannot check it).  QEMU's
side is cut by :class:`Lines` instead, as libvirt cuts it.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

OBJECT = "object"  # a whole unit, ``data`` holds all of it
OTHER = "other"  # a top-level value that is not an object, or stray bytes
SPACE = "space"  # whitespace between units (QEMU ends each line with \r\n)
PIECE = "piece"  # part of an oversized line, streamed on (Lines)
OVERSIZE = "oversize"  # the end of an oversized unit
HEAD = "head"  # the start of an oversized line (Lines)

_WS = frozenset(b" \t\r\n")
_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")
_QUOTES = frozenset(b"\"'")
_BACKSLASH = 0x5C


class Unit:
    __slots__ = ("data", "fds", "kind")

    def __init__(self, kind: str, data: bytes, fds: list[int]) -> None:
        self.kind = kind
        self.data = data
        self.fds = fds


class Splitter:
    """Feed bytes (and the fds that came with them); take complete units out."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._size = 0  # bytes of the current unit seen so far (kept or not)
        self._depth = 0
        self._quote = 0  # the quote byte while inside a string
        self._escape = False
        self._fds: list[int] = []  # for the unit in progress (or the next one)
        self._in_value = False  # a top-level scalar or stray bytes
        self._over = False

    def pending(self) -> int:
        return len(self._buf)

    def idle(self) -> bool:
        """Between units: the next byte starts a new one."""
        return not (self._buf or self._depth or self._quote or self._in_value or self._escape
                    or self._fds)  # fmt: skip

    def take_fds(self) -> list[int]:
        """Fds of a unit that never completed (the peer went away): the caller closes them."""
        fds, self._fds = self._fds, []
        return fds

    def feed(self, data: bytes, fds: list[int] | None = None) -> list[Unit]:
        if fds:
            self._fds.extend(fds)
        whole = self._whole(data)
        if whole is not None:
            return whole
        out: list[Unit] = []
        i, n = 0, len(data)
        start = 0  # where the bytes of the current unit begin in ``data``
        while i < n:
            if self._quote:
                i = self._scan_string(data, i, n)
                continue
            c = data[i]
            if self._depth == 0 and not self._in_value:
                if c in _WS:
                    j = i
                    while j < n and data[j] in _WS:
                        j += 1
                    self._flush_before(data, start, i, out)
                    out.append(Unit(SPACE, bytes(data[i:j]), []))
                    start = i = j
                    continue
                self._flush_before(data, start, i, out)
                start = i
                if c in _OPEN:
                    self._depth = 1
                elif c in _QUOTES:
                    self._in_value = True
                    self._quote = c
                elif c in _CLOSE:
                    i += 1
                    self._append(data, start, i, out)
                    start = i
                    self._emit(OTHER, out)
                    continue
                else:
                    self._in_value = True
                i += 1
                continue
            if self._in_value and self._depth == 0:
                if c in _WS or c in _OPEN or c in _CLOSE:
                    self._append(data, start, i, out)
                    start = i
                    self._emit(OTHER, out)
                    continue
                if c in _QUOTES:
                    self._quote = c
                i += 1
                continue
            if c in _QUOTES:
                self._quote = c
            elif c in _OPEN:
                self._depth += 1
            elif c in _CLOSE:
                self._depth -= 1
                if self._depth == 0:
                    i += 1
                    self._append(data, start, i, out)
                    start = i
                    self._emit(OVERSIZE if self._over else OBJECT, out)
                    continue
            i += 1
        self._append(data, start, n, out)
        return out

    def _whole(self, data: bytes) -> list[Unit] | None:
        """The common case, found with a few C-speed scans instead of a loop per
        byte: the splitter is idle and ``data`` is one flat object (no nested
        object or array outside strings, no escapes, no single quotes) and its
        line end.  None: take the long way."""
        if self._buf or self._depth or self._quote or self._in_value or self._escape:
            return None
        body = data.rstrip(b" \t\r\n")
        if len(body) > self.limit or body[:1] != b"{" or body[-1:] != b"}":
            return None
        if b"\\" in body or b"'" in body:
            return None
        parts = body.split(b'"')
        if len(parts) % 2 == 0:
            return None
        outside = b"".join(parts[0::2])
        if (
            outside.count(b"{") != 1
            or outside.count(b"}") != 1
            or b"[" in outside
            or b"]" in outside
        ):
            return None
        out = [Unit(OBJECT, body, self._fds)]
        self._fds = []
        if len(body) < len(data):
            out.append(Unit(SPACE, data[len(body) :], []))
        return out

    def _scan_string(self, data: bytes, i: int, n: int) -> int:
        if self._escape:
            self._escape = False
            return i + 1
        q = data.find(self._quote, i)
        b = data.find(_BACKSLASH, i)
        end = q if b < 0 or (0 <= q < b) else b
        if end < 0:
            return n
        if end == b:
            if end + 1 >= n:
                self._escape = True
                return n
            return end + 2
        self._quote = 0
        return end + 1

    def _append(self, data: bytes, start: int, end: int, out: list[Unit]) -> None:
        """Keep ``data[start:end]`` for the current unit, within the limit."""
        if end <= start:
            return
        self._size += end - start
        if not self._over and self._size <= self.limit:
            self._buf += data[start:end]
        elif not self._over:
            self._over = True
            self._buf.clear()

    def _flush_before(self, data: bytes, start: int, i: int, out: list[Unit]) -> None:
        if i > start:
            self._append(data, start, i, out)

    def _emit(self, kind: str, out: list[Unit]) -> None:
        out.append(Unit(kind, bytes(self._buf), self._fds))
        self._buf = bytearray()
        self._fds = []
        self._size = 0
        self._depth = 0
        self._in_value = False
        self._over = False


def plain(data: bytes) -> bool:
    """Is ``data`` one object and its line end, for certain?  Strings closed and
    free of escapes and single quotes, so that the braces and brackets outside
    them are all there is to count; QEMU's streamer counts each kind apart and
    hands over a unit when both return to zero, so they may reach zero only at
    the last byte and never go below.  False only means: cut it the long way.
    (The relay remembers the verdict; this runs once per kind of command.)"""
    body = data.rstrip(b" \t\r\n")
    if body[:1] != b"{" or body[-1:] != b"}" or b"\\" in body or b"'" in body:
        return False
    parts = body.split(b'"')
    if len(parts) % 2 == 0:
        return False
    braces = brackets = 0
    last = len(body) - 1
    at = 0
    for i, part in enumerate(parts):
        if i % 2:  # a string, quotes included
            at += len(part) + 2
            continue
        for c in part:
            if c == 0x7B:
                braces += 1
            elif c == 0x7D:
                braces -= 1
            elif c == 0x5B:
                brackets += 1
            elif c == 0x5D:
                brackets -= 1
            else:
                at += 1
                continue
            if brackets < 0 or (braces == brackets == 0 and at != last):  # braces: zero first
                return False
            at += 1
    return braces == brackets == 0


def _dump_str(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f" or "\ud800" <= ch <= "\udfff":  # lone surrogates too
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def dumps(value: object, depth: int = 0) -> str:
    """JSON text for what the guard says itself (its replies echo the client's id)."""
    if depth > 64:
        return "null"
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _dump_str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        import math

        return repr(value) if math.isfinite(value) else "null"
    if isinstance(value, dict):
        items = (f"{_dump_str(str(k))}: {dumps(v, depth + 1)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(dumps(v, depth + 1) for v in value) + "]"
    return _dump_str(str(value))


class Lines:
    """QEMU's side, cut as libvirt cuts it: one message per line (QEMU escapes
    control characters inside strings, so a message never spans lines).

    A line over ``limit`` is handed on as it comes: a HEAD piece (its first
    ``limit`` bytes, to judge it by), then PIECEs.
    """

    def __init__(self, limit: int = 1 << 20) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._long = False

    def pending(self) -> int:
        return len(self._buf)

    def idle(self) -> bool:
        return not self._buf and not self._long

    def feed(self, data: bytes) -> list[Unit]:
        out: list[Unit] = []
        start = 0
        while (nl := data.find(b"\n", start)) >= 0:
            line = data[start : nl + 1]
            start = nl + 1
            if self._long:
                out.append(Unit(PIECE, line, []))
                self._long = False
            elif self._buf:
                self._buf += line
                out.append(Unit(OBJECT, bytes(self._buf), []))
                self._buf.clear()
            else:
                out.append(Unit(OBJECT, line, []))
        rest = data[start:]
        if rest and self._long:
            out.append(Unit(PIECE, rest, []))
        elif rest:
            self._buf += rest
            if len(self._buf) > self.limit:
                out.append(Unit(HEAD, bytes(self._buf), []))
                self._buf.clear()
                self._long = True
        return out


def parse_object(data: bytes) -> dict[str, Any]:
    """A unit as a JSON object (QEMU's dialect: single quotes too); {} if it is not one."""
    from qemu_locked.parse import jsonlite

    try:
        obj = jsonlite.loads(data.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}
