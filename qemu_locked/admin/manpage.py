"""Man pages written from the program itself, so they cannot drift from it.

``qemu-lockctl(8)`` walks the command tree that typer builds (every command,
its help text, arguments and options); ``qemu-locked(1)`` takes its settings
from the annotated example config shipped in the package and its exit codes
from :mod:`qemu_locked.model.errors`.  The package build runs
``python3 -m qemu_locked.admin.manpage qemu-lockctl|qemu-locked``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from qemu_locked import __version__
from qemu_locked.model import errors

EXAMPLE_CONFIG = Path(__file__).parents[1] / "examples" / "qemu-locked.toml"


def _date() -> str:
    # Reproducible builds: dpkg-buildpackage sets SOURCE_DATE_EPOCH (the changelog date).
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    return time.strftime("%Y-%m-%d", time.gmtime(int(epoch) if epoch.isdigit() else None))


def esc(text: str) -> str:
    """Text safe for roff: backslashes, leading dots/quotes, hyphens as minus signs."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in out.split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def paragraphs(text: str) -> str:
    """A help text as roff: blank lines start paragraphs; click's \\b marks a
    block whose line breaks are kept."""
    out: list[str] = []
    for block in text.strip().split("\n\n"):
        lines = block.split("\n")
        if lines and lines[0].strip() == "\b":
            out.append(".PP\n.nf\n" + esc("\n".join(line.strip() for line in lines[1:])) + "\n.fi")
        else:
            out.append(".PP\n" + esc(" ".join(line.strip() for line in lines)))
    return "\n".join(out)


def _header(name: str, section: str, summary: str) -> list[str]:
    return [
        f'.TH {name.upper()} {section} "{_date()}" "qemu-locked {__version__}" "qemu-locked"',
        ".SH NAME",
        f"{esc(name)} \\- {esc(summary)}",
    ]


def _metavar(param: Any) -> str:
    if param.metavar:
        return str(param.metavar)
    if param.param_type_name == "argument":
        return str(param.name).upper()
    return str(getattr(getattr(param, "type", None), "name", "value")).upper()


# Duck-typed, not isinstance(click...): some typer releases vendor their own click.
def _param_lines(cmd: Any, ctx: Any) -> list[str]:
    out: list[str] = []
    for param in cmd.params:
        if param.param_type_name == "argument":
            out += [".TP", f"\\fI{esc(_metavar(param))}\\fR"]
            out.append(esc(getattr(param, "help", None) or ""))
        elif param.param_type_name == "option" and not param.hidden:
            names = ", ".join(f"\\fB{esc(n)}\\fR" for n in param.opts + param.secondary_opts)
            meta = "" if param.is_flag else f" \\fI{esc(_metavar(param))}\\fR"
            out += [".TP", names + meta, esc(param.help or "")]
    return out


def _walk(cmd: Any, path: list[str], parent: Any) -> list[str]:
    ctx = cmd.context_class(cmd, parent=parent, info_name=path[-1] if path else "qemu-lockctl")
    commands = getattr(cmd, "commands", None)
    if commands is not None:
        out: list[str] = []
        for name in sorted(commands):
            out += _walk(commands[name], [*path, name], ctx)
        return out
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    out = [f".SS {esc(' '.join(path))}"]
    out.append(f".B qemu\\-lockctl {esc(' '.join(path))}\n{esc(usage)}")
    out.append(paragraphs(cmd.help or ""))
    params = _param_lines(cmd, ctx)
    if params:
        out += [".PP", *params]
    return out


def lockctl_page() -> str:
    import typer

    from qemu_locked.admin.cli import app

    root = typer.main.get_command(app)
    lines = _header("qemu-lockctl", "8", "admin commands of qemu-locked")
    lines += [
        ".SH SYNOPSIS",
        ".B qemu\\-lockctl\n\\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fIARGS\\fR]",
        ".br\n.B qemu\\-lockctl \\-\\-version",
        ".SH DESCRIPTION",
        paragraphs(root.help or ""),
        ".PP\nEvery read\\-only command takes \\fB\\-\\-json\\fR. Errors are one line on "
        "standard error prefixed \\(lqqemu\\-lockctl: \\(rq, never a traceback.",
        ".SH COMMANDS",
        *_walk(root, [], None),
        ".SH EXIT STATUS",
        ".PP\nEach command lists its own codes above. In general:",
        *_exit_rows(with_check=True),
        ".SH FILES",
        ".TP\n/etc/qemu\\-locked/qemu\\-locked.toml\nSettings; see \\fBqemu\\-locked\\fR(1).",
        ".TP\n/var/lib/qemu\\-locked/lockspace\nLease files (lockspace backend, domain leases).",
        ".SH SEE ALSO",
        ".BR qemu\\-locked (1),\n.BR virsh (1),\n.BR qemu\\-system\\-x86_64 (1)",
    ]
    return "\n".join(lines) + "\n"


