"""Supervisor numbers for `make bench`: the real QEMU started by qemu-locked with
and without the seccomp supervisor, side by side in one run (rounds alternate).

- start: exec of qemu-locked to QEMU's QMP greeting, 4 qcow2 disks (-drive);
- QMP: 1,000 query-status round trips on the monitor (the supervisor never sees
  them: only opens are trapped);
- trapped calls per start: the opens QEMU makes from exec to the greeting and
  quit, counted by strace on the same command line without the supervisor.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
QEMU_LOCKED = str(Path(sys.executable).parent / "qemu-locked")
ROUNDS = 15
QUERIES = 1000


def _args(tmp: str, sock: str) -> list[str]:
    disks = []
    for i in range(4):
        path = os.path.join(tmp, f"d{i}.qcow2")
        if not os.path.exists(path):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "16M"], check=True)
        disks += ["-drive", f"file={path},if=none,id=d{i}"]
    return ["-name", "guest=bench", "-S", "-nodefaults", "-machine", "pc", "-accel", "tcg",
            "-display", "none", "-no-user-config", *disks,
            "-qmp", f"unix:{sock},server=on,wait=off"]  # fmt: skip


def _env(cfg: str, supervised: bool) -> dict[str, str]:
    return dict(os.environ, QEMU_LOCKED_CONFIG=cfg, QEMU_LOCKED_EMULATOR=QEMU,
                QEMU_LOCKED_MONITOR_GUARD="false",
                QEMU_LOCKED_SUPERVISOR="true" if supervised else "false")  # fmt: skip


def _greeted(
    tmp: str, cfg: str, supervised: bool
) -> tuple[float, socket.socket, subprocess.Popen[bytes]]:
    sock_path = os.path.join(tmp, "q.sock")
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    t0 = time.perf_counter()
    proc = subprocess.Popen([QEMU_LOCKED, *_args(tmp, sock_path)], env=_env(cfg, supervised),
                            stderr=subprocess.DEVNULL)  # fmt: skip
    s = _greeting(sock_path)
    return time.perf_counter() - t0, s, proc


def _greeting(sock_path: str) -> socket.socket:
    """Connected to QEMU's monitor, its greeting read.  The socket file appears
    at bind, before listen: retried until QEMU listens."""
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(sock_path)
            break
        except OSError:
            s.close()
            time.sleep(0.0005)
    s.recv(4096)
    return s


def _quit(s: socket.socket, proc: subprocess.Popen[bytes]) -> None:
    s.sendall(b'{"execute":"qmp_capabilities"}\r\n{"execute":"quit"}\r\n')
    proc.wait(30)
    s.close()


def _round_trips(s: socket.socket) -> float:
    s.sendall(b'{"execute":"qmp_capabilities"}\r\n')
    s.recv(4096)
    t0 = time.perf_counter()
    for _ in range(QUERIES):
        s.sendall(b'{"execute":"query-status"}\r\n')
        s.recv(4096)
    return (time.perf_counter() - t0) / QUERIES


def _trapped(tmp: str) -> int:
    """Trapped calls QEMU makes for one start and quit (strace, no supervisor): the
    path-opening ones and fcntl's F_DUPFD / F_DUPFD_CLOEXEC."""
    sock_path = os.path.join(tmp, "t.sock")
    out = os.path.join(tmp, "strace.txt")
    proc = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=open,openat,creat,openat2,fcntl",
                             "-o", out, QEMU, *_args(tmp, sock_path)],
                            stderr=subprocess.DEVNULL)  # fmt: skip
    _quit(_greeting(sock_path), proc)  # type: ignore[arg-type]
    # A call another thread interrupted is printed twice (unfinished, resumed): count it once.
    lines = Path(out).read_text().splitlines()
    return sum(1 for line in lines if "resumed>" not in line
               and ("open" in line or "F_DUPFD" in line))  # fmt: skip


def run() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "empty.toml")
        Path(cfg).write_text("")
        starts: dict[bool, list[float]] = {False: [], True: []}
        rtts: dict[bool, list[float]] = {False: [], True: []}
        for i in range(ROUNDS):
            for supervised in (False, True) if i % 2 else (True, False):
                took, s, proc = _greeted(tmp, cfg, supervised)
                starts[supervised].append(took)
                rtts[supervised].append(_round_trips(s))
                s.sendall(b'{"execute":"quit"}\r\n')
                proc.wait(30)
                s.close()
        trapped = _trapped(tmp) if shutil.which("strace") else -1
    med = {k: statistics.median(v) for k, v in starts.items()}
    rtt = {k: statistics.median(v) for k, v in rtts.items()}
    paired = statistics.median(b / a for a, b in zip(starts[False], starts[True], strict=True))
    return [
        "Real QEMU 7.2 (TCG, `-machine pc`, 4 qcow2 `-drive`s, QMP monitor by path), monitor guard off in",
        f"both columns; medians of {ROUNDS} alternating rounds.", "",
        "| what | without supervisor | with supervisor | ratio |", "|---|---:|---:|---:|",
        f"| exec -> QMP greeting | {med[False] * 1e3:.1f} ms | {med[True] * 1e3:.1f} ms | "
        f"{med[True] / med[False]:.3f}x (paired {paired:.3f}x, +{(med[True] - med[False]) * 1e3:.1f} ms) |",
        f"| query-status round trip ({QUERIES} per round) | {rtt[False] * 1e6:.1f} us | "
        f"{rtt[True] * 1e6:.1f} us | {rtt[True] / rtt[False]:.3f}x |",
        "",
        f"Calls QEMU makes from exec to its greeting and quit that are trapped (opens, fcntl dups): {trapped}.",
    ]  # fmt: skip


if __name__ == "__main__":
    print("\n".join(run()))
