"""doctor's supervisor check: can this kernel stop QEMU's opens (seccomp user
notification with fd injection), and is the supervisor configured on?"""

from __future__ import annotations

import os

from qemu_locked.admin.finding import FAIL, OK, WARN, Finding

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.model.config import Config

ACTIONS = "/proc/sys/kernel/seccomp/actions_avail"
# SECCOMP_ADDFD_FLAG_SEND (the injected fd as the call's result) came in Linux 5.14.
_MIN_KERNEL = (5, 14)


def _kernel() -> tuple[int, int]:
    release = os.uname().release.split("-")[0].split(".")
    try:
        return int(release[0]), int(release[1])
    except (IndexError, ValueError):
        return (0, 0)


def check(config: Config) -> Finding:
    try:
        with open(ACTIONS, encoding="ascii") as f:
            actions = f.read().split()
    except OSError:
        actions = []
    kernel = _kernel()
    able = "user_notif" in actions and kernel >= _MIN_KERNEL
    have = (
        f"seccomp user notification {'available' if able else 'not available'} "
        f"(Linux {kernel[0]}.{kernel[1]})"
    )
    if config.supervisor and not able:
        return Finding(
            FAIL,
            "supervisor",
            f"supervisor = true but {have}: every start is refused",
            "a kernel >= 5.14 with seccomp, or supervisor = false",
        )
    if config.supervisor:
        return Finding(OK, "supervisor", f"on: {have}")
    after = (
        "the monitor guard locks what libvirt's QMP commands name"
        if config.monitor_guard
        else "disks opened after start are not locked"
    )
    return Finding(
        WARN, "supervisor", f"supervisor = false: {after}; {have}",
        "supervisor = true" if able else "a kernel >= 5.14 with seccomp",
    )  # fmt: skip
