"""The account libvirt runs QEMU as, and what it may reach.

A start fails when that user cannot run the launcher or read what the
wrapper reads, so doctor and ``libvirt enable`` check on its behalf.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

QEMU_USER = "libvirt-qemu"  # Debian's; qemu.conf `user =` overrides
LIBVIRT_QEMU_CONF = "/etc/libvirt/qemu.conf"
LIBVIRT_LOCKD_CONF = "/etc/libvirt/qemu-lockd.conf"


def read_libvirt_conf(path: str) -> dict[str, str] | None:
    """``key = value`` settings of a libvirt .conf file (quotes removed); None if absent."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        key, eq, value = line.partition("=")
        if eq and key.strip().isidentifier():
            out[key.strip()] = value.strip().strip('"')
    return out


def vm_user_name() -> str:
    """The account libvirt runs QEMU as: qemu.conf ``user``, else Debian's default."""
    return (read_libvirt_conf(LIBVIRT_QEMU_CONF) or {}).get("user", QEMU_USER)


def lockd_takes_disks() -> str | None:
    """Why libvirt's own lock manager refuses every qemu-locked start, or None.

    lock_manager = "lockd" with direct disk leases (the default) makes virtlockd
    lock byte 0 of each disk before QEMU starts: the very byte qemu-locked
    needs, so every start under qemu-locked with a disk is refused."""
    conf = read_libvirt_conf(LIBVIRT_QEMU_CONF) or {}
    if conf.get("lock_manager", "") != "lockd":
        return None
    lockd = read_libvirt_conf(LIBVIRT_LOCKD_CONF) or {}
    if lockd.get("auto_disk_leases", "1") == "0" or lockd.get("file_lockspace_dir"):
        return None
    return (
        f'{LIBVIRT_QEMU_CONF} sets lock_manager = "lockd": virtlockd locks byte 0 of each '
        "disk before QEMU starts, so every domain whose emulator is qemu-locked is refused"
    )


LOCKD_FIX = (
    f"comment out lock_manager in {LIBVIRT_QEMU_CONF} (qemu-locked replaces it) and restart "
    f"libvirtd, or set file_lockspace_dir in {LIBVIRT_LOCKD_CONF}"
)


class User:
    """An account's uid and groups, for mode-bit access checks on its behalf."""

    def __init__(self, name: str, uid: int, gids: set[int], gid: int | None = None) -> None:
        self.name, self.uid, self.gids = name, uid, gids
        self.gid = min(gids) if gid is None else gid  # primary group

    @classmethod
    def lookup(cls, name: str) -> User | None:
        """By name, or ``+UID`` as qemu.conf writes a bare uid."""
        import grp
        import pwd

        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            if name.startswith("+") and name[1:].isdigit():
                return cls(name, int(name[1:]), {int(name[1:])})
            return None
        gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
        return cls(name, pw.pw_uid, gids, pw.pw_gid)

    def _bits(self, st: os.stat_result) -> int:
        from qemu_locked.lock.policy import mode_bits

        return mode_bits(st, self.uid, self.gids)

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
