"""QMP client, a hand-started guarded QEMU and a relay whose QEMU is played by
the test, shared by the guard tests (test_guard.py, test_guard_steady.py,
test_sanlock.py)."""

from __future__ import annotations

import _socket
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from conftest import QEMU_LOCKED, base_env

from qemu_locked.lock import procfs

if TYPE_CHECKING:
    from qemu_locked.beside.guard.policy import Policy
    from qemu_locked.beside.guard.relay import Relay

QEMU = shutil.which("qemu-system-x86_64")


def guard_env(**extra: str) -> dict[str, str]:
    """The real QEMU with the monitor guard: only where the supervisor is off."""
    return base_env(QEMU_LOCKED_EMULATOR=str(QEMU), QEMU_LOCKED_SUPERVISOR="false",
                    QEMU_LOCKED_MONITOR_GUARD="true", **extra)  # fmt: skip


def helper_of(comm: str, qemu_pid: int) -> int:
    """The helper beside this QEMU (ql-guard, ql-supervisor): its pidfd names it."""
    for pid in procfs.pids():
        if procfs.comm(pid) != comm:
            continue
        for _fd, target, info in procfs.fd_entries(pid):
            if "pidfd" in target and f"Pid:\t{qemu_pid}\n" in info:
                return pid
    raise AssertionError(f"no {comm} for QEMU pid {qemu_pid}")


