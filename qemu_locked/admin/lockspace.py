"""qemu-lockctl lockspace ...: set up the lease directory and keep it tidy."""

from __future__ import annotations

import grp
import os
import stat
import sys
from typing import Optional

import typer

from qemu_locked.admin.common import JSON_OPT, emit_json
from qemu_locked.model import config as _config
from qemu_locked.model.errors import EXIT_BACKEND, BackendError, UsageError

lockspace_app = typer.Typer(
    help="The lockspace directory (lockspace backend, domain leases): init, gc.",
    no_args_is_help=True,
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
        None, "--group", metavar="GROUP", help="Group of the VM user (default libvirt-qemu)."
    ),
) -> None:
    """Create the lockspace directory with the narrowest permissions that work for the VM user."""
    target = path or _config.load().lockspace_dir
    sys.stdout.write(init_dir(target, group or default_group()) + "\n")


@lockspace_app.command("gc")
def gc(
    path: Optional[str] = typer.Argument(None, help="Directory (default: config lockspace_dir)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only count what would go."),
    as_json: bool = JSON_OPT,
) -> None:
    """Remove the lease files nobody holds (safe while VMs start and stop).

    \b
    Each file is removed while this command holds its exclusive lock; a start
    that waited on it takes the new file instead.  Held leases stay.
    Exit codes: 0 done; 5 the directory or a lease file is unusable.
    """
    from qemu_locked.backends.lockspace.gc import collect

    target = path or _config.load().lockspace_dir
    done = collect(target, dry_run)
    if as_json:
        emit_json({"directory": target, "dry_run": dry_run, "removed": list(done.removed),
                   "held": list(done.held), "unusable": list(done.unusable)})  # fmt: skip
    else:
        verb = "would remove" if dry_run else "removed"
        sys.stdout.write(
            f"{target}: {verb} {len(done.removed)} unheld lease file(s); {len(done.held)} held\n"
        )
        for line in done.unusable:
            sys.stderr.write(f"qemu-lockctl: {target}/{line}\n")
    if done.unusable:
        raise SystemExit(EXIT_BACKEND)
