"""QMP client and a hand-started guarded QEMU, shared by the guard tests
(test_guard.py, test_sanlock.py)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

from conftest import QEMU_LOCKED, base_env

from qemu_locked.lock import procfs

QEMU = shutil.which("qemu-system-x86_64")


class QMP:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.greeting = json.loads(self.file.readline())
        self.serial = 0

    def send(self, raw: bytes, fds: list[int] | None = None) -> None:
        raw_fds = b"".join(f.to_bytes(4, "little") for f in fds or [])
        self.sock.sendmsg([raw], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, raw_fds)] if fds else [])

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
            env=env or base_env(QEMU_LOCKED_EMULATOR=str(QEMU)),
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
