"""Monitor guard numbers for `make bench`: QMP round trips through the guard vs.
QEMU's socket directly, and the guard's memory with 20 VMs.

Each VM is the real QEMU (``-machine none``, TCG) started by qemu-locked the way
libvirt starts it: a listening monitor socket passed as fd N.  With
``monitor_guard = false`` the client talks to QEMU itself; with ``true`` to the guard.
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
BIN = Path(sys.executable).parent
QEMU_LOCKED = str(BIN / "qemu-locked")
QUERY = b'{"execute": "query-status", "id": 1}\r\n'


class Client:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        self.line()  # greeting
        self.sock.sendall(b'{"execute": "qmp_capabilities"}\r\n')
        self.line()

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf.split(b"\n", 1)
        return out

    def round_trip(self) -> None:
        self.sock.sendall(QUERY)
        self.line()


def start(tmp: str, name: str, guard: bool, cfg: str) -> tuple[subprocess.Popen[bytes], str]:
    path = os.path.join(tmp, f"{name}.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    n = listener.fileno()
    args = [QEMU_LOCKED, "-name", f"guest={name}", "-S", "-nodefaults", "-machine", "none",
            "-display", "none", "-no-user-config",
            "-chardev", f"socket,id=charmonitor,fd={n},server=on,wait=off",
            "-mon", "chardev=charmonitor,id=monitor,mode=control"]  # fmt: skip
    env = dict(os.environ, QEMU_LOCKED_CONFIG=cfg, QEMU_LOCKED_EMULATOR=QEMU,
               QEMU_LOCKED_MONITOR_GUARD="true" if guard else "false")  # fmt: skip
    proc = subprocess.Popen(args, pass_fds=(n,), env=env, stderr=subprocess.DEVNULL)
    listener.close()
    return proc, path


def guards() -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and Path(f"/proc/{pid}/comm").read_text().strip() == "ql-guard":
                out.append(int(pid))
        except OSError:
            continue
    return out


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def run(rounds: int = 1000, block: int = 20, vms: int = 20) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "empty.toml")
        Path(cfg).write_text(f'lockspace_dir = "{tmp}/none"\n')
        procs = []
        try:
            direct_p, direct_path = start(tmp, "direct", False, cfg)
            guard_p, guard_path = start(tmp, "guarded", True, cfg)
            procs += [direct_p, guard_p]
            time.sleep(1.0)  # both QEMUs up (the client's connect would queue anyway)
            clients = {"direct": Client(direct_path), "guard": Client(guard_path)}
            per: dict[str, list[float]] = {"direct": [], "guard": []}
            for _ in range(rounds // block):  # alternating blocks, one run
                for name, client in clients.items():
                    t0 = time.perf_counter()
                    for _ in range(block):
                        client.round_trip()
                    per[name].append((time.perf_counter() - t0) / block)
            d, g = statistics.median(per["direct"]), statistics.median(per["guard"])
            total = {k: sum(v) * block for k, v in per.items()}
            for i in range(vms - 1):
                procs.append(start(tmp, f"vm{i}", True, cfg)[0])
            time.sleep(2.0)
            mine = [pid for pid in guards() if pss_kib(pid)]
            pss = [pss_kib(pid) for pid in mine]
        finally:
            for p in procs:
                p.kill()
                p.wait()
    return [
        f"{rounds} sequential `query-status` round trips, alternating blocks of {block}:",
        "",
        "| path | median per round trip | total |",
        "|---|---:|---:|",
        f"| QEMU's socket directly | {d * 1e6:.0f} us | {total['direct'] * 1e3:.0f} ms |",
        f"| through the guard | {g * 1e6:.0f} us | {total['guard'] * 1e3:.0f} ms |",
        "",
        f"Ratio guard / direct: {g / d:.2f}x (target <= 1.10x).",
        "",
        f"Guard PSS with {len(pss)} guarded VMs: median {statistics.median(pss) / 1024:.1f} MiB, "
        f"max {max(pss) / 1024:.1f} MiB (target <= 8 MiB).",
    ]


if __name__ == "__main__":
    sys.stdout.write("\n".join(run()) + "\n")
