"""make bench: start overhead of qemu-locked, measured side by side in one run.

Writes BENCHMARKS.md (and bench-start.png when matplotlib is installed).  Not
part of make test: timings on a shared 2-core machine are for reading, not
for asserting.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
QEMU_LOCKED = str(BIN / "qemu-locked")
TRUE = "/bin/true"  # "a fake QEMU that exits at once", without interpreter noise
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "40"))


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def alternate(
    cmds: dict[str, tuple[list[str], dict[str, str]]], rounds: int = ROUNDS
) -> dict[str, float]:
    """Median seconds per command, the commands interleaved round by round."""
    samples: dict[str, list[float]] = {k: [] for k in cmds}
    for name, (cmd, env) in cmds.items():  # warm caches once
        timed(cmd, env)
    for _ in range(rounds):
        for name, (cmd, env) in cmds.items():
            samples[name].append(timed(cmd, env))
    return {k: statistics.median(v) for k, v in samples.items()}


def disk_args(tmp: str, n: int) -> list[str]:
    args = []
    for i in range(n):
        p = os.path.join(tmp, f"d{i}.img")
        if not os.path.exists(p):
            with open(p, "wb") as f:
                f.truncate(1 << 20)
        args += ["-blockdev", f'{{"driver":"file","filename":"{p}","node-name":"s{i}","auto-read-only":true}}',
                 "-blockdev", f'{{"node-name":"f{i}","read-only":false,"driver":"raw","file":"s{i}"}}']  # fmt: skip
    return args


def machine_facts() -> str:
    cpu = "?"
    try:
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu} ({os.cpu_count()} cores); kernel {platform.release()}; Python {platform.python_version()}"


def start_overhead(tmp: str, backend_env: dict[str, str]) -> list[tuple[int, float, float]]:
    base = dict(os.environ, QEMU_LOCKED_EMULATOR=TRUE, **backend_env)
    rows = []
    for n in (0, 1, 4, 32, 256):
        args = ["-name", "guest=bench", "-m", "64", *disk_args(tmp, n)]
        med = alternate({"direct": ([TRUE, *args], base), "wrapped": ([QEMU_LOCKED, *args], base)})
        rows.append((n, med["wrapped"], med["direct"]))
    return rows


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "BENCHMARKS.md")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "empty.toml")
        Path(cfg).write_text("")
        floor = alternate({"python": ([sys.executable, "-c", "pass"], dict(os.environ)),
                           "python -IS": ([sys.executable, "-IS", "-c", "pass"], dict(os.environ))})  # fmt: skip
        direct = start_overhead(tmp, {"QEMU_LOCKED_CONFIG": cfg})
    lines = ["# Benchmarks", "", f"Written by `make bench` on {time.strftime('%Y-%m-%d')}. {machine_facts()}.", "",
             f"Medians of {ROUNDS} alternating runs per row. The emulator is `/bin/true` (a QEMU that exits at once),",
             "so the wrapped column is qemu-locked's whole cost: interpreter start, parse, lock, exec.", "",
             f"Interpreter floor: `python3 -c pass` {floor['python'] * 1e3:.1f} ms; "
             f"`python3 -IS -c pass` {floor['python -IS'] * 1e3:.1f} ms.", "",
             "## Start overhead, direct backend", "",
             "| disks | emulator alone (ms) | under qemu-locked (ms) | overhead (ms) | overhead / interpreter floor |",
             "|---:|---:|---:|---:|---:|"]  # fmt: skip
    for n, wrapped, alone in direct:
        over = wrapped - alone
        lines.append(
            f"| {n} | {alone * 1e3:.2f} | {wrapped * 1e3:.2f} | {over * 1e3:.2f} | {over / floor['python']:.2f}x |"
        )
    per_disk = (direct[-1][1] - direct[1][1]) / (256 - 1)
    lines += ["", f"Per extra disk (1 -> 256 disks): {per_disk * 1e3:.3f} ms.", ""]
    out.write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
