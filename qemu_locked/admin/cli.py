"""qemu-lockctl: the admin side.  Never on the VM start path, so it may import
typer, lxml and portalocker freely."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from qemu_locked.model import config as _config
from qemu_locked.model.errors import (
    EXIT_CONFLICT,
    EXIT_USAGE,
    EmulatorNotExecutable,
    EmulatorNotFound,
    InternalError,
    LockedError,
    QemuLockedError,
    UsageError,
)
from qemu_locked.model.plan import Plan

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qemu_locked.lock.held import Held

PREFIX = "qemu-lockctl: "

app = typer.Typer(
    name="qemu-lockctl",
    help="Admin side of qemu-locked: plan, check, status, run, doctor.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _root() -> None:
    """Admin side of qemu-locked: plan, check, status, run, doctor."""


JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
DomainOpt = Annotated[
    Path | None,
    typer.Option("--domain", "-d", metavar="FILE", help="A libvirt domain XML file (- for stdin)."),
]
ArgsArg = Annotated[
    list[str] | None, typer.Argument(metavar="-- QEMU-ARGS", help="QEMU arguments, after --.")
]


def emit_json(obj: Any) -> None:
    # Indented output uses json's pure-Python encoder: 0.9 s for 10,000 status
    # rows here.  Large answers (scripts read them) are written compactly.
    big = isinstance(obj, dict) and any(isinstance(v, list) and len(v) > 200 for v in obj.values())
    sys.stdout.write(json.dumps(obj, indent=None if big else 2, ensure_ascii=False) + "\n")


def table(rows: list[list[str]], header: list[str]) -> str:
    """Aligned columns; the last column is not padded."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for r in [header, *rows]:
        cells = [c.ljust(w) for c, w in zip(r, widths, strict=False)] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def read_domain(domain: Path) -> Plan:
    """A domain XML file, or ``-`` for stdin (``virsh dumpxml vm | qemu-lockctl check -d -``)."""
    from qemu_locked.parse import domain_xml

    if str(domain) == "-":
        data = sys.stdin.buffer.read(domain_xml.MAX_XML + 1)
        return domain_xml.plan_from_bytes(data, "(stdin)")
    return domain_xml.plan_from_file(domain)


def load_plan(domain: Path | None, args: list[str] | None) -> Plan:
    """The plan for --domain XML or the QEMU arguments after --."""
    if domain is not None and args:
        raise UsageError("give either --domain or QEMU arguments after --, not both")
    if domain is not None:
        return read_domain(domain)
    if not args:
        raise UsageError("nothing to plan: give --domain FILE or -- QEMU-ARGS")
    from qemu_locked.parse.argv import parse_argv
    from qemu_locked.start.wrapper import read_config_file

    return parse_argv(args, read_config=read_config_file)


def with_config(plan: Plan, cfg: _config.Config, probe: bool) -> Plan:
    """What the wrapper would lock: config roles applied and, with ``probe``,
    the backing files named in image headers added (read-only, never created)."""
    if probe and any(d.probe_backing for d in plan.disks):
        from qemu_locked.start import chains as backing

        plan = backing.resolve(plan)
    none_roles = tuple(r for r in ("readonly", "backing", "shareable") if getattr(cfg, r) == "none")
    return plan.apply_roles(none_roles)


def plan_json(p: Plan) -> dict[str, object]:
    obj = p.to_json_obj()
    obj["disks"] = [
        {"path": d.path, "mode": d.mode, "role": d.role, "origin": d.origin,
         "probe_backing": d.probe_backing}
        for d in p.disks
    ]  # fmt: skip
    obj["guest"] = p.guest
    obj["uuid"] = p.uuid
    return obj


def print_plan(plan: Plan) -> None:
    rows = [[d.mode, d.role, d.path + (" (+ header backing)" if d.probe_backing else ""), d.origin]
            for d in plan.disks]  # fmt: skip
    if plan.guest or plan.uuid:
        sys.stdout.write(f"guest {plan.guest or '-'}  uuid {plan.uuid or '-'}\n\n")
    if rows:
        sys.stdout.write(table(rows, ["MODE", "ROLE", "PATH", "ORIGIN"]))
    else:
        sys.stdout.write("no disk to lock\n")
    if plan.skipped:
        sys.stdout.write("\nnot locked:\n")
        sys.stdout.write(table([[s.source, s.reason] for s in plan.skipped], ["SOURCE", "REASON"]))


