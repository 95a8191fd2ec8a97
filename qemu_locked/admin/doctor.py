"""``qemu-lockctl doctor``: is this host set up right?

Each check yields findings (OK / WARN / FAIL, what was seen, how to fix
it).  Checks never change anything except a short-lived test file they
create (``O_EXCL``) and remove in a directory under test; they never touch
a disk image.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qemu_locked.admin.doctor_libvirt import check_libvirt
from qemu_locked.admin.finding import FAIL, OK, WARN, Finding
from qemu_locked.admin.trial_start import INSTALL_FIX, check_start
from qemu_locked.admin.vmuser import QEMU_USER, User, launcher_denied, vm_user_name
from qemu_locked.model import config as _config
from qemu_locked.model.errors import QemuLockedError

DEFAULT_IMAGE_DIRS = ("/var/lib/libvirt/images",)
# Filesystems that forward OFD locks to a lock server shared by every client.
_SHARED_FS = ("nfs", "nfs4", "ceph", "gpfs", "glusterfs", "fuse.glusterfs", "ocfs2", "gfs2")
CONFIG_FIX = "fix that setting (man qemu-locked, CONFIGURATION; docs/configuration.md)"


# -- helpers -----------------------------------------------------------------


def fs_type(path: str) -> str:
    from qemu_locked.lock.mounts import mount_of

    m = mount_of(os.path.realpath(path))
    return m.fstype if m is not None else "?"


def _scope(fstype: str) -> str:
    if fstype in _SHARED_FS or fstype.startswith("nfs"):
        return f"{fstype}: locks are seen by every host of this filesystem"
    return f"{fstype}: locks are host-local"


# -- checks ------------------------------------------------------------------


def check_ofd(directory: str, label: str, missing: str = FAIL, images: bool = False) -> Finding:
    """Create a test file in ``directory``, and prove OFD byte-0 locks work there:
    a second open of the same file must be refused while the first holds it.

    ``images``: a directory of disk images, which nobody but root need write
    (the VM user only locks what is there): run by another user, the test is
    skipped with a WARN rather than failed."""
    from portalocker import exceptions as pl_exc

    from qemu_locked.lock.ofd_portalocker import OFDLock

    check = f"ofd-locks {label}"
    try:
        st = os.stat(directory)
    except OSError as exc:
        return Finding(missing, check, f"{directory}: {exc.strerror}", f"create {directory}")
    if not stat.S_ISDIR(st.st_mode):
        return Finding(
            FAIL,
            check,
            f"{directory} is not a directory",
            f"replace it with a directory: {directory}",
        )
    fstype = fs_type(directory)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".qemu-lockctl-doctor-", dir=directory)
    except OSError as exc:
        unwritable_here = images and exc.errno == errno.EACCES and os.geteuid() != 0
        return Finding(
            WARN if exc.errno == errno.EROFS or unwritable_here else FAIL,
            check,
            f"{directory} ({fstype}): cannot create a test file: {exc.strerror}; "
            "OFD locks not tested",
            f"make {directory} writable, or run doctor where it can write",
        )
    os.close(fd)
    try:
        first = OFDLock(tmp)
        try:
            first.acquire()
        except pl_exc.LockException as exc:
            return Finding(
                FAIL,
                check,
                f"{directory} ({fstype}): OFD lock refused: {exc}",
                "put images and the lockspace on a filesystem with fcntl byte-range locks",
            )
        try:
            OFDLock(tmp).acquire()
        except pl_exc.AlreadyLocked:
            pass  # the second open file description was refused: OFD semantics hold
        else:
            return Finding(
                FAIL,
                check,
                f"{directory} ({fstype}): a second open was not refused; locks are not enforced",
                "use a filesystem that enforces fcntl locks (not a FUSE fs without lock support)",
            )
        finally:
            first.release()
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return Finding(OK, check, f"{directory}: OFD byte-0 locks work ({_scope(fstype)})")


def check_config(user: User | None = None) -> tuple[Finding, _config.Config]:
    try:
        cfg = _config.load()
    except QemuLockedError as exc:
        return Finding(FAIL, "config", exc.message, CONFIG_FIX), _config.Config()
    if user is not None and cfg.source.startswith("/"):
        why = user.denied(cfg.source, 4)
        if why:
            message = f"{why}: every start fails (the wrapper reads it as {user.name})"
            return Finding(FAIL, "config", message, f"chmod 644 {cfg.source}"), cfg
    return Finding(OK, "config", f"{cfg.source}: valid (backend {cfg.backend})"), cfg


def _launcher() -> str:
    return shutil.which("qemu-locked") or str(Path(sys.executable).parent / "qemu-locked")


def check_emulator(cfg: _config.Config, user: User | None = None) -> Finding:
    from qemu_locked.start import emulator

    try:
        path = emulator.find(
            cfg.emulator, "qemu-locked", _launcher(), os.environ.get("PATH", os.defpath)
        )
    except QemuLockedError as exc:
        return Finding(
            FAIL,
            "emulator",
            exc.message,
            "install qemu-system-x86 (apt-get install qemu-system-x86) or set emulator = "
            '"/path/to/qemu-system-ARCH" in the config',
        )
    why = user.denied(path, 5) if user is not None else None
    if why and user is not None:
        return Finding(FAIL, "emulator", f"{why}: QEMU runs as {user.name}", "")
    return Finding(OK, "emulator", f"qemu-locked will exec {path}")


def check_launcher(user: User | None) -> Iterator[Finding]:
    """The emulator wrapper, its interpreter and package must be usable by the QEMU user."""
    path = _launcher()
    if not os.path.exists(path):
        yield Finding(
            WARN,
            "launcher",
            f"{path}: not installed",
            "apt install ./qemu-locked_VERSION_all.deb (README.md, Install)",
        )
        return
    try:
        with open(path, "rb") as f:
            first = f.readline(4096).split()
    except OSError:
        first = []
    if first and first[-1] != b"-IS":  # pip rewrites the #! line of scripts it installs
        interp = first[0][2:].decode(errors="replace") if first[0].startswith(b"#!") else "python3"
        yield Finding(
            WARN,
            "launcher",
            f"{path} runs without -IS (a pip install rewrote it): slower starts, and "
            "PYTHON* variables reach it",
            f"{interp} -m qemu_locked.start.launcher",
        )
    if user is None:
        return
    why = launcher_denied(path, user)
    if why:
        yield Finding(
            FAIL,
            "launcher",
            f"{why}: libvirt runs the emulator as {user.name}",
            INSTALL_FIX.format(user=user.name),
        )
        return
    yield Finding(OK, "launcher", f"{path} and its interpreter are usable by {user.name}")


def check_lockspace(cfg: _config.Config, user: User | None) -> Iterator[Finding]:
    directory = cfg.lockspace_dir
    # direct keeps domain and block-device leases there whenever it exists
    used = cfg.backend == "lockspace" or (cfg.backend == "direct" and os.path.lexists(directory))
    if not used and not os.path.lexists(directory):
        if cfg.domain_lease and cfg.backend == "direct":
            yield Finding(
                WARN,
                "domain lease",
                f"{directory} is absent, so no domain lease is taken: the same VM could start "
                "twice if it has no lockable disk",
                "qemu-lockctl lockspace init (or domain_lease = false to silence this)",
            )
            return
        yield Finding(OK, "lockspace", f"{directory}: absent, not used (backend {cfg.backend})")
        return
    severity = FAIL if used else WARN
    ofd = check_ofd(directory, "lockspace", missing=severity)
    if ofd.status != OK:
        if not used:
            ofd = Finding(
                WARN, ofd.check, ofd.message + f" (not used: backend {cfg.backend})", ofd.fix
            )
        yield ofd
        return
    yield ofd
    if user is not None:
        why = user.denied(directory, 7)
        if why:
            yield Finding(
                severity,
                "lockspace",
                f"{why}: the emulator runs as {user.name} and creates lease files there",
                "qemu-lockctl lockspace init",
            )
            return
        yield Finding(OK, "lockspace", f"{directory}: writable by {user.name}")


def _is_block(path: str) -> bool:
    import stat

    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def check_block_identity(path: str) -> Finding:
    """A block device's lease key: stable across hosts, or host-local (warned)."""
    from qemu_locked.lock.keys import HOST_LOCAL_PREFIX, disk_key

    key = disk_key(path, os.stat(path))
    if key.startswith(HOST_LOCAL_PREFIX):
        return Finding(
            WARN,
            "block identity",
            f"{path}: no stable identity (LVM UUID, WWID, loop backing file); its lease key "
            f"{key!r} is the kernel name, which other hosts do not share",
            "use LVM, multipath or devices with a WWID for disks shared between hosts",
        )
    return Finding(OK, "block identity", f"{path}: lease key {key!r} (same on every host)")


