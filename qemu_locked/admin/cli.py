"""qemu-lockctl: the admin side.  Never on the VM start path, so it may import
typer, lxml and portalocker freely."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer

from qemu_locked.admin.common import (
    ARGS_ARG,
    DOMAIN_OPT,
    JSON_OPT,
    PREFIX,
    emit_json,
    load_plan,
    table,
    with_config,
)  # fmt: skip
from qemu_locked.admin.status_cli import other_key, status
from qemu_locked.model import config as _config
from qemu_locked.model.errors import (
    EXIT_CONFLICT,
    EXIT_USAGE,
    InternalError,
    QemuLockedError,
    UsageError,
)
from qemu_locked.model.plan import DiskRef, Plan
from qemu_locked.model.words import held

TYPE_CHECKING = False
if TYPE_CHECKING:
    pass

app = typer.Typer(
    name="qemu-lockctl",
    help="Admin side of qemu-locked: plan, check, status, run, doctor.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _show_version(value: bool) -> None:
    if value:
        from qemu_locked import __version__

        sys.stdout.write(f"qemu-lockctl {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Admin side of qemu-locked: plan, check, status, run, doctor."""


def key_of(path: str) -> str | None:
    """The stable key (lock/keys.py) of an existing disk, beside the path it was
    given (/dev/HostVG/vol -> lvm:...); None for a path that does not exist."""
    from qemu_locked.lock import keys

    try:
        return keys.disk_key(path, os.stat(path))
    except (OSError, ValueError, QemuLockedError):
        return None


def plan_json(p: Plan) -> dict[str, object]:
    obj = p.to_json_obj()
    obj["disks"] = [
        {"path": d.path, "key": key_of(d.path), "mode": d.mode, "role": d.role,
         "origin": d.origin, "probe_backing": d.probe_backing, "probe_data_file": d.probe_data}
        for d in p.disks
    ]  # fmt: skip
    obj["guest"] = p.guest
    obj["uuid"] = p.uuid
    return obj


def _header_note(d: DiskRef) -> str:
    named = [w for w, on in (("backing", d.probe_backing), ("data file", d.probe_data)) if on]
    return f" (+ header {' and '.join(named)})" if named else ""


def print_plan(plan: Plan) -> None:
    rows = [[d.mode, d.role, d.path + _header_note(d), d.origin] for d in plan.disks]
    header = ["MODE", "ROLE", "PATH", "ORIGIN"]
    others = [other_key({"path": d.path, "key": key_of(d.path)}) for d in plan.disks]
    if any(others):  # a device's stable name, beside the path it was given
        header.append("KEY")
        rows = [[*r, k or "-"] for r, k in zip(rows, others, strict=True)]
    if plan.guest or plan.uuid:
        sys.stdout.write(f"guest {plan.guest or '-'}  uuid {plan.uuid or '-'}\n\n")
    if rows:
        sys.stdout.write(table(rows, header))
    else:
        sys.stdout.write("no disk to lock\n")
    print_skipped(plan)


def print_skipped(plan: Plan) -> None:
    """What QEMU opens that is not locked, and why (plan and check)."""
    from qemu_locked.model.plan import NETWORK_WHY

    if plan.skipped:
        sys.stdout.write("\nnot locked:\n")
        sys.stdout.write(table([[s.source, s.reason] for s in plan.skipped], ["SOURCE", "REASON"]))
    if any(s.network for s in plan.skipped):
        sys.stdout.write(f"\nnetwork disks: {NETWORK_WHY}\n")


