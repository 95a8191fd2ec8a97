"""doctor's last word: a real start as the VM user, with no disk.

The launcher runs exactly as libvirt would run it (that user and its groups,
a bare environment, cwd /) with /bin/true standing in for QEMU: it reaches the
interpreter, the package, the config file and, when a domain lease is taken,
the lockspace.  If that start fails, every VM start fails, whatever the
mode-bit checks said.  The probe's own lease file is removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid as _uuid

from qemu_locked.admin.finding import FAIL, OK, WARN, Finding
from qemu_locked.admin.vmuser import User
from qemu_locked.model.config import Config
from qemu_locked.model.errors import BackendError

PROBE_GUEST = "qemu-lockctl-doctor"
INSTALL_FIX = (
    "install the package (apt install ./qemu-locked_VERSION_all.deb), or a venv made with "
    "/usr/bin/python3 -m venv in a directory {user} can reach (README.md, Install)"
)


def _env(cfg: Config) -> dict[str, str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
    env.update({k: v for k, v in os.environ.items() if k.startswith("QEMU_LOCKED_")})
    env["QEMU_LOCKED_EMULATOR"] = shutil.which("true") or "/bin/true"
    if cfg.backend == "sanlock":
        env["QEMU_LOCKED_DOMAIN_LEASE"] = "false"  # no sanlock lease for a probe
    return env


def _remove_probe_lease(cfg: Config, uuid: str) -> None:
    from qemu_locked.backends.lockspace.gc import collect_one
    from qemu_locked.backends.lockspace.leases import Lockspace, lease_name
    from qemu_locked.lock.keys import domain_key

    key = domain_key(uuid, PROBE_GUEST)
    if key is None or not os.path.isdir(cfg.lockspace_dir):
        return
    try:
        space = Lockspace(cfg.lockspace_dir)
    except BackendError:
        return
    try:
        collect_one(space, lease_name(key))
    except BackendError:
        pass  # left for `qemu-lockctl lockspace gc`
    finally:
        space.close()


def _fix(message: str, cfg: Config, user: User) -> str:
    if cfg.source in message:
        return f"chmod 644 {cfg.source} ({user.name} reads it at every start)"
    if cfg.lockspace_dir in message:
        return "qemu-lockctl lockspace init"
    return f"make what the message names reachable by {user.name}"


def check_start(cfg: Config, launcher: str, user: User | None) -> Finding | None:
    """Start the launcher as ``user``; None when there is no such user or no launcher."""
    if user is None or not os.path.exists(launcher):
        return None
    check = f"start as {user.name}"
    if os.geteuid() not in (0, user.uid):
        return Finding(
            WARN, check, f"not tried: only root can start a probe as {user.name}",
            "run qemu-lockctl doctor as root",
        )  # fmt: skip
    uuid = str(_uuid.uuid4())
    ids: dict[str, object] = {}
    if os.geteuid() != user.uid:
        ids = {"user": user.uid, "group": user.gid, "extra_groups": sorted(user.gids)}
    argv = [launcher, "-name", f"guest={PROBE_GUEST}", "-uuid", uuid]
    try:
        r = subprocess.run(
            argv, check=False, env=_env(cfg), cwd="/", stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=120, **ids,  # type: ignore[call-overload]
        )  # fmt: skip
    except OSError as exc:
        return Finding(
            FAIL, check, f"{launcher}: {exc.strerror}: libvirt could not run the emulator",
            INSTALL_FIX.format(user=user.name),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return Finding(FAIL, check, f"{launcher} did not finish in 120 s", "")
    finally:
        _remove_probe_lease(cfg, uuid)
    if r.returncode == 0:
        return Finding(OK, check, f"{launcher} starts as {user.name} (true standing in for QEMU)")
    lines = [ln.removeprefix("qemu-locked: ") for ln in r.stderr.splitlines() if ln.strip()]
    message = "; ".join(lines[:3]) or f"exit status {r.returncode}"
    if lines and lines[0].startswith("Traceback"):  # the launcher could not import us
        message = lines[-1]
        fix = INSTALL_FIX.format(user=user.name)
    elif r.returncode in (126, 127) or ("Permission denied" in message and launcher in message):
        fix = INSTALL_FIX.format(user=user.name)
    else:
        fix = _fix(message, cfg, user)
    return Finding(FAIL, check, f"every VM start fails: {message}", fix)


__all__ = ["PROBE_GUEST", "check_start"]
