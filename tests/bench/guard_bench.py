"""Monitor guard numbers for `make bench`: QMP round trips through the guard vs.
QEMU's socket directly, and the guard's memory with 20 VMs.

Each VM is the real QEMU (``-machine none``, TCG) started by qemu-locked the way
libvirt starts it: a listening monitor socket passed as fd N.  With
``monitor_guard = false`` the client talks to QEMU itself; with ``true`` to the guard.
Two reference relays, each in front of a QEMU of its own, show what any process
between libvirt and QEMU costs on this machine: a bare Python relay (poll, recv,
send) and the same in C (relay_floor.c, compiled here).  All four paths are
measured in one run, in rotating blocks, so that the machine's noise hits each alike.
"""

from __future__ import annotations

import os
import select
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
               QEMU_LOCKED_SUPERVISOR="false",  # the guard runs only without it
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


def bare_relay(listen: str, target: str) -> int:
    """A forked bare Python relay (the pid): what the guard's steady loop is measured against."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(listen)
    listener.listen(1)
    pid = os.fork()
    if pid:
        listener.close()
        return pid
    try:
        client, _ = listener.accept()
        qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        qemu.connect(target)
        poller = select.poll()
        for sock in (client, qemu):
            poller.register(sock, select.POLLIN)
        peer = {client.fileno(): (client, qemu), qemu.fileno(): (qemu, client)}
        while True:
            for fd, _ev in poller.poll():
                src, dst = peer[fd]
                data = src.recv(65536)
                if not data:
                    os._exit(0)
                dst.sendall(data)
    finally:
        os._exit(1)


def c_relay(tmp: str, listen: str, target: str) -> subprocess.Popen[bytes]:
    exe = os.path.join(tmp, "relay_floor")
    cc = shutil.which("cc") or shutil.which("gcc") or "cc"
    subprocess.run([cc, "-O2", "-o", exe, str(Path(__file__).with_name("relay_floor.c"))],
                   check=True)  # fmt: skip
    proc = subprocess.Popen([exe, listen, target])
    while not os.path.exists(listen):
        time.sleep(0.01)
    return proc


PATHS = ("direct", "guard", "python relay", "C relay")


def run(rounds: int = 1000, block: int = 20, vms: int = 20) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "empty.toml")
        Path(cfg).write_text(f'lockspace_dir = "{tmp}/none"\n')
        procs: list[subprocess.Popen[bytes]] = []
        kids: list[int] = []
        try:
            direct_p, direct_path = start(tmp, "direct", False, cfg)
            guard_p, guard_path = start(tmp, "guarded", True, cfg)
            py_p, py_qemu = start(tmp, "py", False, cfg)
            c_p, c_qemu = start(tmp, "c", False, cfg)
            procs += [direct_p, guard_p, py_p, c_p]
            time.sleep(1.0)  # the QEMUs up (the client's connect would queue anyway)
            py_path, c_path = os.path.join(tmp, "py-relay.sock"), os.path.join(tmp, "c-relay.sock")
            kids.append(bare_relay(py_path, py_qemu))
            procs.append(c_relay(tmp, c_path, c_qemu))
            paths = (direct_path, guard_path, py_path, c_path)
            clients = {name: Client(path) for name, path in zip(PATHS, paths, strict=True)}
            per: dict[str, list[float]] = {name: [] for name in PATHS}
            for i in range(rounds // block):  # each path once per turn, in rotating order
                for name in PATHS[i % 4 :] + PATHS[: i % 4]:
                    client = clients[name]
                    t0 = time.perf_counter()
                    for _ in range(block):
                        client.round_trip()
                    per[name].append((time.perf_counter() - t0) / block)
            med = {name: statistics.median(v) for name, v in per.items()}
            total = {name: sum(v) * block for name, v in per.items()}
            for i in range(vms - 1):
                procs.append(start(tmp, f"vm{i}", True, cfg)[0])
            time.sleep(2.0)
            mine = [pid for pid in guards() if pss_kib(pid)]
            pss = [pss_kib(pid) for pid in mine]
        finally:
            for p in procs:
                p.kill()
                p.wait()
            for pid in kids:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
    d = med["direct"]
    rows = [
        f"| {label} | {med[name] * 1e6:.0f} us | {med[name] / d:.2f}x | {total[name] * 1e3:.0f} ms |"
        for name, label in zip(
            PATHS,
            (
                "QEMU's socket directly",
                "through the guard",
                "through a bare Python relay",
                "through a bare C relay",
            ),
            strict=True,
        )  # fmt: skip
    ]
    g, py, c = med["guard"], med["python relay"], med["C relay"]
    return [
        f"{rounds} sequential `query-status` round trips per path, rotating blocks of {block}:",
        "",
        "| path | median per round trip | / direct | total |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        f"Ratio guard / direct: {g / d:.2f}x (target <= 1.10x); guard / Python relay "
        f"{g / py:.2f}x; C relay / direct {c / d:.2f}x (the floor for any relay here).",
        "",
        f"Guard PSS with {len(pss)} guarded VMs: median {statistics.median(pss) / 1024:.1f} MiB, "
        f"max {max(pss) / 1024:.1f} MiB (target <= 8 MiB).",
    ]


if __name__ == "__main__":
    sys.stdout.write("\n".join(run()) + "\n")