@app.command()
def plan(
    args: Optional[list[str]] = ARGS_ARG,
    domain: Optional[Path] = DOMAIN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Show what would be locked, touching no disk (paths need not exist).

    \b
    Config roles (readonly/backing/shareable = "none") are applied; backing
    and data files named in image headers are marked "+ header backing" /
    "+ header data file" and read by check and run.
    Exit codes: 0 shown, 2 bad arguments/XML/config.
    """
    p = with_config(load_plan(domain, args), _config.load(), probe=False)
    if as_json:
        emit_json(plan_json(p))
    else:
        print_plan(p)


# -- check ---------------------------------------------------------------------


def backend_conflicts(plan: Plan, cfg: _config.Config) -> list[tuple[str, str, str]]:
    """What refuses this plan now: the domain lease (where one is kept), then the disks."""
    from qemu_locked.backends import combined

    return combined.conflicts_all(plan, cfg)


def holder_objs(resource: str) -> list[dict[str, object]]:
    """Structured holders of a local path (best effort; [] for other resources)."""
    from qemu_locked.lock import procfs
    from qemu_locked.model.row import iso_time

    try:
        st = os.stat(resource)
    except (OSError, ValueError):
        return []
    return [
        {"pid": h.pid, "mode": h.mode, "guest": h.guest, "uuid": h.uuid, "comm": h.comm,
         "since": iso_time(h.since)}
        for h in procfs.holders_of(st.st_dev, st.st_ino)
    ]  # fmt: skip


@app.command()
def check(
    args: Optional[list[str]] = ARGS_ARG,
    domain: Optional[Path] = DOMAIN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Would this VM start now?  Takes no lock.

    \b
    Exit codes: 0 every lock is free; 1 refused (each conflict and its holder
    are listed); 2 bad arguments/XML/config; 4 a disk is missing or unusable;
    5 the lock machinery failed.
    """
    cfg = _config.load()
    p = with_config(load_plan(domain, args), cfg, probe=True)
    found = backend_conflicts(p, cfg)
    if as_json:
        emit_json(
            {
                "ok": not found,
                "backend": cfg.backend,
                "guest": p.guest,
                "uuid": p.uuid,
                "disks": [{"path": d.path, "key": key_of(d.path), "mode": d.mode} for d in p.disks],
                "conflicts": [
                    {
                        "path": res,
                        "key": key_of(res),
                        "wanted": wanted,
                        "held_by": who,
                        "holders": holder_objs(res),
                    }
                    for res, wanted, who in found
                ],
                "skipped": p.to_json_obj()["skipped"],
            }
        )
    elif found:
        from qemu_locked.model.words import wanted as word

        roles = {d.path: d.role for d in p.disks}  # a shareable disk is wanted "share"
        rows = [[res, word(res, wanted, roles.get(res, "")), held(who)]
                for res, wanted, who in found]  # fmt: skip
        sys.stdout.write(table(rows, ["RESOURCE", "WANTED", "HELD"]))
    else:
        n = len(p.disks)
        sys.stdout.write(f"ok: {n} disk{'s' if n != 1 else ''} free (backend {cfg.backend})\n")
    if not as_json:
        print_skipped(p)
    if found:
        raise SystemExit(EXIT_CONFLICT)


app.command()(status)  # admin/status_cli.py


# -- doctor ----------------------------------------------------------------------


@app.command()
def doctor(
    path: Optional[list[str]] = typer.Option(
        None, "--path", metavar="DIR", help="Check OFD locks in this directory (repeatable)."
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Is this host set up right?  Each finding is OK, WARN or FAIL, with a fix.

    \b
    Checks: config; emulator lookup; the launcher is usable by the QEMU user;
    OFD byte-0 locks on the image directories (--path, else
    /var/lib/libvirt/images) and the lockspace; lockspace permissions;
    libvirt's lock_manager, virsh, and which domains use qemu-locked.
    Exit codes: 0 no FAIL; 1 at least one FAIL.
    """
    from qemu_locked.admin import doctor as _doctor

    findings = _doctor.run(path or None)
    failed = any(f.status == _doctor.FAIL for f in findings)
    if as_json:
        emit_json({"ok": not failed, "findings": [f.to_json_obj() for f in findings]})
    else:
        rows: list[list[str]] = []
        for f in findings:
            rows.append([f.status, f.check, f.message])
            if f.fix and f.status != _doctor.OK:
                rows.append(["", "", f"fix: {f.fix}"])
        out = table(rows, ["STATUS", "CHECK", "FINDING"])
        sys.stdout.write(out)
    if failed:
        raise SystemExit(EXIT_CONFLICT)


# Sub-command groups live in their own modules.
from qemu_locked.admin.auditlog import log  # noqa: E402
from qemu_locked.admin.libvirt import libvirt_app  # noqa: E402
from qemu_locked.admin.run import run  # noqa: E402

app.command(context_settings={"allow_interspersed_args": False})(run)
app.command()(log)
from qemu_locked.admin.lockspace import lockspace_app  # noqa: E402
from qemu_locked.admin.sanlock import sanlock_app  # noqa: E402

app.add_typer(libvirt_app, name="libvirt")
app.add_typer(lockspace_app, name="lockspace")
app.add_typer(sanlock_app, name="sanlock")


def die(exc: QemuLockedError) -> NoReturn:
    for line in exc.lines():
        sys.stderr.write(PREFIX + line + "\n")
    raise SystemExit(exc.exit_code)


def _stdio() -> None:
    """Started with fd 0, 1 or 2 closed: /dev/null there first (a lock fd of
    ``run`` must not become CMD's stdout), and Python's streams, which are
    None for a closed fd, made real so writing a line cannot fail."""
    from qemu_locked.start.wrapper import fill_stdio

    fill_stdio()
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115


def main(argv: list[str] | None = None) -> None:
    """Entry point: one line on stderr per error, never a traceback."""
    _stdio()
    command = typer.main.get_command(app)
    try:
        rc = command.main(
            args=sys.argv[1:] if argv is None else argv,
            prog_name="qemu-lockctl",
            standalone_mode=False,
        )
    except QemuLockedError as exc:
        die(exc)
    except KeyboardInterrupt:
        sys.stderr.write(PREFIX + "interrupted\n")
        raise SystemExit(130) from None
    except BrokenPipeError:
        # `qemu-lockctl status | head`: the reader left; nothing to report.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (no flush error at exit)
        except OSError:
            pass
        raise SystemExit(141) from None
    except Exception as exc:
        # typer vendors click in some releases: match click's exceptions by name.
        names = {c.__name__ for c in type(exc).__mro__}
        if "Abort" in names:
            sys.stderr.write(PREFIX + "interrupted\n")
            raise SystemExit(130) from None
        if "ClickException" not in names:
            # A bug of ours: still one line, never a traceback (exit 70).
            die(InternalError(f"internal error: {type(exc).__name__}: {exc}"))
        message = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
        if "UsageError" in names:
            die(UsageError(message))
        sys.stderr.write(PREFIX + message + "\n")
        raise SystemExit(getattr(exc, "exit_code", 1)) from None
    raise SystemExit(rc if isinstance(rc, int) else 0)


__all__ = ["EXIT_USAGE", "_config", "app", "main"]
