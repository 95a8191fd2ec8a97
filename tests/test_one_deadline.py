"""One deadline for the whole start: ``wait`` bounds the domain lease and the
disks together (it once started again for the disks, doubling the limit).

Real holders, real locks; only the clock is the test's, so the deadline is
checked without timing anything: time.sleep advances a fake time.monotonic, and
the domain-lease holder goes away at 90 % of ``wait``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import make_image
from fail_closed import FakeVM, config, env_for

from qemu_locked.backends import combined
from qemu_locked.model.config import load
from qemu_locked.model.errors import LockedError
from qemu_locked.parse.argv import parse_argv


@pytest.mark.parametrize("backend", ["direct", "lockspace"])
def test_one_deadline_for_domain_lease_and_disks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    wait = 10.0
    (tmp_path / "ls").mkdir()
    cfg_path = config(tmp_path, backend=backend, lockspace_dir=str(tmp_path / "ls"), wait=wait)
    env = env_for(cfg_path)
    img = make_image(tmp_path / "d.img")
    same_vm = FakeVM(tmp_path, "same", ["-name", "guest=g"], env)  # holds the domain lease
    disk = FakeVM(tmp_path, "disk", ["-name", "guest=other", "-drive", f"file={img}"], env)
    try:
        assert same_vm.ready() and disk.ready()
        now = [1000.0]
        gone: list[int] = []

        def sleep(s: float) -> None:
            now[0] += s
            if now[0] >= 1000.0 + 0.9 * wait and not gone:
                os.kill(same_vm.proc.pid, signal.SIGKILL)  # the domain lease is free from here on
                gone.append(os.waitpid(same_vm.proc.pid, 0)[0])
                same_vm.proc.returncode = -9

        monkeypatch.setattr(time, "monotonic", lambda: now[0])
        monkeypatch.setattr(time, "sleep", sleep)
        cfg = load({"QEMU_LOCKED_CONFIG": str(cfg_path)})
        plan = parse_argv(["-name", "guest=g", "-drive", f"file={img}"])
        with pytest.raises(LockedError) as info:
            # what the wrapper does: one deadline from the start
            combined.acquire_all(plan, cfg, time.monotonic() + cfg.wait)
        assert img in info.value.message or "d.img" in str(info.value.conflicts)
        assert gone  # the domain lease came free on the way
        assert now[0] - 1000.0 <= wait + 0.5  # given up at the one deadline, not 0.9*wait later
    finally:
        same_vm.kill()
        disk.kill()
