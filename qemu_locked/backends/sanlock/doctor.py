"""What qemu-lockctl doctor checks about sanlock: binding, daemon, fencing, lockspace, join."""

from __future__ import annotations

import os

from qemu_locked.backends.sanlock.area import Area, text
from qemu_locked.backends.sanlock.binding import (
    DIST_PACKAGES,
    binding,
    binding_origin,
    run_dir,
    why,
)  # fmt: skip
from qemu_locked.model.errors import QemuLockedError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.model.config import Config


def _watchdog() -> tuple[bool, list[str]]:
    """(wdmd running, sanlock daemons started with -w 0)."""
    wdmd = False
    no_wd: list[str] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read(4096).split(b"\0")
        except OSError:
            continue
        prog = os.path.basename(argv[0]).decode(errors="replace")
        if prog == "wdmd":
            wdmd = True
        if prog == "sanlock" and b"daemon" in argv[1:2]:
            for i, a in enumerate(argv[:-1]):
                if a == b"-w" and argv[i + 1] == b"0":
                    no_wd.append(entry)
    return wdmd, no_wd


def doctor_findings(config: Config) -> list[tuple[str, str, str, str]]:
    """(status OK|WARN|FAIL, check, message, fix) tuples, for qemu-lockctl doctor."""
    used = config.backend == "sanlock"
    bad = "FAIL" if used else "WARN"
    out: list[tuple[str, str, str, str]] = []
    try:
        sl = binding()
    except QemuLockedError as exc:
        out.append((bad, "sanlock binding", exc.message, "apt-get install python3-sanlock"))
        return out
    origin = binding_origin()
    how = "loaded explicitly" if origin.startswith(DIST_PACKAGES) else "imported"
    out.append(("OK", "sanlock binding", f"{origin} ({how})", ""))
    sock = f"{run_dir()}/sanlock.sock"
    try:
        fd = sl.register()
        os.close(fd)
        out.append(("OK", "sanlock daemon", f"reachable at {sock}", ""))
    except sl.SanlockException as exc:
        out.append((bad, "sanlock daemon", f"not reachable at {sock}: {why(exc)}", "start sanlock"))
        return out
    wdmd, no_wd = _watchdog()
    if not wdmd or no_wd:
        cause = "wdmd is not running" if not wdmd else "sanlock runs with -w 0"
        out.append(
            (
                "WARN",
                "sanlock fencing",
                f"no watchdog ({cause}): there is NO fencing. If this host's sanlock daemon "
                "dies or loses its storage, its VMs keep running while another host takes "
                "their leases after the failover time (~60 s + 8 x io_timeout), so two "
                "QEMUs can write one disk",
                "run wdmd with a real /dev/watchdog and sanlock without -w 0",
            )
        )
    else:
        out.append(("OK", "sanlock fencing", "wdmd is running: hosts are fenced", ""))
    if not config.sanlock_path:
        out.append((bad, "sanlock lockspace", "sanlock_path is not set", "set sanlock_path"))
        return out
    try:
        area = Area(config)
        info = sl.read_lockspace(area.ls_path, area.ls_offset)
        out.append(
            (
                "OK",
                "sanlock lockspace",
                f"{area.ls_path}:{area.ls_offset}: lockspace "
                f"{text(info.get('lockspace', b''))!r}, io_timeout {info.get('iotimeout')}",
                "",
            )
        )
        out.append(
            (
                "OK",
                "sanlock leases",
                f"{area.res_path}:{area.res_offset}: {area.slots(sl) - 1} lease slots",
                "",
            )
        )
    except sl.SanlockException as exc:
        out.append(
            (
                bad,
                "sanlock lockspace",
                f"{config.sanlock_path}: {why(exc)}",
                "qemu-lockctl sanlock init",
            )
        )
        return out
    except QemuLockedError as exc:
        out.append((bad, "sanlock lockspace", exc.message, "qemu-lockctl sanlock init"))
        return out
    state = "not joined"
    for ls in sl.get_lockspaces():
        if text(ls.get("lockspace", b"")) == area.lockspace.decode():
            state = "joined" if ls.get("flags", 0) == 0 else "joining"
            if state == "joined":
                state += f" as host id {ls.get('host_id')}"
    ok = state.startswith("joined")
    out.append(
        (
            "OK" if ok else bad,
            "sanlock join",
            f"lockspace {area.lockspace.decode()!r}: {state}",
            "" if ok else "qemu-lockctl sanlock join",
        )
    )
    return out
