"""AppArmor: qemu-locked's rules inside libvirt's per-domain profiles.

Debian's libvirt confines each QEMU as ``libvirt-<uuid>``, a profile built on
``abstractions/libvirt-qemu``, which ends by including the admin's own
``local/abstractions/libvirt-qemu`` (created empty by libvirt's postinst).
The package ships our rules as ``abstractions/qemu-locked``; ``libvirt enable``
puts one marked block in the admin's file that includes them (plus the lines
only this host's settings need), and ``libvirt disable --all`` and the
package's purge take the block out again.  Nothing else in the admin's file is
touched.  libvirt compiles a domain's profile at each start, so the next start
of every domain sees the change; running domains keep theirs.
"""

from __future__ import annotations

import os

from qemu_locked.model.errors import BackendError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.model.config import Config

APPARMOR_D = "/etc/apparmor.d"
LIBVIRT_ABSTRACTION = "abstractions/libvirt-qemu"
LOCAL = "local/abstractions/libvirt-qemu"
OURS = "abstractions/qemu-locked"
BEGIN = "# BEGIN qemu-locked: added by `qemu-lockctl libvirt enable`; removed by `disable --all`"
END = "# END qemu-locked"
PACKAGED_LAUNCHER = "/usr/bin/qemu-locked"
PACKAGED_LOCKSPACE = "/var/lib/qemu-locked/lockspace"
SANLOCK_SOCKET = "/run/sanlock/sanlock.sock"
# Characters an AppArmor path rule would read as a glob, a quote or an escape.
_SPECIAL = set('*?[]{}^"\\\n\0')


def confines_qemu(root: str = APPARMOR_D) -> bool:
    """Are libvirt's QEMU profiles installed here (Debian's, Ubuntu's libvirt)?"""
    return os.path.isfile(os.path.join(root, LIBVIRT_ABSTRACTION))


def _plain(path: str, what: str) -> str:
    if _SPECIAL & set(path):
        raise UsageError(f"{what} {path!r}: has characters an AppArmor rule cannot state plainly")
    return path


def block(config: Config, launcher: str) -> list[str]:
    """The marked block for this host: the package's rules, and what its settings
    add to them (another launcher, another lockspace, the sanlock daemon)."""
    lines = [BEGIN, f"include if exists <{OURS}>"]
    if launcher != PACKAGED_LAUNCHER:
        import qemu_locked

        package = os.path.dirname(os.path.realpath(qemu_locked.__file__))
        package = _plain(package, "package")
        lines += [
            "# the launcher of this installation (not the package's) and its Python package",
            f'"{_plain(launcher, "launcher")}" rix,',
            f'"{package}/" r,',
            f'"{package}/**" r,',
        ]
    lockspace = os.path.realpath(config.lockspace_dir)
    if lockspace != PACKAGED_LOCKSPACE:
        lockspace = _plain(lockspace, "lockspace_dir")
        lines += [
            "# lockspace_dir is not the package's: its lease files, created, opened and locked",
            f'"{lockspace}/" r,',
            f'"{lockspace}/[0-9a-f]*.lease" rwk,',
        ]
    if config.backend == "sanlock":
        lines += [
            "# backend = sanlock: the wrapper asks the sanlock daemon",
            f"{SANLOCK_SOCKET} rw,",
        ]
    return [*lines, END]


def _split(text: str) -> tuple[list[str], list[str] | None]:
    """The admin's lines outside our block, and our block (None when absent)."""
    lines = text.splitlines()
    if BEGIN not in lines:
        return lines, None
    start = lines.index(BEGIN)
    end = lines.index(END, start) if END in lines[start:] else len(lines) - 1
    return lines[:start] + lines[end + 1 :], lines[start : end + 1]


def _read(path: str) -> tuple[list[str], list[str] | None] | None:
    """:func:`_split` of the admin's file, or None when there is no such file."""
    try:
        with open(path, encoding="utf-8") as f:
            return _split(f.read())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BackendError(f"{path}: {exc.strerror}") from None


def current(root: str = APPARMOR_D) -> list[str] | None:
    """The block now in the admin's file, or None."""
    found = _read(os.path.join(root, LOCAL))
    return None if found is None else found[1]


def _write(path: str, lines: list[str]) -> None:
    """Replace the admin's file in one rename, keeping its owner and mode."""
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    tmp = f"{path}.qemu-lockctl.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, ("\n".join(lines) + "\n").encode() if lines else b"")
            if st is not None:
                os.fchmod(fd, st.st_mode & 0o7777)
                os.fchown(fd, st.st_uid, st.st_gid)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise BackendError(
            f"{path}: {exc.strerror}: cannot put qemu-locked's AppArmor rules there (run as root)"
        ) from None


def install(config: Config, launcher: str, root: str = APPARMOR_D) -> str | None:
    """Put (or refresh) our block in the admin's file; what was done, or None
    when libvirt confines nothing with AppArmor here or the block is current."""
    if not confines_qemu(root):
        return None
    path = os.path.join(root, LOCAL)
    want = block(config, launcher)
    found = _read(path)
    if found is None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    others, ours = found or ([], None)
    if ours == want:
        return None
    _write(path, [*others, *want])
    missing = "" if os.path.isfile(os.path.join(root, OURS)) else (
        f"; {os.path.join(root, OURS)} is missing: install the package, or copy "
        "confinement/apparmor/qemu-locked there"
    )  # fmt: skip
    verb = "refreshed" if ours is not None else "added"
    return f"AppArmor: {verb} qemu-locked's rules in {path} (a marked block){missing}"


def uninstall(root: str = APPARMOR_D) -> str | None:
    """Take our block out of the admin's file; what was done, or None."""
    path = os.path.join(root, LOCAL)
    found = _read(path)
    if found is None or found[1] is None:
        return None
    _write(path, found[0])
    return f"AppArmor: removed qemu-locked's rules from {path}"
