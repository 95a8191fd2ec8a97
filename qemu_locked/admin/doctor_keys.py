"""doctor: what the lockspace and sanlock backends call a file, so that hosts
can be compared.

A lease is found by its key.  For a file on a network or cluster filesystem
the key is the filesystem's mount source plus the path inside it, so hosts
that mount one export at different places agree.  What a key cannot see: one
server reached by two names (``nas:/x`` and ``10.0.0.5:/x``), NFSv4 paths
relative to a pseudo-root (``nas:/`` on one host, ``nas:/srv/nfs`` on
another), one export served by two servers.  Each such mount is listed with
the key prefix it gives: the same line on every host means the same leases.
"""

from __future__ import annotations

import os

from qemu_locked.lock import keys, mounts

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

    from qemu_locked.model.config import Config

Row = tuple[str, str, str, str]  # status, check, message, fix
_SAME = "compare this line on every host: the same prefix means the same leases"


def findings(cfg: Config, paths: list[str] | None) -> Iterator[Row]:
    if cfg.backend not in ("lockspace", "sanlock"):
        return
    for m in mounts.mounts():
        if m.shared:
            prefix = keys.shared_file_key(m, m.root, _dev(m.dev)).removesuffix("/")
            yield ("OK", "file keys", f"{m.point} ({m.fstype} {m.source}): files keyed "
                   f"'{prefix}/...', wherever it is mounted; {_SAME}", "")  # fmt: skip
    for path in paths or []:
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
        except OSError:
            continue
        where = mounts.mount_of(real, st.st_dev)
        if where is not None and where.shared:
            key = keys.shared_file_key(where, mounts.inside(where, real), st.st_dev)
            yield ("OK", "file keys", f"{path}: keyed {key!r}; {_SAME}", "")
        else:
            fstype = where.fstype if where is not None else "?"
            msg = (f"{path}: on a host-local filesystem ({fstype}): files there are keyed by "
                   "their path; no other host reaches them")  # fmt: skip
            yield ("OK", "file keys", msg, "")


def _dev(text: str) -> int:
    major, _sep, minor = text.partition(":")
    return os.makedev(int(major), int(minor))
