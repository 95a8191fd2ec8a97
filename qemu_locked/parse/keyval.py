"""QEMU's ``a=b,c=d`` option syntax (QemuOpts and keyval) and JSON option values.

Pure: strings in, dicts and lists out; errors name the option.
"""

from __future__ import annotations

from qemu_locked.model.errors import ArgumentError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

TRUE = frozenset({"on", "yes", "true", "y"})
FALSE = frozenset({"off", "no", "false", "n"})


def split_opts(text: str, implied: str | None = None) -> list[tuple[str, str]]:
    """QemuOpts/keyval ``a=b,c=d`` with ``,,`` for a literal comma.

    A bare first item is the ``implied`` key's value; any other bare item is
    a flag (``readonly`` means ``readonly=on``), as in QEMU.
    """
    items: list[str] = []
    buf: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == ",":
            if i + 1 < n and text[i + 1] == ",":
                buf.append(",")
                i += 2
                continue
            items.append("".join(buf))
            buf = []
        else:
            buf.append(c)
        i += 1
    items.append("".join(buf))
    out: list[tuple[str, str]] = []
    for idx, item in enumerate(items):
        key, eq, value = item.partition("=")
        if eq:
            out.append((key, value))
        elif idx == 0 and implied is not None:
            out.append((implied, item))
        elif item:
            out.append((item, "on"))
    return out


def nest(pairs: list[tuple[str, str]], option: str, drive: bool = False) -> dict[str, Any]:
    """Dotted keys (``file.filename=x``) into nested dicts, as keyval does.

    ``drive``: -drive (and ``[drive]``) syntax, where the top-level ``file=X`` is the
    image's filename even beside ``file.KEY=...`` options for the node that opens it
    (``file=a.img,file.locking=off``): both become that node's ``filename`` and keys.
    """
    if drive:
        plain = [v for k, v in pairs if k == "file"]
        if plain and any(k.startswith("file.") for k, _v in pairs):
            pairs = [("file.filename", plain[-1]) if k == "file" else (k, v) for k, v in pairs]
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = key.split(".")
        node = root
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ArgumentError(option, f"'{part}' is both a value and an object")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise ArgumentError(option, f"'{key}' is both a value and an object")
        node[parts[-1]] = value
    return root


def as_bool(value: object, option: str, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.lower()
        if low in TRUE:
            return True
        if low in FALSE:
            return False
    raise ArgumentError(option, f"{key}={value!r} is not on/off")


def load_json(text: str, option: str) -> dict[str, Any]:
    try:
        from qemu_locked.parse import jsonlite  # only for JSON values

        value = jsonlite.loads(text)
    except ValueError as exc:
        raise ArgumentError(option, f"bad JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ArgumentError(option, "JSON must be an object")
    return value


def dict_or_opts(text: str, option: str, implied: str | None) -> dict[str, Any]:
    if text.lstrip().startswith("{"):
        return load_json(text, option)
    return nest(split_opts(text, implied), option)
