"""The supervisor (issue 21, first part): the kernel stops every open the real QEMU
makes, so a disk added through a monitor the guard never sees (-qmp unix:PATH,
HMP) is locked before the open returns, or refused with EBUSY and our line.

Real QEMU 7.2 under TCG, real locks; the holders are other processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QEMU_LOCKED, base_env, lock_free, skip_unless_ci, wait_for
from guard_helpers import QEMU, QMP, helper_of

from qemu_locked.lock import procfs

pytestmark = pytest.mark.qemu
BUSY = "Device or resource busy"


def qcow2(path: Path, size: str = "16M") -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return str(path)


def connect(sock: str, proc: subprocess.Popen[str]) -> QMP:
    """QEMU's monitor, once it listens (the socket file appears at bind, before
    listen: a connect in between is refused)."""
    found: list[QMP] = []

    def up() -> bool:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            found.append(QMP(sock))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        return True

    wait_for(up, "QEMU's QMP socket")
    return found[0]


class VM:
    """qemu-locked with the supervisor, the real QEMU, a QMP monitor given by path."""

    def __init__(self, tmp: Path, *args: str, name: str = "sv", **env_extra: str) -> None:
        if QEMU is None:
            skip_unless_ci("qemu-system-x86_64 (apt: qemu-system-x86)")
        self.sock = str(tmp / f"{name}.sock")
        env = base_env(QEMU_LOCKED_SUPERVISOR="true", QEMU_LOCKED_EMULATOR=str(QEMU), **env_extra)
        self.proc = subprocess.Popen(
            [QEMU_LOCKED, "-name", f"guest={name}", "-accel", "tcg", "-nodefaults", "-display", "none",
             "-m", "64", "-S", *args, "-qmp", f"unix:{self.sock},server=on,wait=off"],
            env=env, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.qmp = connect(self.sock, self.proc)
        assert "return" in self.qmp.cmd("qmp_capabilities")

    def add(self, path: str, node: str, read_only: bool = False) -> dict[str, object]:
        return self.qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": node,
                            "read-only": read_only, "file": {"driver": "file", "filename": path}})  # fmt: skip

    def supervisor(self) -> int:
        return helper_of(procfs.SUPERVISOR_COMM, self.proc.pid)

    def quit(self) -> str:
        try:
            self.qmp.cmd("quit")
        except (AssertionError, OSError):
            pass
        self.qmp.close()
        _out, err = self.proc.communicate(timeout=30)
        return err


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VM]:
    machine = VM(tmp_path, "-drive", f"file={qcow2(tmp_path / 'boot.qcow2')},if=virtio")
    yield machine
    if machine.proc.poll() is None:
        machine.quit()


@pytest.fixture
def holder() -> Iterator[object]:
    """Another process holding a file's byte 0: holder(path, exclusive)."""
    procs: list[subprocess.Popen[str]] = []

    def hold(path: str, exclusive: bool = True) -> int:
        code = ("import os,sys,time; from qemu_locked.lock import ofd; "
                f"fd=os.open({path!r}, os.O_RDWR if {exclusive} else os.O_RDONLY); "
                f"assert ofd.try_lock(fd, {exclusive}); print('held', flush=True); time.sleep(120)")  # fmt: skip
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline() == "held\n"
        procs.append(p)
        return p.pid

    yield hold
    for p in procs:
        p.kill()
        p.wait()


def test_a_disk_added_through_a_path_monitor_is_refused_when_held(
    vm: VM, tmp_path: Path, holder
) -> None:
    disk = qcow2(tmp_path / "held.qcow2")
    pid = holder(disk)
    r = vm.add(disk, "held")
    assert r["error"]["desc"] == f"Could not open '{disk}': {BUSY}", r  # type: ignore[index]
    assert vm.add(disk, "held", read_only=True)["error"]  # shared is refused too: it is written
    err = vm.quit()
    assert (
        f"qemu-locked: cannot write {disk}: in use (writing) by pid {pid} (python3" in err
        or f"qemu-locked: cannot write {disk}: in use (writing) by pid {pid} (python" in err
    ), err


def test_a_free_disk_is_locked_while_attached_and_freed_after(vm: VM, tmp_path: Path) -> None:
    disk = qcow2(tmp_path / "free.qcow2")
    assert "return" in vm.add(disk, "free"), "a free disk is added"
    assert not lock_free(disk, exclusive=False)  # written: exclusive
    assert "return" in vm.qmp.cmd("blockdev-del", **{"node-name": "free"})
    wait_for(lambda: lock_free(disk), "released after blockdev-del", timeout=10)
    assert "return" in vm.add(disk, "ro", read_only=True)
    assert lock_free(disk, exclusive=False) and not lock_free(disk)  # read-only: shared


