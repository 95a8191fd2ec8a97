"""qemu-lockctl lockspace ...: set up the lease directory."""

from __future__ import annotations

import grp
import os
import stat
import sys
from typing import Optional

import typer

from qemu_locked.model import config as _config
from qemu_locked.model.errors import BackendError, UsageError

lockspace_app = typer.Typer(
    help="Set up the lockspace directory (lockspace backend, domain leases)."
)

DIR_MODE = 0o2770  # setgid: lease files inherit the group the VM user locks them through


def default_group() -> str:
    for name in ("libvirt-qemu", "kvm"):
        try:
            grp.getgrnam(name)
        except KeyError:
            continue
        return name
    raise UsageError("no libvirt-qemu or kvm group here: name one with --group")


def init_dir(path: str, group: str) -> str:
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise UsageError(f"--group {group}: no such group") from None
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise BackendError(f"{path}: exists and is not a directory")
        os.chown(path, 0 if os.geteuid() == 0 else -1, gid)
        os.chmod(path, DIR_MODE)
    except OSError as exc:
        raise BackendError(f"{path}: {exc.strerror}") from None
    return f"{path}: ready (group {group}, mode {DIR_MODE:o})"


@lockspace_app.command("init")
def init(
    path: Optional[str] = typer.Argument(None, help="Directory (default: config lockspace_dir)."),
    group: Optional[str] = typer.Option(
        None, "--group", help="Group of the VM user (default libvirt-qemu)."
    ),
) -> None:
    """Create the lockspace directory with the narrowest permissions that work for the VM user."""
    target = path or _config.load().lockspace_dir
    sys.stdout.write(init_dir(target, group or default_group()) + "\n")
