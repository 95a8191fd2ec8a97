"""``qemu-lockctl run``: take a VM's (or some disks') locks, then exec a command holding them.

For offline tools (qemu-img, backups) that must not meet a running VM.  The
exec tail is the wrapper's own (start/wrapper.py), so a command started here
inherits its locks exactly as QEMU does.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from qemu_locked.admin.common import DOMAIN_OPT, PREFIX, read_domain, with_config
from qemu_locked.model import config as _config
from qemu_locked.model.errors import (
    EmulatorNotExecutable,
    EmulatorNotFound,
    LockedError,
    QemuLockedError,
    UsageError,
)
from qemu_locked.model.plan import Plan
from qemu_locked.start.wrapper import exec_program

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.lock.held import Held


def disk_plan(specs: list[str]) -> Plan:
    """``--disk PATH[:shared|:exclusive]`` -> a plan (no config role applies)."""
    from qemu_locked.model.plan import (
        EXCLUSIVE,
        SHAREABLE,
        SHARED,
        WRITABLE,
        DiskRef,
        merge_by_path,
    )

    disks = []
    for spec in specs:
        path, colon, mode = spec.rpartition(":")
        if not colon or mode not in ("shared", "exclusive"):
            path, mode = spec, "exclusive"
        if not path:
            raise UsageError(f"--disk {spec!r}: no path")
        role = SHAREABLE if mode == "shared" else WRITABLE
        disks.append(
            DiskRef(path, SHARED if mode == "shared" else EXCLUSIVE, f"--disk {spec}", role)
        )
    return Plan(disks=merge_by_path(disks))


class Interrupted(QemuLockedError):
    exit_code = 130


def resolve_command(cmd: str) -> str:
    """The program ``execvp`` would run; exit 127 (not found) / 126 (not executable)."""
    if "/" in cmd:
        if not os.path.exists(cmd):
            raise EmulatorNotFound(f"{cmd}: No such file or directory")
        if os.path.isdir(cmd) or not os.access(cmd, os.X_OK):
            raise EmulatorNotExecutable(f"{cmd}: Permission denied")
        return cmd
    found = shutil.which(cmd)
    if found is None:
        raise EmulatorNotFound(f"{cmd}: command not found")
    return found


def _progress(elapsed: float, wait: float, exc: LockedError, tty: bool) -> str:
    first = exc.lines()[0]
    more = f" (+{len(exc.conflicts) - 1} more)" if len(exc.conflicts) > 1 else ""
    line = f"{PREFIX}waiting {elapsed:.0f}/{wait:g}s: {first}{more}"
    return f"\r\033[K{line}" if tty else line + "\n"


def acquire_waiting(plan: Plan, cfg: _config.Config, wait: float) -> Held | None:
    """Take every lock, retrying for up to ``wait`` seconds with a progress
    line on stderr naming who still holds what.  All or nothing each round,
    so an interrupt (Ctrl-C) leaves nothing held."""
    from qemu_locked.backends import combined

    def attempt(slice_: float) -> Held | None:
        return combined.acquire_all(plan, cfg, time.monotonic() + slice_)

    start = time.monotonic()
    deadline = start + wait
    tty = sys.stderr.isatty()
    last = ""
    slice_ = 0.0
    while True:
        try:
            held = attempt(slice_)
        except LockedError as exc:
            now = time.monotonic()
            if now >= deadline:
                if tty and last:
                    sys.stderr.write("\n")
                raise
            line = _progress(now - start, wait, exc, tty)
            if tty or line.split(": ", 2)[-1] != last.split(": ", 2)[-1]:
                sys.stderr.write(line)
                sys.stderr.flush()
            last = line
            slice_ = min(1.0, max(0.0, deadline - time.monotonic()))
            continue
        if tty and last:
            sys.stderr.write("\n")
        return held


def run(
    cmd: Optional[list[str]] = typer.Argument(
        None, metavar="-- CMD", help="The command to exec, after --."
    ),
    domain: Optional[Path] = DOMAIN_OPT,
    disk: Optional[list[str]] = typer.Option(
        None,
        "--disk",
        metavar="PATH[:shared]",
        help="A disk to lock (repeatable; exclusive unless :shared).",
    ),
    wait: float = typer.Option(
        0.0, "--wait", min=0.0, metavar="SECONDS", help="Wait up to SECONDS for holders to go."
    ),
) -> None:
    """Take the locks, then exec CMD holding them (qemu-img, backup scripts...).

    \b
    The locks pass to CMD across exec and last until CMD and every process
    it hands the fds to have exited.
    Exit codes: CMD's own once it runs; before that 2 bad arguments/XML,
    3 a disk is locked by someone else (after --wait), 4 a disk is missing
    or unusable, 5 lock machinery failed, 126 CMD not executable,
    127 CMD not found, 130 interrupted.
    """
    if not cmd:
        raise UsageError("nothing to run: give the command after --")
    if domain is not None and disk:
        raise UsageError("give either --domain or --disk, not both")
    if domain is None and not disk:
        raise UsageError("nothing to lock: give --domain FILE or --disk PATH")
    program = resolve_command(cmd[0])
    cfg = _config.load()
    p = with_config(read_domain(domain), cfg, probe=True) if domain else disk_plan(disk or [])
    try:
        held = acquire_waiting(p, cfg, wait)
    except KeyboardInterrupt:
        # typer turns a KeyboardInterrupt into a silent exit 130: say what happened.
        raise Interrupted("interrupted; no lock is held") from None
    try:
        if held is not None:
            held.inherit()
        sys.stdout.flush()
        sys.stderr.flush()
        exec_program(program, cmd)
    except OSError as exc:
        if held is not None:
            held.release()
        err = EmulatorNotFound if exc.errno == errno.ENOENT else EmulatorNotExecutable
        raise err(f"{cmd[0]}: {exc.strerror}") from None
    except BaseException:
        if held is not None:
            held.release()
        raise