def run(paths: list[str] | None = None) -> list[Finding]:
    """Every finding, in a stable order; the start probe (as the VM user) last."""
    findings: list[Finding] = []
    user = User.lookup(vm_user_name())
    cfg_finding, cfg = check_config(user)
    libvirt, user = check_libvirt()
    findings.append(cfg_finding)
    findings.append(check_emulator(cfg, user))
    findings.extend(check_launcher(user))
    if paths:
        findings.extend(check_ofd(p, p, images=True) for p in paths if not _is_block(p))
        findings.extend(check_block_identity(p) for p in paths if _is_block(p))
    else:
        findings.extend(
            check_ofd(d, d, images=True) for d in DEFAULT_IMAGE_DIRS if os.path.isdir(d)
        )
    findings.extend(check_lockspace(cfg, user))
    if cfg.backend == "sanlock":
        from qemu_locked.backends.sanlock.doctor import doctor_findings

        findings.extend(Finding(*f) for f in doctor_findings(cfg))
    from qemu_locked.admin.doctor_keys import findings as key_findings

    findings.extend(Finding(*f) for f in key_findings(cfg, paths))
    findings.extend(libvirt)
    from qemu_locked.admin.doctor_confinement import findings as confinement_findings

    findings.extend(confinement_findings(cfg, _launcher()))
    from qemu_locked.admin.doctor_supervisor import check as supervisor_check

    findings.append(supervisor_check(cfg))
    probe = check_start(cfg, _launcher(), user)
    if probe is not None:
        findings.append(probe)
    return findings


__all__ = [
    "FAIL",
    "OK",
    "QEMU_USER",
    "WARN",
    "Finding",
    "User",
    "check_ofd",
    "fs_type",
    "launcher_denied",
    "run",
]
