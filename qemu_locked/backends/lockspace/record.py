"""A holder's record in a lease file: who holds it (host, pid, guest...), as it said.

At ``slot * RECORD_SIZE`` of the lease file, ``key=value`` lines after a magic
line; trusted only while its slot byte is locked (:mod:`.leases`).  Readers
ignore fields they do not know, so a field added later (``path``) is harmless
to older readers.
"""

from __future__ import annotations

from qemu_locked.model.value import frozen

RECORD_SIZE = 512
MAGIC = b"qemu-locked-record 1\n"
_FIELDS = ("host", "pid", "boot", "guest", "uuid", "mode", "since", "key")
# Optional, last: the path the VM was given for the resource (/dev/HostVG/vol),
# written only when the record has room for all of it.
_PATH = "path"


@frozen
class Record:
    """What a holder says about itself; trusted only while its slot is locked."""

    slot: int
    host: str
    pid: int
    boot: str
    guest: str
    uuid: str
    mode: str
    since: float
    key: str
    live: bool = True
    path: str = ""  # as the holder was given it; "" from older writers

    def describe(self) -> str:
        text = f"pid {self.pid}"
        if self.guest:
            text += f", guest '{self.guest}'"
        return text + f" on host '{self.host}'"


def _clean(value: str) -> str:
    return value.replace("\n", " ").replace("\0", " ")[:200]


def encode_record(fields: dict[str, str]) -> bytes:
    body = MAGIC + b"".join(
        f"{k}={_clean(fields.get(k, ''))}\n".encode("utf-8", "surrogateescape") for k in _FIELDS
    )
    path = fields.get(_PATH, "").encode("utf-8", "surrogateescape")
    line = b"path=" + path + b"\n"
    if path and b"\n" not in path and b"\0" not in path and len(body + line) <= RECORD_SIZE:
        body += line  # a cut path would name another file: all of it or none
    return body[:RECORD_SIZE].ljust(RECORD_SIZE, b"\0")


def decode_record(slot: int, raw: bytes, live: bool = True) -> Record | None:
    """Parse one record; anything malformed is ignored, never trusted."""
    if not raw.startswith(MAGIC):
        return None
    text = raw[len(MAGIC) : RECORD_SIZE].split(b"\0", 1)[0].decode("utf-8", "replace")
    values: dict[str, str] = {}
    for line in text.split("\n"):
        key, eq, value = line.partition("=")
        if eq and (key in _FIELDS or key == _PATH):
            values[key] = value
    try:
        pid = int(values.get("pid", ""))
        since = float(values.get("since", ""))
    except ValueError:
        return None
    return Record(slot, values.get("host", "?"), pid, values.get("boot", ""),
                  values.get("guest", ""), values.get("uuid", ""),
                  values.get("mode", "?"), since, values.get("key", ""), live,
                  values.get(_PATH, ""))  # fmt: skip