def test_blockdev_create_does_not_truncate_a_held_disk(vm: VM, tmp_path: Path, holder) -> None:
    disk = qcow2(tmp_path / "data.qcow2", "64M")
    size = os.path.getsize(disk)
    holder(disk)
    r = vm.qmp.cmd("blockdev-create", **{"job-id": "c1",
                   "options": {"driver": "file", "filename": disk, "size": 0}})  # fmt: skip
    if "return" in r:  # a job: it must end in an error, having written nothing
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            jobs = vm.qmp.cmd("query-jobs")["return"]
            if all(j["status"] == "concluded" for j in jobs):  # type: ignore[union-attr,index]
                break
            time.sleep(0.1)
        (job,) = vm.qmp.cmd("query-jobs")["return"]  # type: ignore[misc]
        assert BUSY in job.get("error", ""), job  # type: ignore[union-attr]
    assert os.path.getsize(disk) == size


def test_hmp_drive_add_of_a_held_disk_is_refused(vm: VM, tmp_path: Path, holder) -> None:
    disk = qcow2(tmp_path / "hmp.qcow2")
    holder(disk)
    out = vm.qmp.cmd(
        "human-monitor-command", **{"command-line": f"drive_add 0 if=none,id=h1,file={disk}"}
    )
    assert BUSY in str(out["return"]), out


def test_supervisor_killed_the_disks_stay_locked_and_new_opens_fail(vm: VM, tmp_path: Path) -> None:
    disk = qcow2(tmp_path / "kept.qcow2")
    assert "return" in vm.add(disk, "kept")
    os.kill(vm.supervisor(), signal.SIGKILL)
    time.sleep(0.5)
    assert not lock_free(disk, exclusive=False)  # the copy planted in QEMU holds it
    other = qcow2(tmp_path / "later.qcow2")
    r = vm.add(other, "later")
    assert "Function not implemented" in r["error"]["desc"], r  # type: ignore[index]
    assert vm.qmp.cmd("query-status")["return"]["status"] == "prelaunch"  # type: ignore[index]
    vm.quit()
    assert lock_free(disk)  # and gone with QEMU


def test_doctor_says_whether_this_kernel_can_supervise(tmp_path: Path, monkeypatch) -> None:
    from qemu_locked.admin import doctor_supervisor
    from qemu_locked.model.config import Config

    off = doctor_supervisor.check(Config(supervisor=False))
    assert off.status == "WARN" and "seccomp user notification available" in off.message, off
    assert (
        "disks opened after start are not locked" in off.message and off.fix == "supervisor = true"
    )
    on = doctor_supervisor.check(Config())  # on by default
    assert on.status == "OK" and on.message.startswith("on: "), on
    # A kernel without user_notif (seccomp's list as an older kernel writes it)
    old = tmp_path / "actions_avail"
    old.write_text("kill_process kill_thread trap errno trace log allow\n")
    monkeypatch.setattr(doctor_supervisor, "ACTIONS", str(old))
    unable = doctor_supervisor.check(Config())
    assert unable.status == "FAIL" and "not available" in unable.message, unable
    assert doctor_supervisor.check(Config(supervisor=False)).status == "WARN"


@pytest.mark.parametrize("backend", ["direct", "lockspace"])
def test_two_vms_one_disk_through_the_backend(tmp_path: Path, backend: str) -> None:
    """The lock is the configured backend's (locks, as the guard takes it):
    with lockspace, a lease file too, and the refusal names the other guest."""
    space = tmp_path / "ls"
    space.mkdir()
    extra = {"QEMU_LOCKED_BACKEND": backend, "QEMU_LOCKED_LOCKSPACE_DIR": str(space)}
    disk = qcow2(tmp_path / "one.qcow2")
    first = VM(tmp_path, name="first", **extra)
    second = VM(tmp_path, name="second", **extra)
    try:
        assert "return" in first.add(disk, "d")
        r = second.add(disk, "d")
        assert BUSY in r["error"]["desc"], r  # type: ignore[index]
        if backend == "lockspace":
            assert len(list(space.glob("*.lease"))) >= 3  # the disk's, and each domain's
        first.quit()
        assert "return" in second.add(disk, "d")  # free once the first VM is gone
        err = second.quit()
    finally:
        for vm in (first, second):
            if vm.proc.poll() is None:
                vm.quit()
    assert f"qemu-locked: cannot write {disk}: in use (writing) by pid" in err, err
    assert "guest 'first'" in err, err


