"""What every qemu-lockctl command shares: options, plan loading, output."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from qemu_locked.model import config as _config
from qemu_locked.model.errors import UsageError
from qemu_locked.model.plan import Plan

PREFIX = "qemu-lockctl: "

# Parameters are declared with defaults (``x: Optional[T] = typer.Option(None, ...)``),
# not ``Annotated[T | None, ...]``: Debian 12's python3-typer 0.7 knows only this form.
JSON_OPT: Any = typer.Option(False, "--json", help="Machine-readable output.")
DOMAIN_OPT: Any = typer.Option(
    None, "--domain", "-d", metavar="FILE", help="A libvirt domain XML file (- for stdin)."
)
ARGS_ARG: Any = typer.Argument(None, metavar="-- QEMU-ARGS", help="QEMU arguments, after --.")


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
    import os

    from qemu_locked.model.errors import QemuLockedError
    from qemu_locked.start import emulator, wrapper

    cfg = _config.load()
    try:  # options no table knows are asked of the QEMU the wrapper would exec
        qemu: str | None = emulator.find(
            cfg.emulator, "qemu-locked", sys.argv[0], os.environ.get("PATH", os.defpath)
        )
    except QemuLockedError:
        qemu = None
    return wrapper.parse(args, cfg, qemu)


def with_config(plan: Plan, cfg: _config.Config, probe: bool) -> Plan:
    """What the wrapper would lock (the wrapper's own :func:`resolve`)."""
    from qemu_locked.start.wrapper import resolve

    return resolve(plan, cfg, probe)
