"""Live migration between the two libvirt 11.3 hosts of tests/e2e/lab11/hosts.py,
for `make bench` (issue 22): `virsh migrate --live --p2p` there and back, each
way timed, and QEMU's downtime from `virsh domjobinfo --completed`, with

- the stock emulator (no lock manager),
- qemu-locked (direct backend, the supervisor on: the default),
- libvirt's lockd (virtlockd, leases in the shared directory; stock emulator),

rounds interleaved (stock and qemu-locked run on one pair of hosts, lockd on a
second pair started for it).  Needs root.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: e2e.lab11

from e2e.lab11.hosts import IMAGES, TwoHosts

ROUNDS = 10
KINDS = {"stock": "/usr/bin/qemu-system-x86_64", "qemu-locked": "/usr/local/bin/qemu-locked"}


def _define(pair: TwoHosts, name: str, emulator: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(pair.images / f"{name}.qcow2"),
                    "32M"], check=True)  # fmt: skip
    xml = (
        f"<domain type='qemu'><name>{name}</name><uuid>{uuid.uuid5(uuid.NAMESPACE_DNS, name)}</uuid>"
        "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
        f"<emulator>{emulator}</emulator><disk type='file' device='disk'>"
        f"<driver name='qemu' type='qcow2'/><source file='{IMAGES}/{name}.qcow2'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>"
    )
    f = pair.work / f"{name}.xml"
    f.write_text(xml)
    for lab in pair.hosts.values():
        lab.virsh("define", str(f))


def _migrate(pair: TwoHosts, name: str, src: str, dst: str) -> tuple[float, float]:
    """(seconds of `virsh migrate`, QEMU's downtime in ms)."""
    lab = pair.hosts[src]
    t0 = time.perf_counter()
    lab.virsh("migrate", "--live", "--p2p", "--unsafe", name, pair.uri(dst), "tcp://127.0.0.1")
    took = time.perf_counter() - t0
    info = lab.virsh("domjobinfo", name, "--completed", check=False).stdout
    down = next((float(ln.split()[2]) for ln in info.splitlines()
                 if ln.startswith("Total downtime:")), float("nan"))  # fmt: skip
    return took, down


def _ping_pong(pair: TwoHosts, name: str, took: list[float], down: list[float]) -> None:
    for src, dst in (("host-a", "host-b"), ("host-b", "host-a")):
        t, d = _migrate(pair, name, src, dst)
        took.append(t)
        down.append(d)


def run() -> list[str]:
    if os.geteuid() != 0:
        return ["Needs root (two libvirt 11.3 hosts in namespaces): not measured."]
    took: dict[str, list[float]] = {k: [] for k in (*KINDS, "lockd")}
    down: dict[str, list[float]] = {k: [] for k in took}
    with tempfile.TemporaryDirectory() as tmp:
        with TwoHosts(Path(tmp) / "ql") as pair:
            for kind, emulator in KINDS.items():
                _define(pair, f"bench-{kind}", emulator)
                pair.hosts["host-a"].virsh("start", f"bench-{kind}")
            for i in range(ROUNDS // 2):  # there and back: two migrations a round
                for kind in KINDS if i % 2 else reversed(list(KINDS)):
                    _ping_pong(pair, f"bench-{kind}", took[kind], down[kind])
        with TwoHosts(Path(tmp) / "lockd", lockd=True) as pair:
            _define(pair, "bench-lockd", KINDS["stock"])
            pair.hosts["host-a"].virsh("start", "bench-lockd")
            for _ in range(ROUNDS // 2):
                _ping_pong(pair, "bench-lockd", took["lockd"], down["lockd"])
    base = statistics.median(took["stock"])
    rows = [
        f"| {kind} | {len(took[kind])} | {statistics.median(took[kind]) * 1e3:.0f} ms | "
        f"{statistics.median(took[kind]) / base:.3f} | {statistics.median(down[kind]):.0f} ms |"
        for kind in took
    ]
    return [
        f"`virsh migrate --live --p2p` of a 64 MiB TCG domain between the two hosts, {ROUNDS} "
        "migrations each (there and back); stock and qemu-locked interleaved on one pair of "
        "hosts, lockd on a pair of its own.",
        "",
        "| emulator | migrations | median time | ratio to stock | median downtime |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ]


if __name__ == "__main__":
    print("\n".join(run()))
