"""Measure what the monitor guard costs under libvirt: ``virsh start`` +
``virsh destroy`` of a 64 MiB TCG domain under qemu-locked with the guard, the
same without it (``monitor_guard = false``) and with the stock emulator; and one
hot-plug (``virsh attach-disk`` + ``detach-disk`` of a SCSI disk) with and
without the guard.  Cycles alternate; medians of N each (default 15).

Run (root): flock /tmp/qemu-locked-e2e.lock .venv/bin/python tests/e2e/measure_guard.py [N]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e import lab as L

SCSI = "<controller type='scsi' index='0' model='virtio-scsi'/>"


def timed(*commands: tuple[str, ...], lab: L.Lab) -> float:
    t0 = time.perf_counter()
    for cmd in commands:
        lab.virsh(*cmd)
    return time.perf_counter() - t0


def main(n: int) -> dict[str, object]:
    daemons, images = L.setup()
    lab = L.Lab(daemons, images)
    # The guard runs only with the supervisor off; both columns say so.
    on = {"QEMU_LOCKED_SUPERVISOR": "false", "QEMU_LOCKED_MONITOR_GUARD": "true"}
    off = {"QEMU_LOCKED_SUPERVISOR": "false", "QEMU_LOCKED_MONITOR_GUARD": "false"}
    times: dict[str, list[float]] = {k: [] for k in (
        "cycle plain", "cycle guard", "cycle no guard", "hot-plug guard", "hot-plug no guard")}  # fmt: skip
    try:
        doms = {}
        for key, locked, env in (("plain", False, None), ("guard", True, on),
                                 ("no guard", True, off)):  # fmt: skip
            xml = L.domain_xml(f"{L.PREFIX}mg-{key.replace(' ', '')}",
                               [L.disk_xml(lab.image(f"mg-{key.replace(' ', '')}.qcow2"))],
                               devices_extra=SCSI)  # fmt: skip
            doms[key] = lab.define(xml, locked=locked, env=env)
        extra = {k: lab.image(f"mg-extra-{i}.qcow2") for i, k in enumerate(("guard", "no guard"))}
        for name in doms.values():
            timed(("start", name), ("destroy", name), lab=lab)  # warm-up: probes, caches
        for _ in range(n):
            for key, name in doms.items():
                times[f"cycle {key}"].append(timed(("start", name), ("destroy", name), lab=lab))
        for key in ("guard", "no guard"):
            lab.virsh("start", doms[key])
        for _ in range(n):
            for key in ("guard", "no guard"):
                attach = ("attach-disk", doms[key], extra[key], "sdb", "--targetbus", "scsi",
                          "--live", "--subdriver", "qcow2")  # fmt: skip
                detach = ("detach-disk", doms[key], "sdb", "--live")
                times[f"hot-plug {key}"].append(timed(attach, detach, lab=lab))
    finally:
        lab.cleanup()
        L.shutdown(daemons, images)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "cycles": n,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "cycle guard / plain": round(med["cycle guard"] / med["cycle plain"], 3),
        "cycle guard / no guard": round(med["cycle guard"] / med["cycle no guard"], 3),
        "hot-plug guard / no guard": round(med["hot-plug guard"] / med["hot-plug no guard"], 3),
    }


if __name__ == "__main__":
    count = max(5, int(sys.argv[1])) if len(sys.argv) > 1 else 15
    print(json.dumps(main(count), indent=2))
