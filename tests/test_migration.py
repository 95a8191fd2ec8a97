"""Live migration on one host with the real QEMU (TCG): the destination starts
instead of being refused, and ends up holding the locks once the source quits;
a third start is refused throughout.  With the direct and the lockspace backend
(the latter with the domain lease on)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import QEMU_LOCKCTL, QEMU_LOCKED, base_env, byte0_modes
from guard_helpers import helper_of

from qemu_locked.backends.lockspace import leases
from qemu_locked.lock.procfs import SUPERVISOR_COMM

QEMU = "/usr/bin/qemu-system-x86_64"
if not os.path.exists(QEMU):
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI: qemu-system-x86_64 must be installed (make test installs it)")
    pytest.skip("qemu-system-x86_64 not installed", allow_module_level=True)

UUID = "7d3c9a1e-2b4f-4c6d-8e9f-0a1b2c3d4e5f"


class QMP:
    def __init__(self, path: str, deadline: float = 30) -> None:
        end = time.monotonic() + deadline
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                assert time.monotonic() < end, f"no QMP socket at {path}"
                time.sleep(0.05)
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: object) -> object:
        self.file.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.file.flush()
        while True:
            msg = json.loads(self.file.readline())
            if "return" in msg or "error" in msg:
                assert "error" not in msg, msg
                return msg["return"]

    def close(self) -> None:
        self.sock.close()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


def qemu(
    tmp: Path, name: str, image: str, env: dict[str, str], *extra: str
) -> subprocess.Popen[str]:
    args = [QEMU_LOCKED, "-name", f"guest={name}", "-uuid", UUID, "-machine", "pc", "-accel", "tcg",
            "-m", "64", "-display", "none", "-nodefaults", "-S",
            "-drive", f"file={image},if=virtio,format=qcow2",
            "-qmp", f"unix:{tmp / (name + '.qmp')},server=on,wait=off", *extra]  # fmt: skip
    return subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def pending_rows(pid: int, env: dict[str, str]) -> list[dict[str, object]]:
    """`qemu-lockctl status --json` rows still pending for this VM (other VMs on
    this host may have rows too: only this one's count)."""
    st = subprocess.run(
        [QEMU_LOCKCTL, "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    rows: list[dict[str, object]] = json.loads(st.stdout)["locks"]
    return [r for r in rows if r["mode"] == "pending" and r["pid"] == pid]


def keepers_of(pid: int) -> list[int]:
    """Keepers serving this VM (they hold a pidfd of it), and any keeper left a
    zombie child of it: both mean "not gone"."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        if stat[stat.index("(") + 1 : stat.rindex(")")] != "ql-keeper":
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            out.append(int(p))
            continue
        try:
            fds = os.listdir(f"/proc/{p}/fdinfo")
            infos = [Path(f"/proc/{p}/fdinfo/{fd}").read_text() for fd in fds]
        except OSError:
            continue
        if any(f"Pid:\t{pid}\n" in info for info in infos):
            out.append(int(p))
    return out


def third_start(image: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [QEMU_LOCKED, "-name", "guest=third", "-machine", "none", "-display", "none", "-nodefaults", "-S",
         "-drive", f"file={image},if=none,format=qcow2"],  # fmt: skip
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def wait_until(cond, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("supervisor", ["false", "true"])
@pytest.mark.parametrize("backend", ["direct", "lockspace"])
def test_live_migration_hands_the_locks_to_the_destination(
    tmp_path: Path, backend: str, supervisor: str
) -> None:
    image = str(tmp_path / "vm.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "32M"], check=True)
    space = tmp_path / "lockspace"
    space.mkdir()
    env = base_env(
        QEMU_LOCKED_EMULATOR=QEMU,
        QEMU_LOCKED_BACKEND=backend,
        QEMU_LOCKED_LOCKSPACE_DIR=str(space),
        QEMU_LOCKED_SUPERVISOR=supervisor,
    )
    port = free_port()
    src = qemu(tmp_path, "src", image, env)
    dst = None
    try:
        src_qmp = QMP(str(tmp_path / "src.qmp"))
        dst = qemu(tmp_path, "dst", image, env, "-incoming", f"tcp:127.0.0.1:{port}")
        dst_qmp = QMP(str(tmp_path / "dst.qmp"))  # started instead of being refused
        assert dst.poll() is None
        # The busy locks are pending, waited for by one process beside QEMU: the
        # supervisor when it is on (no keeper of its own), else the keeper.
        if supervisor == "true":
            assert keepers_of(dst.pid) == [] and helper_of(SUPERVISOR_COMM, dst.pid)
        else:
            assert len(keepers_of(dst.pid)) == 1
        pending = pending_rows(dst.pid, env)
        assert pending and all(r["guest"] == "dst" for r in pending), pending
        assert sorted(r["path"] for r in pending) == sorted([image, f"domain:uuid:{UUID}"])
        r = third_start(image, env)
        assert r.returncode == 3 and f"by pid {src.pid}, guest 'src'" in r.stderr

        src_qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        wait_until(lambda: src_qmp.cmd("query-migrate").get("status") == "completed", "migration")  # type: ignore[attr-defined]
        r = third_start(image, env)
        assert r.returncode == 3, r.stderr  # still protected: the source holds until it quits

        src_qmp.cmd("quit")
        src.wait(30)
        wait_until(lambda: not pending_rows(dst.pid, env), "the pending locks to be taken")
        assert keepers_of(dst.pid) == []  # the keeper exits once it has them
        assert dst.poll() is None
        assert byte0_modes(dst.pid, image) == ["exclusive"]  # every backend: one inode, one lock
        if backend != "direct":
            name = leases.lease_name("file:" + os.path.realpath(image))
            fd = os.open(space / name, os.O_RDONLY)
            try:
                live = [(r.pid, r.guest) for r in leases.read_records(fd) if r.live]
            finally:
                os.close(fd)
            assert live == [(dst.pid, "dst")]
            dom = leases.lease_name("domain:uuid:" + UUID)
            fd = os.open(space / dom, os.O_RDONLY)
            try:
                assert [(r.pid, r.live) for r in leases.read_records(fd) if r.live] == [
                    (dst.pid, True)
                ]
            finally:
                os.close(fd)
        r = third_start(image, env)
        assert r.returncode == 3 and f"by pid {dst.pid}, guest 'dst'" in r.stderr
        assert dst_qmp.cmd("query-status")["status"] in ("prelaunch", "paused", "running")  # type: ignore[index]
        dst_qmp.close()
        src_qmp.close()
    finally:
        for p in (src, dst):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_incoming_timeout_kills_the_vm_and_says_why(tmp_path: Path) -> None:
    """If the 'source' never lets go, the destination is killed (fail closed), with one line."""
    image = str(tmp_path / "vm.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "32M"], check=True)
    env = base_env(
        QEMU_LOCKED_EMULATOR=QEMU, QEMU_LOCKED_INCOMING_WAIT="1", QEMU_LOCKED_DOMAIN_LEASE="false"
    )
    holder = qemu(tmp_path, "holder", image, env)
    try:
        QMP(str(tmp_path / "holder.qmp")).close()
        dst = qemu(tmp_path, "dst", image, env, "-incoming", "defer")
        _out, err = dst.communicate(timeout=60)
        assert dst.returncode == -9
        assert (
            f"qemu-locked: cannot write {image} after 1 s of incoming migration: in use (writing) "
            f"by pid {holder.pid}, guest 'holder'" in err
        )
        assert "killing the VM" in err
    finally:
        holder.kill()
        holder.wait()


def test_incoming_timeout_warn_keeps_the_vm_and_says_why(tmp_path: Path) -> None:
    """incoming_timeout_action = warn: one line naming the holder, the VM runs on."""
    from conftest import VM, make_image

    img = make_image(tmp_path / "w.img")
    holder = VM(["-name", "guest=holder", "-drive", f"file={img}"])
    assert holder.started()
    log = tmp_path / "dst.stderr"
    env = base_env(QEMU_LOCKED_INCOMING_WAIT="1", QEMU_LOCKED_INCOMING_TIMEOUT_ACTION="warn")
    with open(log, "w") as err:
        dst = subprocess.Popen([QEMU_LOCKED, "-name", "guest=dst", "-drive", f"file={img}", "-incoming", "defer"],
                               env=env, stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
    try:
        wait_until(
            lambda: "incoming_timeout_action = warn" in log.read_text(), "the keeper's warning", 30
        )
        wait_until(lambda: not keepers_of(dst.pid), "the keeper to exit")
        assert dst.poll() is None  # warned, not killed
        (line,) = log.read_text().splitlines()
        assert line.startswith(
            f"qemu-locked: cannot write {img} after 1 s of incoming migration: in use (writing) "
            f"by pid {holder.report['pid']}"
        )
        assert byte0_modes(dst.pid, img) == []  # it runs without that lock, as the line says
    finally:
        dst.kill()
        dst.wait()
        holder.kill()
