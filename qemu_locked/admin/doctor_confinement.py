"""doctor's confinement checks: would the host's security modules deny a start?

Run unconfined, doctor cannot feel the policy a confined QEMU runs under, so it
reads the set-up instead: AppArmor (kernel, libvirt's security driver, our rules
in libvirt's domain profiles), SELinux (mode, the launcher's label) and Yama.
"""

from __future__ import annotations

import os

from qemu_locked.admin import apparmor, vmuser
from qemu_locked.admin.finding import FAIL, OK, WARN, Finding
from qemu_locked.model.errors import QemuLockedError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.model.config import Config

SYS_APPARMOR = "/sys/module/apparmor/parameters/enabled"
SYS_SELINUX = "/sys/fs/selinux/enforce"
SYS_YAMA = "/proc/sys/kernel/yama/ptrace_scope"
# The label confinement/selinux/qemu_locked.fc gives the launcher: svirt_t's entry point.
SELINUX_LAUNCHER_TYPE = "qemu_locked_exec_t"
ENABLE_FIX = "qemu-lockctl libvirt enable DOMAIN (or --all): it adds them, in a marked block"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(256).strip()
    except OSError:
        return None


def _libvirt_drivers() -> list[str] | None:
    """qemu.conf ``security_driver`` as a list; None when unset (libvirt then
    uses the first module the host supports) or libvirt is absent."""
    conf = vmuser.read_libvirt_conf(vmuser.LIBVIRT_QEMU_CONF) or {}
    value = conf.get("security_driver")
    if value is None:
        return None
    return [v.strip().strip("\"'") for v in value.strip("[]").split(",") if v.strip()]


def check_apparmor(
    config: Config, launcher: str, root: str = apparmor.APPARMOR_D, active: bool | None = None
) -> Finding:
    """``active``: is AppArmor on in this kernel (None: ask the kernel)."""
    check = "apparmor"
    if not (_read(SYS_APPARMOR) == "Y" if active is None else active):
        return Finding(OK, check, "AppArmor is not active on this kernel")
    if not apparmor.confines_qemu(root):
        return Finding(OK, check, "AppArmor is active; libvirt's QEMU profiles are not installed")
    drivers = _libvirt_drivers()
    if drivers is not None and "apparmor" not in drivers:
        return Finding(
            OK,
            check,
            f"libvirt does not confine QEMU with AppArmor "
            f"(security_driver = {', '.join(drivers) or 'none'})",
        )
    ours = os.path.join(root, apparmor.OURS)
    local = os.path.join(root, apparmor.LOCAL)
    denied = f"so libvirt's profile (libvirt-<uuid>) denies every start through {launcher}"
    if not os.path.isfile(ours):
        return Finding(
            FAIL,
            check,
            f"AppArmor confines every QEMU libvirt starts and {ours} "
            f"(qemu-locked's rules) is missing, {denied}",
            "apt install ./qemu-locked_VERSION_all.deb (or copy "
            f"confinement/apparmor/qemu-locked to {ours}), then {ENABLE_FIX}",
        )
    try:
        now = apparmor.current(root)
        want = apparmor.block(config, launcher)
    except QemuLockedError as exc:  # the file unreadable, a path a rule cannot state
        return Finding(FAIL, check, exc.message, ENABLE_FIX)
    if now is None:
        return Finding(
            FAIL,
            check,
            f"AppArmor confines every QEMU libvirt starts and {local} "
            f"does not include qemu-locked's rules, {denied}",
            ENABLE_FIX,
        )
    if now != want:
        return Finding(
            FAIL,
            check,
            f"qemu-locked's rules in {local} do not match this host's "
            "settings (launcher, lockspace_dir or backend changed since), "
            f"{denied.replace('every', 'a')} that needs them",
            ENABLE_FIX,
        )
    return Finding(OK, check, f"libvirt's domain profiles include qemu-locked's rules ({local})")


def check_selinux(launcher: str) -> Finding | None:
    mode = _read(SYS_SELINUX)
    if mode is None:
        return None
    try:
        label = os.getxattr(launcher, "security.selinux").rstrip(b"\0").decode()
    except OSError:
        label = "(none)"
    if f":{SELINUX_LAUNCHER_TYPE}:" in f"{label}:":
        return Finding(OK, "selinux", f"{launcher} is labelled {label}: svirt_t may run it")
    status, what = (FAIL, "enforcing") if mode == "1" else (WARN, "permissive")
    return Finding(
        status,
        "selinux",
        f"SELinux is {what} and {launcher} is labelled {label}, "
        "not svirt_t's entry point: libvirt's confined QEMU cannot run it",
        "semodule -i qemu_locked.pp && restorecon -v "
        + launcher
        + " (confinement/selinux/README.md)",
    )


def check_yama() -> Finding | None:
    scope = _read(SYS_YAMA)
    if scope is None:
        return None
    return Finding(
        OK,
        "yama",
        f"ptrace_scope = {scope}: holders are named through /proc "
        "reads, which Yama does not restrict (it limits attaching)",
    )


def findings(config: Config, launcher: str) -> list[Finding]:
    out = [check_apparmor(config, launcher)]
    out += [f for f in (check_selinux(launcher), check_yama()) if f is not None]
    return out
