"""Faults: the wrapper killed at every step between its first lock and exec;
QEMU daemonizing; QEMU reopening its own image fds; the lockspace filesystem
full, read-only, or deleted under a running VM."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import QEMU_LOCKED, VM, base_env, byte0_modes, lock_free, make_image, run
from stress.support import record

from qemu_locked.backends.lockspace import leases

QEMU = shutil.which("qemu-system-x86_64")
IN_CI = os.environ.get("CI") == "true"


def need(tool: str | None, why: str) -> str:
    if tool:
        return tool
    if IN_CI:
        raise RuntimeError(f"CI must have {why}")
    pytest.skip(f"{why} not installed")


def test_wrapper_killed_at_every_step_leaves_nothing_locked(tmp_path: Path) -> None:
    """strace injects SIGKILL at each system call from the first lock to exec."""
    strace = need(shutil.which("strace"), "strace")
    disks = [make_image(tmp_path / f"d{i}.img") for i in range(3)]
    args = [QEMU_LOCKED, "-name", "guest=victim"] + [
        a for d in disks for a in ("-drive", f"file={d},format=raw")
    ]
    env = base_env(QEMU_LOCKED_EMULATOR="/bin/true")
    trace = tmp_path / "trace"
    for _ in range(2):  # warm up: a first run may write .pyc files and open more files
        subprocess.run(args, env=env, check=True, capture_output=True)
    subprocess.run(
        [strace, "-o", str(trace), "-e", "trace=all", *args],
        env=env,
        check=True,
        capture_output=True,
    )
    calls = [c for c in trace.read_text().splitlines() if re.match(r"[a-z_0-9]+\(", c)]
    names = [c.split("(", 1)[0] for c in calls]
    first = next(i for i, c in enumerate(calls) if "F_OFD_SETLK" in c and c.endswith("= 0"))
    last = max(i for i, n in enumerate(names) if n == "execve")
    assert last > first
    tried = 0
    # Each system call from the first lock to the emulator's execve, named by its
    # occurrence among calls of the same name (stabler than a global count).
    for i in range(first + 1, last + 1):
        nth = names[: i + 1].count(names[i])
        if names[i] == "execve":
            nth -= 1  # the program's own first execve happens before strace counts
        r = subprocess.run([strace, "-o", os.devnull, "-e", f"inject={names[i]}:signal=KILL:when={nth}", *args],
                           env=env, capture_output=True)  # fmt: skip
        tried += 1
        assert r.returncode != 0, f"not killed at {calls[i]}"
        assert all(lock_free(d) for d in disks), f"locked after SIGKILL at: {calls[i]}"
    record("kill-steps", "wrapper SIGKILLed at each system call between its first lock and exec (3 disks)",
           tried, "nothing left locked")  # fmt: skip


def test_vm_killed_frees_at_once(tmp_path: Path) -> None:
    img = make_image(tmp_path / "v.img")
    n = 20 if os.environ.get("STRESS") == "full" else 5
    for _ in range(n):
        vm = VM(["-drive", f"file={img}"])
        assert vm.started()
        assert not lock_free(img)
        vm.kill()
        assert lock_free(img)
    record("vm-kill", "VM SIGKILLed, disk checked free right after", n, "freed at once every time")


def test_daemonized_qemu_keeps_the_lock(tmp_path: Path) -> None:
    qemu = need(QEMU, "qemu-system-x86_64")
    img = make_image(tmp_path / "daemon.img", 4 << 20)
    pidfile = tmp_path / "q.pid"
    r = subprocess.run(
        [QEMU_LOCKED, "-name", "guest=daemon", "-machine", "none", "-nodefaults", "-display", "none", "-S",
         "-drive", f"file={img},format=raw,if=none", "-daemonize", "-pidfile", str(pidfile)],  # fmt: skip
        env=base_env(QEMU_LOCKED_EMULATOR=qemu), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    try:
        assert not lock_free(img)  # the lock followed the daemon (the fd was inherited by its fork)
        again = run(
            [QEMU_LOCKED, "-drive", f"file={img},format=raw"],
            env=base_env(QEMU_LOCKED_EMULATOR=qemu),
        )
        assert again.returncode == 3 and f"by pid {pid}, guest 'daemon'" in again.stderr
    finally:
        os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lock_free(img)
    record(
        "daemonize",
        "QEMU -daemonize under qemu-locked, then killed",
        1,
        "lock held by the daemon, freed when it exited",
    )


class QMP:
    def __init__(self, path: Path) -> None:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(str(path))
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: object) -> dict[str, object]:
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "return" in msg or "error" in msg:
                return msg


def test_qemu_reopening_its_images_keeps_our_lock(tmp_path: Path) -> None:
    qemu = need(QEMU, "qemu-system-x86_64")
    disk = str(tmp_path / "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "16M"], check=True)
    iso1, iso2 = make_image(tmp_path / "one.iso"), make_image(tmp_path / "two.iso")
    qmp_path = tmp_path / "qmp.sock"
    storage = json.dumps({"driver": "file", "filename": disk, "node-name": "s"})
    fmt = json.dumps(
        {"driver": "qcow2", "node-name": "f", "file": "s", "read-only": False, "backing": None}
    )
    proc = subprocess.Popen(
        [QEMU_LOCKED, "-name", "guest=reopen", "-machine", "pc", "-accel", "tcg", "-m", "32", "-display", "none",
         "-nodefaults", "-S", "-blockdev", storage, "-blockdev", fmt,
         "-drive", f"file={iso1},format=raw,if=none,media=cdrom,id=cd0,readonly=on",
         "-device", "ide-cd,drive=cd0,id=cdrom0",
         "-qmp", f"unix:{qmp_path},server=on,wait=off"],  # fmt: skip
        env=base_env(QEMU_LOCKED_EMULATOR=qemu), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    ops = 0
    try:
        q = QMP(qmp_path)
        assert byte0_modes(proc.pid, disk) == ["exclusive"] and byte0_modes(proc.pid, iso1) == [
            "shared"
        ]
        steps = [
            ("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "f", "file": "s", "read-only": True}]}),
            ("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "f", "file": "s", "read-only": False}]}),
            ("blockdev-change-medium", {"id": "cdrom0", "filename": iso2, "format": "raw"}),
            ("blockdev-change-medium", {"id": "cdrom0", "filename": iso1, "format": "raw"}),
            ("drive-backup", {"device": "f", "target": str(tmp_path / "backup.qcow2"), "sync": "full",
                              "format": "qcow2", "job-id": "b1"}),
        ]  # fmt: skip
        for name, args in steps:
            reply = q.cmd(name, **args)
            assert "error" not in reply, (name, reply)
            ops += 1
            assert byte0_modes(proc.pid, disk) == ["exclusive"], f"lost after {name}"
            assert byte0_modes(proc.pid, iso1) == ["shared"], f"lost after {name}"
        deadline = time.monotonic() + 60
        while q.cmd("query-block-jobs")["return"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert byte0_modes(proc.pid, disk) == ["exclusive"]
        # still refused by us, not by QEMU
        r = run([QEMU_LOCKED, "-drive", f"file={disk}"], env=base_env(QEMU_LOCKED_EMULATOR=qemu))
        assert r.returncode == 3 and "guest 'reopen'" in r.stderr
    finally:
        proc.kill()
        proc.wait()
    record("reopen", "real QEMU reopening its image fds (blockdev-reopen ro/rw, cdrom change x2, drive-backup job)",
           ops, "our byte-0 locks survived every one")  # fmt: skip


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A tiny tmpfs of our own (root only): to fill up and to make read-only."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,nr_inodes=64", "qltest", str(mnt)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        if IN_CI and os.geteuid() == 0:
            raise RuntimeError(f"cannot mount tmpfs in CI: {r.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def lockspace_env(space: Path, **extra: str) -> dict[str, str]:
    return base_env(QEMU_LOCKED_BACKEND="lockspace", QEMU_LOCKED_LOCKSPACE_DIR=str(space), **extra)


def test_lockspace_full_readonly_and_deleted(tmp_path: Path, small_fs: Path) -> None:
    space = small_fs / "ls"
    space.mkdir()
    img = make_image(tmp_path / "img")
    running = VM(["-name", "guest=early", "-drive", f"file={img}"], lockspace_env(space))
    try:
        _full_readonly_deleted(tmp_path, small_fs, space, img, running)
    finally:
        running.kill()
    record("lockspace-fs", "lockspace on a full, a read-only, and a deleted filesystem", 3,
           "one-line errors (exit 5), no partial records, the running VM unharmed")  # fmt: skip


def _full_readonly_deleted(
    tmp_path: Path, small_fs: Path, space: Path, img: str, running: VM
) -> None:
    assert running.started()
    # Fill the filesystem: a new lease cannot get its record written.
    filler = small_fs / "filler"
    fill = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fill, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fill)
    others = [make_image(tmp_path / f"o{i}") for i in range(3)]
    r = run(
        [QEMU_LOCKED, *[a for o in others for a in ("-drive", f"file={o}")]],
        env=lockspace_env(space),
    )
    assert r.returncode == 5 and len(r.stderr.splitlines()) == 1, r.stderr
    for name in os.listdir(
        space
    ):  # no partial records: every lease is either the running VM's or empty
        fd = os.open(space / name, os.O_RDONLY)
        try:
            recs = leases.read_records(fd)
        finally:
            os.close(fd)
        assert all(rec.guest == "early" and rec.live for rec in recs), recs
    assert running.proc.poll() is None
    os.unlink(filler)
    # A read-only view of the same lockspace (a read-only bind mount): fail closed.
    ro = tmp_path / "ro-view"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(space), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        for disk in (others[0], img):
            r = run([QEMU_LOCKED, "-drive", f"file={disk}"], env=lockspace_env(ro))
            assert (
                r.returncode == 5
                and "Read-only file system" in r.stderr
                and len(r.stderr.splitlines()) == 1
            )
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    # Deleted under the running VM.
    shutil.rmtree(space)
    r = run([QEMU_LOCKED, "-drive", f"file={img}"], env=lockspace_env(space))
    assert r.returncode == 5 and "does not exist" in r.stderr
    assert running.proc.poll() is None  # unharmed


def test_no_shell_anywhere() -> None:
    src = Path(__file__).parent.parent.parent / "qemu_locked"
    bad = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|/bin/sh")
    hits = [
        f"{p}:{i}"
        for p in src.rglob("*.py")
        for i, ln in enumerate(p.read_text().splitlines(), 1)
        if bad.search(ln)
    ]
    assert hits == []
