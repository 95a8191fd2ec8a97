"""The product with the real qemu-system-x86_64 (TCG): our byte-0 lock lives in
the QEMU process next to QEMU's own image locks, and a second start is refused
by qemu-locked before QEMU's own error."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import QEMU_LOCKED, base_env, make_image

from qemu_locked.lock import procfs

QEMU = shutil.which("qemu-system-x86_64")
if QEMU is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError(
            "CI: qemu-system-x86_64 must be installed (make test installs qemu-system-x86)"
        )
    pytest.skip("qemu-system-x86_64 not installed (make test installs it)", allow_module_level=True)

pytestmark = pytest.mark.qemu


def fd_locks(pid: int) -> dict[str, list[tuple[str, int]]]:
    """path -> [(mode, start byte)] of every lock the process holds (ours and QEMU's)."""
    return {path: [(m, st) for _k, m, st in locks] for path, locks in procfs.fd_locks(pid).items()}


def start_qemu(*disk_args: str) -> subprocess.Popen[str]:
    args = [QEMU_LOCKED, "-name", "guest=realvm", "-machine", "none", "-accel", "tcg",
            "-nodefaults", "-display", "none", "-S", "-m", "16", *disk_args]  # fmt: skip
    return subprocess.Popen(
        args,
        env=base_env(QEMU_LOCKED_EMULATOR=str(QEMU)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_qemu_locks(
    proc: subprocess.Popen[str], paths: list[str]
) -> dict[str, list[tuple[str, int]]]:
    """Poll until QEMU has opened every image and taken its own locks (bytes >= 100)."""
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            locks = fd_locks(proc.pid)
        except OSError:
            locks = {}
        if all(any(start >= 100 for _m, start in locks.get(p, [])) for p in paths):
            return locks
        assert time.monotonic() < deadline, f"QEMU never locked its images: {locks}"
        time.sleep(0.05)


@pytest.fixture
def images(tmp_path: Path) -> tuple[str, str]:
    qcow2 = str(tmp_path / "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow2, "16M"], check=True)
    raw = make_image(tmp_path / "disk.raw", 4 << 20)
    return qcow2, raw


def test_real_qemu_runs_under_our_lock_with_its_own_locks_intact(images: tuple[str, str]) -> None:
    qcow2, raw = images
    vm = start_qemu(
        "-drive", f"file={qcow2},if=none,id=a", "-drive", f"file={raw},format=raw,if=none,id=b"
    )
    try:
        locks = wait_for_qemu_locks(vm, [qcow2, raw])
        for path in (qcow2, raw):
            assert ("exclusive", 0) in locks[path], locks  # ours, inherited across exec
            assert any(
                start in (100, 101, 102, 103, 104, 200, 201, 202, 203, 204)
                for _m, start in locks[path]
            )
        second = subprocess.run(
            [
                QEMU_LOCKED,
                "-machine",
                "none",
                "-nodefaults",
                "-display",
                "none",
                "-S",
                "-drive",
                f"file={qcow2},if=none,id=a",
            ],  # fmt: skip
            env=base_env(QEMU_LOCKED_EMULATOR=str(QEMU)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 3
        assert second.stderr.startswith(
            f"qemu-locked: cannot write {qcow2}: in use (writing) by pid {vm.pid}, guest 'realvm'"
        )
        assert "Failed to get" not in second.stderr
        # QEMU's own locks were not disturbed by the refused attempt.
        assert fd_locks(vm.pid) == locks
    finally:
        vm.kill()
        vm.wait()
    # The VM is gone: its disk is free at once.
    again = start_qemu("-drive", f"file={qcow2},if=none,id=a")
    try:
        wait_for_qemu_locks(again, [qcow2])
    finally:
        again.kill()
        again.wait()


def test_real_qemu_blockdev_json_like_libvirt(images: tuple[str, str]) -> None:
    qcow2, _raw = images
    storage = f'{{"driver":"file","filename":"{qcow2}","node-name":"s","auto-read-only":true,"discard":"unmap"}}'
    fmt = '{"node-name":"f","read-only":false,"driver":"qcow2","file":"s","backing":null}'
    vm = start_qemu("-blockdev", storage, "-blockdev", fmt)
    try:
        locks = wait_for_qemu_locks(vm, [qcow2])
        assert ("exclusive", 0) in locks[qcow2]
    finally:
        vm.kill()
        vm.wait()
