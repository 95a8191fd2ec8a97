"""A small JSON reader for QEMU option values.

Not :mod:`json`: that imports ``re`` and costs ~9-12 ms here, while every
libvirt start passes its disks as JSON.  It also follows QEMU's own parser
where that differs from RFC 8259: single-quoted strings are accepted, and a
duplicate key is an error.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_WS = " \t\n\r"
_ESC = {
    '"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
}  # fmt: skip
_NUM = "+-0123456789.eE"
_MAX_DEPTH = 64


class JSONError(ValueError):
    pass


def loads(text: str) -> Any:
    value, pos = _value(text, _skip(text, 0), 0)
    pos = _skip(text, pos)
    if pos != len(text):
        raise JSONError(f"unexpected {text[pos]!r} at offset {pos}")
    return value


def _skip(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] in _WS:
        i += 1
    return i


def _value(s: str, i: int, depth: int) -> tuple[Any, int]:
    if depth > _MAX_DEPTH:
        raise JSONError("nested too deeply")
    if i >= len(s):
        raise JSONError("unexpected end of input")
    c = s[i]
    if c == "{":
        return _object(s, i + 1, depth + 1)
    if c == "[":
        return _array(s, i + 1, depth + 1)
    if c in "\"'":
        return _string(s, i + 1, c)
    for word, val in (("true", True), ("false", False), ("null", None)):
        if s.startswith(word, i):
            return val, i + len(word)
    j = i
    while j < len(s) and s[j] in _NUM:
        j += 1
    if j == i:
        raise JSONError(f"unexpected {c!r} at offset {i}")
    tok = s[i:j]
    try:
        if any(ch in tok for ch in ".eE"):
            return float(tok), j
        return int(tok), j
    except ValueError:
        raise JSONError(f"bad number {tok!r}") from None


def _object(s: str, i: int, depth: int) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    i = _skip(s, i)
    if i < len(s) and s[i] == "}":
        return out, i + 1
    while True:
        if i >= len(s) or s[i] not in "\"'":
            raise JSONError(f"expected a key at offset {i}")
        key, i = _string(s, i + 1, s[i])
        i = _skip(s, i)
        if i >= len(s) or s[i] != ":":
            raise JSONError(f"expected ':' at offset {i}")
        if key in out:
            raise JSONError(f"duplicate key {key!r}")
        out[key], i = _value(s, _skip(s, i + 1), depth)
        i = _skip(s, i)
        if i < len(s) and s[i] == ",":
            i = _skip(s, i + 1)
            continue
        if i < len(s) and s[i] == "}":
            return out, i + 1
        raise JSONError(f"expected ',' or '}}' at offset {i}")


def _array(s: str, i: int, depth: int) -> tuple[list[Any], int]:
    out: list[Any] = []
    i = _skip(s, i)
    if i < len(s) and s[i] == "]":
        return out, i + 1
    while True:
        val, i = _value(s, i, depth)
        out.append(val)
        i = _skip(s, i)
        if i < len(s) and s[i] == ",":
            i = _skip(s, i + 1)
            continue
        if i < len(s) and s[i] == "]":
            return out, i + 1
        raise JSONError(f"expected ',' or ']' at offset {i}")


def _string(s: str, i: int, quote: str) -> tuple[str, int]:
    parts: list[str] = []
    n = len(s)
    start = i
    while True:
        # str.find runs in C: a per-character Python loop cost ~10 us per disk.
        q = s.find(quote, i)
        b = s.find("\\", i)
        j = n if q < 0 else q
        if 0 <= b < j:
            j = b
        chunk = s[i:j]
        if not chunk.isprintable():  # rare: look for the control characters JSON forbids
            for k, c in enumerate(chunk):
                if c < " ":
                    raise JSONError(f"control character in string at offset {i + k}")
        parts.append(chunk)
        if j >= n:
            raise JSONError(f"unterminated string at offset {start - 1}")
        if s[j] == quote:
            return "".join(parts), j + 1
        if j + 1 >= n:
            raise JSONError("unterminated escape")
        e = s[j + 1]
        if e == "u":
            hexpart = s[j + 2 : j + 6]
            if len(hexpart) != 4 or any(h not in "0123456789abcdefABCDEF" for h in hexpart):
                raise JSONError(f"bad \\u escape at offset {j}")
            code = int(hexpart, 16)
            i = j + 6
            if 0xD800 <= code < 0xDC00 and s.startswith("\\u", i):
                low = s[i + 2 : i + 6]
                if len(low) == 4 and all(h in "0123456789abcdefABCDEF" for h in low):
                    lo = int(low, 16)
                    if 0xDC00 <= lo < 0xE000:
                        code = 0x10000 + ((code - 0xD800) << 10) + (lo - 0xDC00)
                        i += 6
            parts.append(chr(code))
            continue
        if e not in _ESC:
            raise JSONError(f"bad escape \\{e} at offset {j}")
        parts.append(_ESC[e])
        i = j + 2
