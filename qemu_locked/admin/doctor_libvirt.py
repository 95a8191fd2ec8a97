"""doctor's libvirt checks: the QEMU user, libvirt's own lock manager, virsh,
and which defined domains start through qemu-locked."""

from __future__ import annotations

import os
import shutil

from qemu_locked.admin import vmuser
from qemu_locked.admin.finding import FAIL, OK, WARN, Finding
from qemu_locked.admin.vmuser import User
from qemu_locked.model.errors import QemuLockedError

LIBVIRT_DOMAINS = "/etc/libvirt/qemu"


def check_libvirt() -> tuple[list[Finding], User | None]:
    """libvirt's set-up as it bears on qemu-locked (any backend)."""
    out: list[Finding] = []
    qemu_conf = vmuser.read_libvirt_conf(vmuser.LIBVIRT_QEMU_CONF)
    if qemu_conf is None:
        out.append(Finding(OK, "libvirt", f"{vmuser.LIBVIRT_QEMU_CONF}: absent (no libvirt here)"))
        return out, User.lookup(vmuser.QEMU_USER)
    name = vmuser.vm_user_name()
    user = User.lookup(name)
    if user is None:
        out.append(
            Finding(
                WARN,
                "libvirt",
                f"QEMU user '{name}' (qemu.conf user) does not exist",
                f"install libvirt-daemon-system, or fix `user` in {vmuser.LIBVIRT_QEMU_CONF}",
            )
        )
    using, domain_findings = _domain_emulators()
    lockd = vmuser.lockd_takes_disks()
    manager = qemu_conf.get("lock_manager", "")
    if lockd:
        # A failure as soon as one domain starts through qemu-locked: every backend
        # takes the disk's byte 0 (one inode, one lock), which virtlockd took first.
        status = FAIL if using else WARN
        who = f" ({len(using)} do: {', '.join(using)})" if using else " (none does yet)"
        out.append(Finding(status, "libvirt", lockd + who, vmuser.LOCKD_FIX))
    elif manager == "lockd":
        out.append(Finding(OK, "libvirt", 'lock_manager = "lockd" with indirect leases'))
    elif manager:
        out.append(Finding(OK, "libvirt", f'lock_manager = "{manager}" (independent of ours)'))
    else:
        out.append(Finding(OK, "libvirt", "no libvirt lock_manager: qemu-locked does the locking"))
    virsh = shutil.which("virsh")
    if virsh:
        out.append(Finding(OK, "virsh", f"{virsh}"))
    else:
        out.append(
            Finding(WARN, "virsh", "virsh not found", "apt-get install libvirt-clients (optional)")
        )
    out.extend(domain_findings)
    return out, user


def _domain_emulators() -> tuple[list[str], list[Finding]]:
    """The defined domains that run qemu-locked, and the findings about every domain."""
    from qemu_locked.parse.domain_xml import emulator_of, read_limited

    try:
        files = sorted(p for p in os.listdir(LIBVIRT_DOMAINS) if p.endswith(".xml"))
    except OSError:
        return [], []
    out: list[Finding] = []
    mine: list[str] = []  # under qemu-locked
    using: list[str] = []  # ... with a disk lock virtlockd's byte 0 would refuse
    others: list[str] = []
    unreadable = [n for n in files if not os.access(os.path.join(LIBVIRT_DOMAINS, n), os.R_OK)]
    if unreadable:  # root's files: counting them as "not using" would mislead
        out.append(
            Finding(
                WARN,
                "libvirt",
                f"{len(unreadable)} defined domains are not readable "
                "by this user: their emulators are not checked",
                "run doctor as root",
            )
        )
        files = [n for n in files if n not in unreadable]
    for name in files:
        path = os.path.join(LIBVIRT_DOMAINS, name)
        try:
            data = read_limited(path)
            emu = emulator_of(data, path) or ""
        except QemuLockedError as exc:
            out.append(Finding(WARN, "libvirt", exc.message, ""))
            continue
        ours = os.path.basename(emu) == "qemu-locked"
        (mine if ours else others).append(name[:-4])
        if ours:
            using.append(name[:-4])
        if ours and not os.access(emu, os.X_OK):
            out.append(
                Finding(
                    FAIL,
                    "libvirt",
                    f"{name[:-4]}: <emulator>{emu}: not executable",
                    f"qemu-lockctl libvirt disable {name[:-4]}, then enable it again",
                )
            )
    if files:
        status = OK if not others else WARN
        msg = f"{len(mine)} of {len(files)} defined domains use qemu-locked"
        if others:
            msg += f" (not: {', '.join(others)})"
        fix = "qemu-lockctl libvirt enable DOMAIN" if others else ""
        out.append(Finding(status, "libvirt", msg, fix))
    return using, out


__all__ = ["LIBVIRT_DOMAINS", "check_libvirt"]
