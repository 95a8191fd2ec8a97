"""Hole 4: every way the migration keeper can end applies incoming_timeout_action.

An errno from the lock call (ENOLCK: NFSv3 without lockd) or a bug of ours in
the keeper used to print a line and leave the VM running without that lock.
The failure is injected into fcntl() of the keeper process only (the kernel
gives ENOLCK only on filesystems a test cannot set up here).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import make_image
from fail_closed import FakeVM, env_for, injected


@pytest.mark.parametrize("what", ["ENOLCK", "RuntimeError"])
@pytest.mark.parametrize("action", ["kill", "warn"])
def test_keeper_failure_applies_the_action(tmp_path: Path, what: str, action: str) -> None:
    img = make_image(tmp_path / "d.img")
    env = env_for(
        None,
        QEMU_LOCKED_DOMAIN_LEASE="false",
        QEMU_LOCKED_INCOMING_WAIT="600",
        QEMU_LOCKED_INCOMING_TIMEOUT_ACTION=action,
    )
    holder = FakeVM(tmp_path, "holder", ["-drive", f"file={img}"], env)
    try:
        assert holder.ready()
        with open(tmp_path / "dst.err", "w") as err:
            dst = subprocess.Popen(injected("keeper", what, "-drive", f"file={img}", "-incoming", "defer"),
                                   env=dict(env, FAKE_QEMU_OUT=str(tmp_path / "dst.out")),
                                   stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        try:
            if action == "kill":
                # fails closed at once, long before incoming_wait (600 s) is up
                assert dst.wait(20) == -9
            else:
                from conftest import wait_for

                wait_for(lambda: "without" in (tmp_path / "dst.err").read_text(), "the warning")
                assert dst.poll() is None
            (line,) = (tmp_path / "dst.err").read_text().splitlines()
            assert line.startswith(f"qemu-locked: {img}: ")
            assert ("killing the VM" if action == "kill" else "runs without that lock") in line
            if what == "ENOLCK":
                assert "No locks available" in line
        finally:
            dst.kill()
            dst.wait()
    finally:
        holder.kill()
