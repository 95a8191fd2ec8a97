"""qemu-lockctl sanlock ...: set up sanlock lockspace and lease areas, join it,
show leases and holders, check the set-up.

Errors are QemuLockedError subclasses: qemu_locked.cli.main prints them as one
``qemu-lockctl: `` line.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer

from qemu_locked.backends.sanlock import admin as _backend
from qemu_locked.backends.sanlock.doctor import doctor_findings
from qemu_locked.model import config as _config

sanlock_app = typer.Typer(help="sanlock backend: init, join, status, doctor.", no_args_is_help=True)

# Defaults-style typer parameters: see JSON_OPT in qemu_locked.admin.cli.
JSON_OPT: Any = typer.Option(False, "--json", help="Machine-readable output.")


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@sanlock_app.command()
def init(
    slots: int = typer.Option(
        256, "--slots", help="Lease slots in the resource area (1 MiB each)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Re-initialise: forgets every lease on every host."
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Write the lockspace (with sanlock_io_timeout) and the resource lease area.

    Needs the local sanlock daemon running (it does the aligned direct I/O).
    """
    done = _backend.init(_config.load(), slots=slots, force=force)
    if as_json:
        _emit(done)
        return
    sys.stdout.write(
        f"lockspace {done['lockspace']!r} at {done['path']}:{done['offset']} "
        f"(io_timeout {done['io_timeout']} s); {done['slots'] - 1} lease slots at "
        f"{done['resources']}:{done['resources_offset']}"
        + (f"; {done['cleared']} old leases cleared" if done["cleared"] else "")
        + "\n"
    )


@sanlock_app.command()
def join(as_json: bool = JSON_OPT) -> None:
    """Join the lockspace as sanlock_host_id (add_lockspace: ~2*io_timeout+1 s)."""
    done = _backend.join(_config.load())
    if as_json:
        _emit(done)
        return
    what = "already joined" if done["already_joined"] else f"joined in {done['seconds']} s"
    sys.stdout.write(f"lockspace {done['lockspace']!r}: host id {done['host_id']} {what}\n")


@sanlock_app.command()
def leave() -> None:
    """Leave the lockspace.  The daemon SIGKILLs every process holding a lease in it."""
    _backend.leave(_config.load())


@sanlock_app.command()
def status(
    resources: Optional[list[str]] = typer.Argument(
        None,
        help="Only the leases of these disk paths or domain:uuid:UUID / domain:name:NAME keys.",
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """The lockspace, its hosts, and every lease with its holders."""
    table = _backend.lease_table(_config.load(), resources)
    if as_json:
        _emit(table)
        return
    out = sys.stdout
    joined = "joined" if table["joined"] else "NOT joined"
    out.write(
        f"lockspace {table['lockspace']!r} at {table['path']}:{table['offset']}: "
        f"this host (id {table['host_id']}) {joined}\n"
    )
    for h in table["hosts"]:
        name = f" ({h['name']})" if h["name"] else ""
        out.write(f"  host id {h['host_id']}{name}: {h['state']}, generation {h['generation']}\n")
    if table["hosts_note"]:
        out.write(f"  {table['hosts_note']}\n")
    out.write(f"leases ({len(table['leases'])} of {table['slots'] - 1} slots used):\n")
    for lease in table["leases"]:
        if lease["owners"]:
            who = ", ".join(
                f"host id {o['host_id']}"
                + (f" ({o['host']})" if o["host"] else "")
                + f" {o['mode']}"
                for o in lease["owners"]
            )
        else:
            who = "free"
        local = "".join(
            f", pid {p['pid']}" + (f" guest '{p['guest']}'" if p["guest"] else "")
            for p in lease["local"]
        )
        what = lease["resource"] or lease["lease"]
        out.write(f"  slot {lease['slot']:>4}  {what}  {who}{local}\n")


@sanlock_app.command()
def doctor(as_json: bool = JSON_OPT) -> None:
    """Check the binding, the daemon, the lockspace, the join, and fencing."""
    findings = doctor_findings(_config.load())
    if as_json:
        _emit([dict(zip(("status", "check", "message", "fix"), f, strict=True)) for f in findings])
    else:
        for status_, check, message, fix in findings:
            line = f"{status_:<4}  {check}: {message}"
            sys.stdout.write(line + (f"\n      fix: {fix}" if fix else "") + "\n")
    if any(f[0] == "FAIL" for f in findings):
        raise typer.Exit(1)
