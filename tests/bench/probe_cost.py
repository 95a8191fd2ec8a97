"""What asking the QEMU binary about an option no table knows costs (start.probe):
a cache miss runs QEMU's first pass once, a hit reads the per-binary cache file."""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

from qemu_locked.start import probe

ROUNDS = 30


def probe_rows() -> list[str]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return ["| start.probe | qemu-system-x86_64 not installed |"]
    misses, hits = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(ROUNDS):
            cache = os.path.join(tmp, f"c{i}")
            t = time.perf_counter()
            probe.Prober(qemu, cache)("drive")  # nothing cached: QEMU's first pass runs
            misses.append(time.perf_counter() - t)
            t = time.perf_counter()
            probe.Prober(qemu, cache)("drive")  # a new start: answered from the file
            hits.append(time.perf_counter() - t)
    return [
        f"| unknown option, cache miss (one QEMU first pass) | {statistics.median(misses) * 1e3:.1f} ms |",
        f"| unknown option, cache hit | {statistics.median(hits) * 1e3:.2f} ms |",
    ]