@app.command()
def plan(args: ArgsArg = None, domain: DomainOpt = None, as_json: JsonOpt = False) -> None:
    """Show what would be locked, touching no disk (paths need not exist).

    \b
    Config roles (readonly/backing/shareable = "none") are applied; backing
    files named in image headers are marked "+ header backing" and read by
    check and run.
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
    from qemu_locked import backends

    return backends.conflicts_all(plan, cfg)


def holder_objs(resource: str) -> list[dict[str, object]]:
    """Structured holders of a local path (best effort; [] for other resources)."""
    from qemu_locked.admin.status import iso_time
    from qemu_locked.lock import holders

    try:
        st = os.stat(resource)
    except (OSError, ValueError):
        return []
    return [
        {"pid": h.pid, "mode": h.mode, "guest": h.guest, "uuid": h.uuid, "comm": h.comm,
         "since": iso_time(h.since)}
        for h in holders.holders_of(st.st_dev, st.st_ino)
    ]  # fmt: skip


def held_text(who: str) -> str:
    """``(exclusive) by pid 1, guest 'a'`` -> ``exclusive by pid 1, guest 'a'``."""
    mode, sep, rest = who.removeprefix("(").partition(") ")
    return f"{mode} {rest}" if who.startswith("(") and sep else who


@app.command()
def check(args: ArgsArg = None, domain: DomainOpt = None, as_json: JsonOpt = False) -> None:
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
                "disks": [{"path": d.path, "mode": d.mode} for d in p.disks],
                "conflicts": [
                    {"path": res, "wanted": wanted, "held_by": who, "holders": holder_objs(res)}
                    for res, wanted, who in found
                ],
            }
        )
    elif found:
        rows = [[res, wanted, held_text(who)] for res, wanted, who in found]
        sys.stdout.write(table(rows, ["RESOURCE", "WANTED", "HELD"]))
    else:
        n = len(p.disks)
        sys.stdout.write(f"ok: {n} disk{'s' if n != 1 else ''} free (backend {cfg.backend})\n")
    if found:
        raise SystemExit(EXIT_CONFLICT)


# -- status --------------------------------------------------------------------


@app.command()
def status(
    paths: Annotated[
        list[str] | None, typer.Argument(metavar="PATH", help="Only locks on these files.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every byte-0 lock held on this host (and, with a lockspace backend, on
    every host sharing it): disk, mode, pid, guest, uuid, since, host.

    \b
    Exit codes: 0 listed (possibly nothing); 2 a PATH does not exist or the
    config is bad.
    """
    from qemu_locked.admin.status import status_rows

    rows = status_rows(_config.load(), paths or None)
    if as_json:
        emit_json({"locks": rows})
        return
    if not rows:
        sys.stdout.write("no lock held\n")
        return

    def cell(value: object) -> str:
        return "-" if value is None or value == "" else str(value)

    header = ["MODE", "PID", "GUEST", "COMMAND", "UUID", "SINCE", "HOST", "PATH"]
    keys = ["mode", "pid", "guest", "comm", "uuid", "since", "host", "path"]
    if any("state" in r for r in rows):  # lease records (held/stale) and pending migrations
        header.insert(1, "STATE")
        keys.insert(1, "state")
        for r in rows:
            r.setdefault("state", "held")
    sys.stdout.write(table([[cell(r.get(k)) for k in keys] for r in rows], header))


# -- run -------------------------------------------------------------------------


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
    from qemu_locked import backends
    from qemu_locked.model.value import replace

    def attempt(slice_: float) -> Held | None:
        return backends.acquire_all(plan, replace(cfg, wait=slice_))

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


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    cmd: Annotated[
        list[str] | None, typer.Argument(metavar="-- CMD", help="The command to exec, after --.")
    ] = None,
    domain: DomainOpt = None,
    disk: Annotated[
        list[str] | None,
        typer.Option(
            "--disk",
            metavar="PATH[:shared]",
            help="A disk to lock (repeatable; exclusive unless :shared).",
        ),
    ] = None,
    wait: Annotated[
        float,
        typer.Option(
            "--wait", min=0.0, metavar="SECONDS", help="Wait up to SECONDS for holders to go."
        ),
    ] = 0.0,
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
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(program, cmd)
    except OSError as exc:
        if held is not None:
            held.release()
        err = EmulatorNotFound if exc.errno == errno.ENOENT else EmulatorNotExecutable
        raise err(f"{cmd[0]}: {exc.strerror}") from None
    except BaseException:
        if held is not None:
            held.release()
        raise


# -- doctor ----------------------------------------------------------------------


@app.command()
def doctor(
    path: Annotated[
        list[str] | None,
        typer.Option(
            "--path", metavar="DIR", help="Check OFD locks in this directory (repeatable)."
        ),
    ] = None,
    as_json: JsonOpt = False,
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
from qemu_locked.admin.libvirt import libvirt_app  # noqa: E402
from qemu_locked.admin.lockspace import lockspace_app  # noqa: E402
from qemu_locked.admin.sanlock import sanlock_app  # noqa: E402

app.add_typer(libvirt_app, name="libvirt")
app.add_typer(lockspace_app, name="lockspace")
app.add_typer(sanlock_app, name="sanlock")


def die(exc: QemuLockedError) -> NoReturn:
    for line in exc.lines():
        sys.stderr.write(PREFIX + line + "\n")
    raise SystemExit(exc.exit_code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one line on stderr per error, never a traceback."""
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
