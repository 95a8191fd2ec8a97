"""The file names a qcow2 header makes QEMU open (pure: bytes in, names out).

* the backing file: ``backing_file_offset`` (byte 8) / ``backing_file_size``
  (byte 16), a name inside the first cluster;
* the external data file (``qemu-img create -o data_file=...``): header
  extension 0x44415441 ("DATA"); extensions follow the header, whose length
  is at byte 100 in version 3 (version 2 headers are 72 bytes and have none).

Each extension is ``u32 type, u32 length, data`` padded to 8 bytes, ending
with type 0.  All fields are big-endian.
"""

from __future__ import annotations

from qemu_locked.model.value import frozen

MAGIC = b"QFI\xfb"
HEADER_V2 = 72
EXT_DATA_FILE = 0x44415441
MAX_CLUSTER = 2 << 20  # QEMU's largest cluster size
_MAX_NAME = 4096


@frozen
class Names:
    backing: str | None
    data_file: str | None


def _u32(buf: bytes, at: int) -> int:
    return int.from_bytes(buf[at : at + 4], "big")


def cluster_size(head: bytes) -> int:
    """How much of the file holds the header, its extensions and the backing name."""
    if len(head) < HEADER_V2 or head[:4] != MAGIC:
        return 0
    bits = _u32(head, 20)
    return min(1 << bits, MAX_CLUSTER) if 9 <= bits <= 21 else 0


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", errors="surrogateescape")


def names(buf: bytes) -> Names | None:
    """The backing and data file names in a qcow2 image's first cluster ``buf``;
    None when ``buf`` is not a qcow2 header."""
    if len(buf) < HEADER_V2 or buf[:4] != MAGIC:
        return None
    version = _u32(buf, 4)
    offset, size = int.from_bytes(buf[8:16], "big"), _u32(buf, 16)
    backing = None
    if offset and 0 < size <= 1023 and offset + size <= len(buf):
        backing = _name(buf[offset : offset + size])
    data_file = None
    pos = _u32(buf, 100) if version >= 3 and len(buf) >= 104 else HEADER_V2
    while version >= 3 and pos + 8 <= len(buf):
        kind, length = _u32(buf, pos), _u32(buf, pos + 4)
        if kind == 0:
            break
        if kind == EXT_DATA_FILE and 0 < length <= _MAX_NAME:
            data_file = _name(buf[pos + 8 : pos + 8 + length])
        pos += 8 + ((length + 7) & ~7)
    return Names(backing, data_file)
