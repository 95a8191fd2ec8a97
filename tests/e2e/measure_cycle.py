"""Measure one ``virsh start`` + ``virsh destroy`` cycle of a 64 MiB TCG domain:
the stock emulator, the same domain under qemu-locked, and the stock emulator
with libvirt's lock_manager = "lockd" (virtlockd).

Plain and qemu-locked cycles alternate (so drift hits both alike); lockd needs
a libvirtd restart, so its cycles run as a block between two more plain blocks.
Medians of N cycles each (default 15; at least 10), wall time of the two virsh
commands.  Root only; the lab (tests/e2e/lab.py) starts and stops what it needs.

Run: .venv/bin/python tests/e2e/measure_cycle.py [N]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e import lab as L


def cycle(lab: L.Lab, name: str) -> float:
    t0 = time.perf_counter()
    lab.virsh("start", name)
    lab.virsh("destroy", name)
    return time.perf_counter() - t0


def main(n: int) -> dict[str, object]:
    daemons, images = L.setup()
    lab = L.Lab(daemons, images)
    times: dict[str, list[float]] = {"plain": [], "qemu-locked": [], "lockd": []}
    try:
        plain = lab.define(
            L.domain_xml(f"{L.PREFIX}m-plain", [L.disk_xml(lab.image("m-plain.qcow2"))]),
            locked=False,
        )
        locked = lab.define(
            L.domain_xml(f"{L.PREFIX}m-locked", [L.disk_xml(lab.image("m-locked.qcow2"))])
        )
        for name in (plain, locked):  # warm-up: probes, caches
            cycle(lab, name)
        for _ in range(n):
            times["plain"].append(cycle(lab, plain))
            times["qemu-locked"].append(cycle(lab, locked))
        if "libvirtd" in daemons.started:
            original = L.write_conf_block(L.QEMU_CONF, 'lock_manager = "lockd"')
            try:
                daemons.ensure_virtlockd()
                daemons.restart_libvirtd()
                cycle(lab, plain)
                for _ in range(n):
                    times["lockd"].append(cycle(lab, plain))
            finally:
                L.restore_conf(L.QEMU_CONF, original)
                daemons.restart_libvirtd()
                daemons.stop("virtlockd")
            cycle(lab, plain)
            for _ in range(n // 2):
                times["plain"].append(cycle(lab, plain))
        else:
            L.log("libvirtd not started by the lab: lockd not measured")
    finally:
        lab.cleanup()
        L.shutdown(daemons, images)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    paired = [q / p for p, q in zip(times["plain"], times["qemu-locked"], strict=False)]
    result: dict[str, object] = {
        "cycles": {k: len(v) for k, v in times.items()},
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "ratio_to_plain": {k: round(v / med["plain"], 3) for k, v in med.items()},
        "paired_ratio_qemu_locked": round(statistics.median(paired), 3),
    }
    return result


if __name__ == "__main__":
    count = max(10, int(sys.argv[1])) if len(sys.argv) > 1 else 15
    print(json.dumps(main(count), indent=2))