def test_no_lease_record_outlives_its_lock(tmp_path: Path) -> None:
    """Lockspace records of QEMU's locks are erased as the supervisor lets them go:
    a hot-plugged disk's when QEMU closes it, the start-time disk's and the domain
    lease's when QEMU is killed outright (the issue 22 lab found a killed migration
    destination's records left behind)."""
    from qemu_locked.backends.lockspace.leases import read_records

    space = tmp_path / "ls"
    space.mkdir()
    extra = {"QEMU_LOCKED_BACKEND": "lockspace", "QEMU_LOCKED_LOCKSPACE_DIR": str(space)}
    boot, added = qcow2(tmp_path / "boot.qcow2"), qcow2(tmp_path / "added.qcow2")
    vm = VM(tmp_path, "-drive", f"file={boot},if=virtio", name="rec", **extra)

    def records() -> list[str]:
        out = []
        for lease in space.glob("*.lease"):
            fd = os.open(lease, os.O_RDONLY)
            try:
                out += [r.path or r.key for r in read_records(fd) if r.pid == vm.proc.pid]
            finally:
                os.close(fd)
        return sorted(out)

    try:
        assert "return" in vm.add(added, "a")
        start = records()
        assert len(start) == 3 and str(added) in start and str(boot) in start, start
        assert "return" in vm.qmp.cmd("blockdev-del", **{"node-name": "a"})
        wait_for(lambda: str(added) not in records(), "the hot-plug's record erased")
        supervisor = vm.supervisor()
        vm.proc.kill()
        vm.proc.wait(30)
        wait_for(lambda: not os.path.exists(f"/proc/{supervisor}"), "the supervisor to exit")
        assert records() == []
    finally:
        if vm.proc.poll() is None:
            vm.quit()


def test_a_supervisor_that_cannot_read_qemu_fails_closed(tmp_path: Path) -> None:
    """Found under AppArmor: /proc/PID/mem denied made every open pass unjudged.
    Now nothing passes: QEMU does not even load its libraries, and we say why.
    (Landlock here denies the read, as AppArmor did there.)"""
    if QEMU is None:
        skip_unless_ci("qemu-system-x86_64 (apt: qemu-system-x86)")
    disk = qcow2(tmp_path / "d.qcow2")
    landlocked = str(Path(__file__).parent / "landlocked.py")
    env = base_env(QEMU_LOCKED_SUPERVISOR="true", QEMU_LOCKED_EMULATOR=str(QEMU))
    r = subprocess.run([sys.executable, landlocked, "--deny-read", "/proc/self/mem", "--",
                        QEMU_LOCKED, "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
                        "-drive", f"file={disk},if=none"],
                       env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode != 0
    assert (
        "qemu-locked: supervisor: /proc/" in r.stderr
        and "/mem: Permission denied: every open QEMU makes is refused" in r.stderr
    ), r.stderr


def test_daemonize_keeps_the_supervisor(tmp_path: Path, holder) -> None:
    """-daemonize: QEMU's first process exits, the daemon keeps the filter."""
    if QEMU is None:
        skip_unless_ci("qemu-system-x86_64 (apt: qemu-system-x86)")
    boot, held = qcow2(tmp_path / "boot.qcow2"), qcow2(tmp_path / "held.qcow2")
    sock, pidfile = str(tmp_path / "d.sock"), str(tmp_path / "qemu.pid")
    env = base_env(QEMU_LOCKED_SUPERVISOR="true", QEMU_LOCKED_EMULATOR=str(QEMU))
    r = subprocess.run([QEMU_LOCKED, "-name", "guest=daemon", "-accel", "tcg", "-nodefaults",
                        "-display", "none", "-S", "-daemonize", "-pidfile", pidfile,
                        "-drive", f"file={boot},if=virtio",
                        "-qmp", f"unix:{sock},server=on,wait=off"],
                       env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr  # returned: the daemon keeps no pipe of the caller's
    pid = int(Path(pidfile).read_text())
    qmp = QMP(sock)
    try:
        assert "return" in qmp.cmd("qmp_capabilities")
        assert not lock_free(boot, exclusive=False)
        holder(held)
        r2 = qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": "h",
                     "file": {"driver": "file", "filename": held}})  # fmt: skip
        assert BUSY in r2["error"]["desc"], r2  # type: ignore[index]
        qmp.cmd("quit")
    finally:
        qmp.close()
        if os.path.exists(f"/proc/{pid}") and procfs.comm(pid).startswith("qemu"):
            os.kill(pid, signal.SIGTERM)  # the daemon this test started, if quit failed
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), "the daemon to exit", timeout=30)
    wait_for(lambda: lock_free(boot), "the start-time lock gone with it", timeout=10)


