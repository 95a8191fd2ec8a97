"""QEMU's ``-readconfig`` file format: ``[group "id"]`` sections of ``key = "value"``.

Pure: the text comes in (the caller reads the file), the groups go out.
"""

from __future__ import annotations

from qemu_locked.model.errors import ArgumentError


def groups(text: str, arg: str, path: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """(group name, [(key, value)...]) per section, in file order; an id
    (``[drive "d0"]``) becomes the section's first ``id`` pair."""
    out: list[tuple[str, list[tuple[str, str]]]] = []
    opts: list[tuple[str, str]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            head = line[1:-1].split(None, 1)
            if not head:
                raise ArgumentError(arg, f"{path}:{lineno}: empty group")
            opts = []
            out.append((head[0], opts))
            if len(head) > 1:
                ident = head[1].strip()
                if len(ident) < 2 or ident[0] != '"' or ident[-1] != '"':
                    raise ArgumentError(arg, f"{path}:{lineno}: bad group id")
                opts.append(("id", ident[1:-1]))
            continue
        key, eq, val = line.partition("=")
        val = val.strip()
        if not eq or not out or len(val) < 2 or val[0] != '"' or val[-1] != '"':
            raise ArgumentError(arg, f"{path}:{lineno}: parse error")
        opts.append((key.strip(), val[1:-1]))
    return out
