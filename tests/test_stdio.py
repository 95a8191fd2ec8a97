"""Hole 2: a wrapper started with fds 0-2 closed must not hand lock fds to QEMU
as its stdin/stdout/stderr (QEMU would write its output into a lease or image)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import QEMU_LOCKCTL, QEMU_LOCKED, byte0_modes, make_image
from fail_closed import FakeVM, config, env_for, without_stdio


def test_closed_stdio_gets_dev_null_not_lock_fds(tmp_path: Path) -> None:
    (tmp_path / "ls").mkdir()
    env = env_for(config(tmp_path, lockspace_dir=str(tmp_path / "ls")))  # direct + domain lease
    img = make_image(tmp_path / "d.img")
    vm = FakeVM(tmp_path, "vm", ["-name", "guest=g", "-drive", f"file={img}"], env, stdio=False)
    try:
        assert vm.ready()
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{vm.proc.pid}/fd/{fd}") == "/dev/null", fd
        assert byte0_modes(vm.proc.pid, img) == ["exclusive"]  # the lock still got there
    finally:
        vm.kill()


def test_refusal_with_closed_stdio_writes_into_no_file(tmp_path: Path) -> None:
    """The refusal line goes to fd 2; with stdio closed that must be /dev/null,
    never a disk image or lease the wrapper opened."""
    (tmp_path / "ls").mkdir()
    env = env_for(config(tmp_path, lockspace_dir=str(tmp_path / "ls")))
    a = make_image(tmp_path / "a.img")
    b = make_image(tmp_path / "b.img")
    holder = FakeVM(tmp_path, "holder", ["-drive", f"file={b}"], env)
    try:
        assert holder.ready()
        argv = [QEMU_LOCKED, "-name", "guest=g", "-drive", f"file={a}", "-drive", f"file={b}"]
        r = subprocess.run(without_stdio(*argv), env=env, timeout=60)
        assert r.returncode == 3
        for path in (a, b):
            assert Path(path).read_bytes() == bytes(1 << 20), path
        for lease in (tmp_path / "ls").iterdir():
            assert b"is locked" not in lease.read_bytes()
    finally:
        holder.kill()


def test_keeper_line_with_closed_stdio_writes_into_no_disk(tmp_path: Path) -> None:
    """The migration keeper's timeout line goes to fd 2: with stdio closed at
    start, that fd must be /dev/null, not an image opened read-write."""
    env = env_for(None, QEMU_LOCKED_INCOMING_WAIT="0.5", QEMU_LOCKED_DOMAIN_LEASE="false")
    imgs = [make_image(tmp_path / f"{n}.img") for n in "abc"]
    holder = FakeVM(tmp_path, "holder", ["-drive", f"file={imgs[2]}"], env)
    try:
        assert holder.ready()
        dst = FakeVM(
            tmp_path,
            "dst",
            [a for i in imgs for a in ("-drive", f"file={i}")] + ["-incoming", "defer"],
            env,
            stdio=False,
        )
        assert dst.proc.wait(60) == -9  # incoming_timeout_action = kill
        for path in imgs:
            assert Path(path).read_bytes() == bytes(1 << 20), path
    finally:
        holder.kill()


def test_lockctl_run_with_closed_stdio_gives_the_command_dev_null(tmp_path: Path) -> None:
    """qemu-lockctl run hands lock fds to CMD across exec: the same rule."""
    img = make_image(tmp_path / "d.img")
    out = tmp_path / "fds"
    probe = ("import os, sys; open(sys.argv[1], 'w').write(' '.join("
             "os.readlink(f'/proc/self/fd/{n}') for n in (0, 1, 2)))")  # fmt: skip
    r = subprocess.run(
        without_stdio(QEMU_LOCKCTL, "run", "--disk", img, "--", sys.executable, "-c", probe, str(out)),
        env=env_for(None), timeout=60,
    )  # fmt: skip
    assert r.returncode == 0
    assert out.read_text() == "/dev/null /dev/null /dev/null"
    assert Path(img).read_bytes() == bytes(1 << 20)