def _exit_rows(with_check: bool = False) -> list[str]:
    rows = [
        (errors.EXIT_OK, "success (for qemu\\-locked: QEMU's own status once it runs)"),
        (errors.EXIT_USAGE, "bad argument, configuration or domain XML"),
        (errors.EXIT_LOCKED, "a disk or the VM's domain lease is held by someone else"),
        (errors.EXIT_DISK, "a disk is missing or cannot be opened or locked"),
        (errors.EXIT_BACKEND, "the lock machinery failed (no OFD locks, lockspace I/O)"),
        (errors.EXIT_DENIED, "the security policy (AppArmor, SELinux) denied an open or lock"),
        (errors.EXIT_INTERNAL, "a bug in qemu\\-locked (still one line, no traceback)"),
        (errors.EXIT_NOT_EXECUTABLE, "the emulator (or command) is not executable"),
        (errors.EXIT_NOT_FOUND, "the emulator (or command) was not found"),
    ]
    if with_check:
        rows.insert(1, (errors.EXIT_CONFLICT, "check: would be refused; doctor: a FAIL"))
    out: list[str] = []
    for code, text in rows:
        out += [".TP", f"\\fB{code}\\fR", text]
    return out


def config_rows(text: str) -> list[str]:
    """The keys of the example config, each group of ``key = value`` lines
    followed by the comment block written above it."""
    out: list[str] = []
    comment: list[str] = []
    keys: list[str] = []

    def flush() -> None:
        if keys:
            out.append(".TP")
            out.append("\n.TQ\n".join(keys))
            out.append(esc(" ".join(comment)))
        keys.clear()
        comment.clear()

    for raw in text.splitlines():
        line = raw.strip()
        key, eq, value = line.partition("=")
        if line.startswith("#"):
            if keys:
                flush()
            comment.append(line.lstrip("#").strip())
        elif eq:
            keys.append(f"\\fB{esc(key.strip())}\\fR = {esc(value.strip())}")
        else:
            flush()
    flush()
    return out


def locked_page() -> str:
    example = EXAMPLE_CONFIG.read_text(encoding="utf-8")
    body = example.split("\n\n", 1)[1] if "\n\n" in example else example
    lines = _header("qemu-locked", "1", "QEMU emulator wrapper that locks every disk image first")
    lines += [
        ".SH SYNOPSIS",
        ".B qemu\\-locked\n[\\fIQEMU\\-OPTIONS\\fR]",
        ".SH DESCRIPTION",
        ".PP\n\\fBqemu\\-locked\\fR is used in place of \\fBqemu\\-system\\-\\fIARCH\\fR, "
        "by hand or as the \\fI<emulator>\\fR of a libvirt domain. It reads the disks "
        "QEMU will open from its arguments (\\fB\\-drive\\fR, \\fB\\-blockdev\\fR, "
        "\\fB\\-hda\\fR, \\fB\\-cdrom\\fR, \\fB\\-readconfig\\fR, a positional image, "
        "backing chains), takes an OFD lock on byte 0 of each (exclusive for writable "
        "disks, shared for read\\-only, shareable and backing images), then executes the "
        "real QEMU with every argument unchanged. The locks belong to the QEMU process: "
        "they end with it, whatever the way it ends.",
        ".PP\nA start whose disk is held elsewhere is refused with one line per "
        "conflict on standard error, prefixed \\(lqqemu\\-locked: \\(rq, naming the holder.",
        ".PP\nEvery argument belongs to QEMU: \\fBqemu\\-locked \\-\\-help\\fR shows QEMU's "
        "help. Its own settings come from the configuration file and the environment only.",
        ".SH CONFIGURATION",
        ".PP\n/etc/qemu\\-locked/qemu\\-locked.toml (or the file named by "
        "\\fBQEMU_LOCKED_CONFIG\\fR). Every key is optional and can be overridden by an "
        "environment variable \\fBQEMU_LOCKED_\\fR\\fIKEY\\fR (upper case). The file must "
        "be readable by the user the VMs run as. Keys and defaults:",
        *config_rows(body),
        ".SH EXIT STATUS",
        *_exit_rows(),
        ".SH FILES",
        ".TP\n/etc/qemu\\-locked/qemu\\-locked.toml\nSettings.",
        ".TP\n/var/lib/qemu\\-locked/lockspace\nLease files; "
        "create with \\fBqemu\\-lockctl lockspace init\\fR.",
        ".SH SEE ALSO",
        ".BR qemu\\-lockctl (8),\n.BR qemu\\-system\\-x86_64 (1)",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    pages = {"qemu-lockctl": lockctl_page, "qemu-locked": locked_page}
    if len(args) != 1 or args[0] not in pages:
        sys.stderr.write("usage: python3 -m qemu_locked.admin.manpage qemu-lockctl|qemu-locked\n")
        raise SystemExit(errors.EXIT_USAGE)
    sys.stdout.write(pages[args[0]]())


if __name__ == "__main__":
    main()
