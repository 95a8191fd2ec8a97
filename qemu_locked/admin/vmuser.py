"""The account libvirt runs QEMU as, and what it may reach.

A start fails when that user cannot run the launcher or read what the
wrapper reads, so doctor and ``libvirt enable`` check on its behalf.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

QEMU_USER = "libvirt-qemu"  # Debian's; qemu.conf `user =` overrides


class User:
    """An account's uid and groups, for mode-bit access checks on its behalf."""

    def __init__(self, name: str, uid: int, gids: set[int]) -> None:
        self.name, self.uid, self.gids = name, uid, gids

    @classmethod
    def lookup(cls, name: str) -> User | None:
        import grp
        import pwd

        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            return None
        gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
        return cls(name, pw.pw_uid, gids)

    def _bits(self, st: os.stat_result) -> int:
        if self.uid == st.st_uid:
            return (st.st_mode >> 6) & 7
        if st.st_gid in self.gids:
            return (st.st_mode >> 3) & 7
        return st.st_mode & 7

    def denied(self, path: str, want: int) -> str | None:
        """Why this user cannot reach ``path`` with ``want`` (4=r, 2=w, 1=x) bits, or None.

        Mode bits only (ACLs and capabilities are not read)."""
        real = os.path.realpath(path)
        parts = Path(real).parts
        for i in range(1, len(parts)):
            parent = str(Path(*parts[:i]))
            try:
                st = os.stat(parent)
            except OSError as exc:
                return f"{parent}: {exc.strerror}"
            if self.uid != 0 and not self._bits(st) & 1:
                return f"{parent} is not searchable (x) by {self.name}"
        try:
            st = os.stat(real)
        except OSError as exc:
            return f"{real}: {exc.strerror}"
        have = 7 if self.uid == 0 else self._bits(st)
        if self.uid == 0 and want & 1 and not st.st_mode & 0o111 and not stat.S_ISDIR(st.st_mode):
            have = 6
        if want & ~have:
            names = "".join(c for c, b in (("r", 4), ("w", 2), ("x", 1)) if want & b)
            return f"{real} is not {names} for {self.name} (mode {stat.filemode(st.st_mode)})"
        return None


def launcher_denied(path: str, user: User) -> str | None:
    """Why ``user`` cannot run the launcher at ``path`` (the script, its interpreter
    and this package, each with their parent directories), or None."""
    try:
        with open(path, "rb") as f:
            first = f.readline(4096).decode(errors="replace")
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    interp = first[2:].split()[0] if first.startswith("#!") and first[2:].split() else ""
    package = str(Path(__file__).resolve().parents[1])
    need = [(path, 5), (package, 5), (os.path.join(package, "start", "wrapper.py"), 4)]
    if interp:
        need.append((interp, 5))
    for target, bits in need:
        why = user.denied(target, bits)
        if why:
            return why
    return None
