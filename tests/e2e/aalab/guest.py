"""Helpers for a payload's ``run`` script inside the aalab guest (stdlib only).

vm.Payload copies this file to /payload/guest.py; the guest init runs /payload/run with
/payload on PYTHONPATH and QLAB_RESULTS naming the results port::

    #!/usr/bin/python3
    from guest import step, sh, virsh, denials, mark

    since = mark()
    with step("start") as s:
        r = virsh("start", "vm1")
        s.check(r.returncode == 0, r.stderr)
        s.data["pid"] = qemu_pid("vm1")
    with step("denials", keep_going=True) as s:
        s.check(not denials(since), "DENIED lines")

Each step writes one JSON line (``step``, ``ok``, ``seconds``, ``uptime``, ``data``,
``error``).  A failing step ends the script (its exception propagates) unless
``keep_going=True``: later steps usually depend on the earlier ones.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULTS = os.environ.get("QLAB_RESULTS", "/dev/ttyS1")
OUT = Path(os.environ.get("QLAB_OUT", "/payload/out"))
IMAGES = Path("/var/lib/libvirt/images")
QEMU = "/usr/bin/qemu-system-x86_64"
TAIL = 3000


def emit(record: dict[str, Any]) -> None:
    """One JSON line on the results port, in a single write()."""
    record.setdefault("uptime", float(Path("/proc/uptime").read_text().split()[0]))
    fd = os.open(RESULTS, os.O_WRONLY | os.O_NOCTTY)
    try:
        os.write(fd, (json.dumps(record, default=str) + "\n").encode())
    finally:
        os.close(fd)


class StepFailed(AssertionError):
    pass


class Step:
    def __init__(self, name: str) -> None:
        self.name = name
        self.data: dict[str, Any] = {}

    def check(self, cond: object, why: str) -> None:
        """Fail the step (with why) unless cond holds."""
        if not cond:
            raise StepFailed(why[-TAIL:])


@contextmanager
def step(name: str, *, keep_going: bool = False) -> Iterator[Step]:
    s = Step(name)
    t0 = time.monotonic()
    record: dict[str, Any] = {"step": name, "ok": True}
    print(f"step {name}: begin", flush=True)  # the console names a step that hangs
    try:
        yield s
    except BaseException as exc:
        record["ok"] = False
        if isinstance(exc, StepFailed):
            record["error"] = str(exc)
        else:
            record["error"] = traceback.format_exc()[-TAIL:]
        if not keep_going:
            raise
    finally:
        record["seconds"] = round(time.monotonic() - t0, 2)
        record["data"] = s.data
        emit(record)
        print(f"step {name}: {'ok' if record['ok'] else 'FAILED'}", flush=True)


def sh(
    argv: list[str],
    *,
    check: bool = False,
    timeout: float = 300,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv (never a shell), capturing text output; check=True raises with stderr."""
    r = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        input=input,
        env=None if env is None else dict(os.environ, **env),
        check=False,
    )
    if check and r.returncode != 0:
        raise StepFailed(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}")
    return r


def virsh(
    *args: str, check: bool = False, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return sh(["virsh", "-c", "qemu:///system", *args], check=check, timeout=timeout)


def kmsg() -> list[tuple[int, str]]:
    """(sequence number, text) of every kernel log record still in the ring buffer."""
    records = []
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                raw = os.read(fd, 16384)
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten while we read: skip it
                    continue
                if exc.errno == errno.EAGAIN:
                    break
                raise
            head, _, text = raw.decode(errors="replace").partition(";")
            records.append((int(head.split(",")[1]), text.split("\n", 1)[0]))
    finally:
        os.close(fd)
    return records


def mark() -> int:
    """A point in the kernel log: denials(mark()) sees only what comes later."""
    records = kmsg()
    return records[-1][0] if records else -1


def denials(since: int = -1) -> list[str]:
    """The kernel's apparmor="DENIED" audit lines after the mark (all by default)."""
    return [text for seq, text in kmsg() if seq > since and 'apparmor="DENIED"' in text]


def tiny_domain(
    name: str, disk: str, *, emulator: str = QEMU, fmt: str = "raw", extra_devices: str = ""
) -> str:
    """A 64 MiB TCG domain with one virtio disk, no NIC, no graphics, a pty serial."""
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
        "<features><acpi/></features>"
        f"<devices><emulator>{emulator}</emulator>"
        f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
        f"{extra_devices}<serial type='pty'/><console type='pty'/></devices></domain>"
    )


def define(name: str, xml: str) -> None:
    path = Path("/tmp") / f"{name}.xml"
    path.write_text(xml)
    virsh("define", str(path), check=True)


def qemu_pid(name: str) -> int:
    """The pid of a running domain's QEMU (libvirt's pidfile)."""
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())


def label(pid: int) -> str:
    """The AppArmor confinement of a process, e.g. 'libvirt-UUID (enforce)'."""
    return Path(f"/proc/{pid}/attr/current").read_text().strip()
