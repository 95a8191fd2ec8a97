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

from probe_cost import probe_rows

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


def fill_lockspace(space: str, n: int) -> None:
    """n leases with (stale) holder records, as a busy cluster leaves them."""
    from qemu_locked.backends.lockspace import leases

    ls = leases.Lockspace(space)
    try:
        for i in range(n):
            key = f"file:/srv/cluster/vm{i}.qcow2"
            fd = ls.open_lease(leases.lease_name(key))
            try:
                me = leases.Identity(f"host{i % 7}", f"vm{i}", None, 100000 + i)
                leases.write_record(fd, 1, key, "exclusive", me)
            finally:
                os.close(fd)
    finally:
        ls.close()


def scale_rows(tmp: str) -> list[str]:
    empty, full = os.path.join(tmp, "ls-empty"), os.path.join(tmp, "ls-10k")
    os.mkdir(empty)
    os.mkdir(full)
    fill_lockspace(full, 10_000)
    args = ["-name", "guest=scale", *disk_args(tmp, 1)]
    cfg = os.path.join(tmp, "empty.toml")
    env = {
        "QEMU_LOCKED_CONFIG": cfg,
        "QEMU_LOCKED_EMULATOR": TRUE,
        "QEMU_LOCKED_BACKEND": "lockspace",
    }
    med = alternate({
        "0 leases": ([QEMU_LOCKED, *args], dict(os.environ, QEMU_LOCKED_LOCKSPACE_DIR=empty, **env)),
        "10,000 leases": ([QEMU_LOCKED, *args], dict(os.environ, QEMU_LOCKED_LOCKSPACE_DIR=full, **env)),
    })  # fmt: skip
    lockctl = str(BIN / "qemu-lockctl")
    status_env = dict(os.environ, QEMU_LOCKED_LOCKSPACE_DIR=full, **env)
    st = alternate(
        {"status": ([lockctl, "status", "--json"], status_env)}, rounds=max(5, ROUNDS // 8)
    )
    rows = [
        f"| one start (1 disk + domain lease), lockspace with {k} | {v * 1e3:.2f} ms |"
        for k, v in med.items()
    ]
    rows.append(
        f"| `qemu-lockctl status --json` over 10,000 leases with records | {st['status'] * 1e3:.0f} ms |"
    )
    fixtures = Path(__file__).resolve().parents[2] / "fixtures" / "domains"
    argvs = sorted(fixtures.glob("*.argv.json"), key=lambda p: len(p.read_text()))
    if argvs:
        import json

        biggest = argvs[-1]
        argv = json.loads(biggest.read_text())
        pl = alternate({"plan": ([lockctl, "plan", "--json", "--", *argv], dict(os.environ, **env))},
                       rounds=max(5, ROUNDS // 8))  # fmt: skip
        rows.append(f"| `qemu-lockctl plan --json` on the largest fixture ({biggest.name}, {len(argv)} args) "
                    f"| {pl['plan'] * 1e3:.0f} ms |")  # fmt: skip
    return rows


def libvirt_cycle() -> list[str]:
    script = Path(__file__).resolve().parents[1] / "e2e" / "measure_cycle.py"
    if os.environ.get("BENCH_LIBVIRT") == "0":
        return ["Skipped (BENCH_LIBVIRT=0)."]
    if os.geteuid() != 0 or not script.exists() or not os.path.exists("/usr/sbin/libvirtd"):
        return ["libvirt not available here (needs root and libvirt-daemon-system): not measured."]
    r = subprocess.run([sys.executable, str(script), os.environ.get("BENCH_CYCLES", "15")],
                       capture_output=True, text=True, timeout=1800)  # fmt: skip
    if r.returncode != 0:
        return [f"libvirt cycle measurement failed: {r.stderr.strip().splitlines()[-1:]}"]
    import json

    res = json.loads(r.stdout)
    med, ratio, n = res["median_s"], res["ratio_to_plain"], res["cycles"]
    rows = ["| emulator | cycles | median start+destroy | ratio to plain |", "|---|---:|---:|---:|"]
    for k in ("plain", "qemu-locked", "lockd"):
        if k in med:
            rows.append(f"| {k} | {n[k]} | {med[k] * 1e3:.0f} ms | {ratio[k]:.3f} |")
    rows += [
        "",
        f"Paired ratio qemu-locked / plain (cycle by cycle): {res['paired_ratio_qemu_locked']:.3f}.",
    ]
    return rows


def plot(
    direct: list[tuple[int, float, float]], lockspace: list[tuple[int, float, float]], png: Path
) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for name, rows in (("direct", direct), ("lockspace", lockspace)):
        ax.plot(
            [max(n, 0.7) for n, _w, _a in rows],
            [(w - a) * 1e3 for _n, w, a in rows],
            marker="o",
            label=name,
        )
    ax.set_xscale("log")
    ax.set_xlabel("disks on the command line (0 plotted at 0.7)")
    ax.set_ylabel("start overhead (ms, median)")
    ax.set_title("qemu-locked start overhead")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    return True


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "BENCHMARKS.md")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "empty.toml")
        Path(cfg).write_text("")
        floor = alternate({"python": ([sys.executable, "-c", "pass"], dict(os.environ)),
                           "python -IS": ([sys.executable, "-IS", "-c", "pass"], dict(os.environ))})  # fmt: skip
        direct = start_overhead(tmp, {"QEMU_LOCKED_CONFIG": cfg})
        space = os.path.join(tmp, "ls")
        os.mkdir(space)
        lockspace = start_overhead(tmp, {"QEMU_LOCKED_CONFIG": cfg, "QEMU_LOCKED_BACKEND": "lockspace",
                                         "QEMU_LOCKED_LOCKSPACE_DIR": space})  # fmt: skip
        scale = scale_rows(tmp)
    lines = ["# Benchmarks", "", f"Written by `make bench` on {time.strftime('%Y-%m-%d')}. {machine_facts()}.", "",
             f"Medians of {ROUNDS} alternating runs per row. The emulator is `/bin/true` (a QEMU that exits at once),",
             "so the wrapped column is qemu-locked's whole cost: interpreter start, parse, lock, exec.", "",
             f"Interpreter floor: `python3 -c pass` {floor['python'] * 1e3:.1f} ms; "
             f"`python3 -IS -c pass` {floor['python -IS'] * 1e3:.1f} ms.", "",
             "## Start overhead, direct backend", "",
             "| disks | emulator alone (ms) | under qemu-locked (ms) | overhead (ms) | overhead / interpreter floor |",
             "|---:|---:|---:|---:|---:|"]  # fmt: skip

    def table(rows: list[tuple[int, float, float]]) -> None:
        for n, wrapped, alone in rows:
            over = wrapped - alone
            lines.append(f"| {n} | {alone * 1e3:.2f} | {wrapped * 1e3:.2f} | {over * 1e3:.2f} | "
                         f"{over / floor['python']:.2f}x |")  # fmt: skip
        per_disk = (rows[-1][1] - rows[1][1]) / (256 - 1)
        lines.extend(["", f"Per extra disk (1 -> 256 disks): {per_disk * 1e3:.3f} ms.", ""])

    table(direct)
    lines += ["## Start overhead, lockspace backend", "",
              "| disks | emulator alone (ms) | under qemu-locked (ms) | overhead (ms) | overhead / interpreter floor |",
              "|---:|---:|---:|---:|---:|"]  # fmt: skip
    table(lockspace)
    png = Path(__file__).with_name("bench-start.png")
    if plot(direct, lockspace, png):
        lines += [
            f"![start overhead against disk count]({png.relative_to(out.resolve().parent)})",
            "",
        ]
    lines += ["## Scale", "", "| what | median |", "|---|---:|", *scale, *probe_rows(), ""]
    import guard_bench  # beside this script (sys.path[0])

    lines += ["## Monitor guard (real QEMU, libvirt-style fd monitor)", "", *guard_bench.run(), ""]
    import supervisor_bench

    lines += ["## Supervisor (seccomp user notification, `supervisor = true`)", "",
              *supervisor_bench.run(), ""]  # fmt: skip
    import migration_bench

    lines += ["## Live migration between two libvirt 11.3 hosts", "", *migration_bench.run(), ""]
    lines += [
        "## libvirt: `virsh start` + `virsh destroy` of a 64 MiB TCG domain",
        "",
        *libvirt_cycle(),
        "",
    ]
    out.write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