class QMP:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)  # a guard that stops answering fails the test, not hangs it
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.greeting = json.loads(self.file.readline())
        self.serial = 0

    def send(self, raw: bytes, fds: list[int] | None = None) -> None:
        raw_fds = b"".join(f.to_bytes(4, "little") for f in fds or [])
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, raw_fds)] if fds else []
        sent = self.sock.sendmsg([raw], anc)  # the fds go with the first bytes
        self.sock.sendall(raw[sent:])  # (with a timeout, sendmsg may send only part)

    def reply(self) -> dict[str, object]:
        while True:
            line = self.file.readline()
            assert line, "the monitor closed"
            obj: dict[str, object] = json.loads(line)
            if "event" not in obj:
                return obj

    def cmd(self, name: str, fds: list[int] | None = None, **args: object) -> dict[str, object]:
        self.serial += 1
        msg: dict[str, object] = {"execute": name, "id": f"t{self.serial}"}
        if args:
            msg["arguments"] = args
        self.send(json.dumps(msg).encode() + b"\r\n", fds)
        obj = self.reply()
        while "id" not in obj:  # QEMU's answer to input it could not parse
            obj = self.reply()
        assert obj.get("id") == msg["id"], obj
        return obj

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Domain:
    """qemu-locked + the real QEMU with a libvirt-style monitor (listening fd N)."""

    def __init__(self, tmp: Path, name: str, disks: list[str], env: dict[str, str] | None = None,
                 ) -> None:  # fmt: skip
        self.path = str(tmp / f"{name}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(4)
        n = listener.fileno()
        args = ["-name", f"guest={name}", "-S", "-nodefaults", "-machine", "pc", "-accel", "tcg",
                "-m", "32", "-display", "none", "-no-user-config",
                "-chardev", f"socket,id=charmonitor,fd={n},server=on,wait=off",
                "-mon", "chardev=charmonitor,id=monitor,mode=control",
                "-device", '{"driver":"virtio-scsi-pci","id":"scsi0"}']  # fmt: skip
        for i, disk in enumerate(disks):
            args += ["-blockdev", json.dumps({"driver": "file", "filename": disk,
                                              "node-name": f"s{i}", "auto-read-only": True}),
                     "-blockdev", json.dumps({"driver": "qcow2", "node-name": f"f{i}",
                                              "read-only": False, "file": f"s{i}", "backing": None}),
                     "-device", json.dumps({"driver": "scsi-hd", "bus": "scsi0.0", "scsi-id": i,
                                            "drive": f"f{i}", "id": f"d{i}"})]  # fmt: skip
        self.proc = subprocess.Popen(
            [QEMU_LOCKED, *args], pass_fds=(n,), stderr=subprocess.PIPE, text=True,
            env=env or guard_env(),
        )  # fmt: skip
        listener.close()

    def qmp(self) -> QMP:
        q = QMP(self.path)
        assert q.cmd("qmp_capabilities") == {"return": {}, "id": "t1"}
        return q

    def guard(self) -> int:
        for pid in procfs.pids():
            if procfs.comm(pid) == procfs.GUARD_COMM:
                for _fd, target, info in procfs.fd_entries(pid):
                    if "pidfd" in target and f"Pid:\t{self.proc.pid}\n" in info:
                        return pid
        raise AssertionError("no guard")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class FakeQemu:
    """The QEMU side of the guard's relay, played by the test: it says what it likes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(30)
        self.file = sock.makefile("rb")

    def say(self, text: bytes) -> None:
        self.sock.sendall(text)

    def command(self) -> tuple[dict[str, object], list[int]]:
        """The next command the guard sends (its fds too)."""
        buf = b""
        fds: list[int] = []
        while b"\n" not in buf and not buf.rstrip().endswith(b"}"):
            data, anc, _f, _a = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(64))
            assert data, "the guard closed QEMU's monitor"
            buf += data
            for _lvl, _typ, raw in anc:
                fds += [int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), 4)]
        return json.loads(buf), fds

    def raw(self) -> bytes:
        """The next command's bytes as they came, from its first byte to its line
        end (the line end of a command the guard answered itself, whitespace to
        QEMU, is skipped)."""
        buf = b""
        while not buf.strip() or not buf.endswith(b"\n"):
            data = self.sock.recv(1 << 16)
            assert data, "the guard closed QEMU's monitor"
            buf += data
        return buf.lstrip()

    def answer(self, cmd: dict[str, object], ret: object = None) -> None:
        reply = {"return": {} if ret is None else ret, "id": cmd.get("id")}
        self.say(json.dumps(reply).encode() + b"\r\n")

    def next_from_client(self, fds: list[int]) -> dict[str, object]:
        """The next command that is not the guard's own getfd/closefd (those are
        answered here; the fds they bring are added to ``fds``)."""
        cmd, got = self.command()
        fds += got
        while cmd["execute"] in ("getfd", "closefd"):
            self.answer(cmd)
            cmd, got = self.command()
            fds += got
        return cmd

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@contextmanager
def played_qemu(tmp: Path, policy: Policy | None = None) -> Iterator[tuple[Relay, FakeQemu, str]]:
    """The guard's relay in a thread, its QEMU played by the test (this process:
    its /proc/PID/fd is what the policy inspects) and a stand-in "VM" whose exit
    ends the relay.  Yields the relay, QEMU's side and libvirt's socket path,
    after QEMU's greeting was said."""
    from qemu_locked.beside.guard.relay import Relay

    path = str(tmp / "monitor.sock")
    guard_end, qemu_end = socket.socketpair()
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    stand_in = subprocess.Popen(["sleep", "600"])
    pidfd = os.pidfd_open(stand_in.pid)
    relay = Relay(_socket.socket(fileno=guard_end.detach()), listener, pidfd, policy)
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    qemu = FakeQemu(qemu_end)
    qemu.say(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
    try:
        yield relay, qemu, path
        assert thread.is_alive(), "the relay stopped while its VM ran (in production: the VM too)"
    finally:
        stand_in.kill()
        stand_in.wait()
        thread.join(10)
        os.close(pidfd)
        qemu.close()
        listener.close()
    assert not thread.is_alive(), "the relay outlived its VM"


def policy_for(tmp: Path, guest: str) -> Policy:
    """The guard's lock policy (direct backend) for a VM this test process plays."""
    from qemu_locked.beside.guard.nodes import Graph
    from qemu_locked.beside.guard.policy import Policy
    from qemu_locked.beside.locks import Locks
    from qemu_locked.model.config import Config
    from qemu_locked.model.plan import Plan

    config = Config(lockspace_dir=str(tmp / "none"))
    return Policy(Graph(), Locks(config, Plan((), (), guest, None), os.getpid()))


def negotiated(qemu: FakeQemu, path: str) -> QMP:
    """The first client, its qmp_capabilities answered by (played) QEMU."""
    client = QMP(path)
    client.send(b'{"execute": "qmp_capabilities", "id": 1}\r\n')
    cmd, _fds = qemu.command()
    qemu.answer(cmd)
    assert client.reply() == {"return": {}, "id": 1}
    return client
