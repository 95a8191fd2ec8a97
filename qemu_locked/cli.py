"""qemu-lockctl: the admin side.  Never on the VM start path, so it may import
typer, lxml and portalocker freely."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from qemu_locked import config as _config
from qemu_locked.errors import EXIT_USAGE, QemuLockedError, UsageError
from qemu_locked.model import Plan

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
    Path | None, typer.Option("--domain", "-d", help="A libvirt domain XML file.")
]
ArgsArg = Annotated[list[str] | None, typer.Argument(help="QEMU arguments, after --.")]


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


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


def load_plan(domain: Path | None, args: list[str] | None) -> Plan:
    """The plan for --domain XML or the QEMU arguments after --."""
    if domain is not None and args:
        raise UsageError("give either --domain or QEMU arguments after --, not both")
    if domain is not None:
        raise UsageError("--domain: domain XML input is not built yet (issue 4)")
    if not args:
        raise UsageError("nothing to plan: give --domain FILE or -- QEMU-ARGS")
    from qemu_locked.qemu_args import parse_argv
    from qemu_locked.wrapper import read_config_file

    return parse_argv(args, read_config=read_config_file)


def print_plan(plan: Plan) -> None:
    rows = [[d.mode, d.path, d.origin] for d in plan.disks]
    if rows:
        sys.stdout.write(table(rows, ["MODE", "PATH", "ORIGIN"]))
    else:
        sys.stdout.write("no disk to lock\n")
    if plan.skipped:
        sys.stdout.write("\nnot locked:\n")
        sys.stdout.write(table([[s.source, s.reason] for s in plan.skipped], ["SOURCE", "REASON"]))


@app.command()
def plan(args: ArgsArg = None, domain: DomainOpt = None, as_json: JsonOpt = False) -> None:
    """Show what would be locked, touching no disk (paths need not exist)."""
    p = load_plan(domain, args)
    if as_json:
        emit_json(p.to_json_obj())
    else:
        print_plan(p)


# Sub-command groups live in their own modules.
from qemu_locked.cli_libvirt import libvirt_app  # noqa: E402
from qemu_locked.cli_sanlock import sanlock_app  # noqa: E402

app.add_typer(libvirt_app, name="libvirt")
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
    except Exception as exc:
        # typer vendors click in some releases: match click's exceptions by name.
        names = {c.__name__ for c in type(exc).__mro__}
        if "Abort" in names:
            sys.stderr.write(PREFIX + "interrupted\n")
            raise SystemExit(130) from None
        if "ClickException" not in names:
            raise
        message = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
        if "UsageError" in names:
            die(UsageError(message))
        sys.stderr.write(PREFIX + message + "\n")
        raise SystemExit(getattr(exc, "exit_code", 1)) from None
    raise SystemExit(rc if isinstance(rc, int) else 0)


__all__ = ["EXIT_USAGE", "_config", "app", "main"]