def test_a_file_a_child_of_qemu_writes_stays_locked_while_it_is_open(
    vm: VM, tmp_path: Path
) -> None:
    """`migrate exec:` runs a shell child; a file a process it starts opens is
    locked through the supervisor, and the sweep counts that process's fds, not
    only QEMU's (QEMU's migration ends when its shell does: the writer here is
    left in the background, holding the file 4 s more)."""
    out = tmp_path / "state.bin"
    cmd = f"(exec 3>{out} </dev/null >/dev/null 2>&1; sleep 4) & cat >/dev/null"
    assert "return" in vm.qmp.cmd("migrate", uri=f"exec:{cmd}")
    wait_for(lambda: vm.qmp.cmd("query-migrate")["return"].get("status") == "completed",  # type: ignore[union-attr]
             "the migration to the child")  # fmt: skip
    time.sleep(2.5)  # two sweeps: the child still has it open
    assert out.exists() and not lock_free(str(out))
    wait_for(lambda: lock_free(str(out)), "the lock to go once the child closed it", timeout=15)


def test_a_disk_handed_over_as_an_fd_is_locked_too(vm: VM, tmp_path: Path, holder) -> None:
    """add-fd, then /dev/fdset/N: QEMU dup()s the fd (no open to trap), so the
    supervisor judges F_DUPFD as the open of the file behind it."""
    held, free = qcow2(tmp_path / "held.qcow2"), qcow2(tmp_path / "free.qcow2")
    pid = holder(held)
    for fdset, path in ((1, held), (2, free)):
        fd = os.open(path, os.O_RDWR)
        try:
            r = vm.qmp.cmd("add-fd", fds=[fd], **{"fdset-id": fdset})
        finally:
            os.close(fd)
        assert "return" in r, r
    r = vm.add("/dev/fdset/1", "h")
    assert BUSY in r["error"]["desc"], r  # type: ignore[index]
    assert "return" in vm.add("/dev/fdset/2", "f")
    assert not lock_free(free, exclusive=False)  # written through the fd: exclusive
    err = vm.quit()
    assert f"qemu-locked: cannot write {held}: in use (writing) by pid {pid}" in err, err


@pytest.mark.parametrize("supervisor", ["true", "false"])
def test_where_seccomp_is_forbidden_the_start_is_refused_unless_told(
    tmp_path: Path, supervisor: str
) -> None:
    """A container whose profile forbids seccomp filters: with the supervisor on
    (the default) the start is refused with one line (exit 5), nothing left
    locked; `supervisor = false` accepts start-time locking only."""
    disk = qcow2(tmp_path / "d.qcow2")
    helper = str(Path(__file__).parent / "no_seccomp.py")
    env = base_env(QEMU_LOCKED_EMULATOR="/bin/true", QEMU_LOCKED_SUPERVISOR=supervisor)
    r = subprocess.run([sys.executable, helper, QEMU_LOCKED, "-drive", f"file={disk}"],
                       env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    if supervisor == "true":
        assert r.returncode == 5, r
        assert r.stderr.count("\n") == 1 and r.stderr.startswith(
            "qemu-locked: seccomp user notification is not available here ("
        ), r.stderr
        assert "Operation not permitted" in r.stderr and "set supervisor = false" in r.stderr
    else:
        assert r.returncode == 0 and r.stderr == "", r
    assert lock_free(disk)


def test_another_name_for_a_held_disk_is_refused(vm: VM, tmp_path: Path, holder) -> None:
    """The same identity rules as at start: a hard link and a symlink reach the
    same inode, so the lock another process holds on it refuses them too."""
    disk = qcow2(tmp_path / "disk.qcow2")
    pid = holder(disk)
    (tmp_path / "link.qcow2").hardlink_to(disk)
    (tmp_path / "sym.qcow2").symlink_to(disk)
    for name in ("link.qcow2", "sym.qcow2"):
        r = vm.add(str(tmp_path / name), name.split(".")[0])
        assert BUSY in r["error"]["desc"], r  # type: ignore[index]
    err = vm.quit()
    assert err.count(f": in use (writing) by pid {pid}") == 2, err
