"""`status PATH` never calls free what a start would refuse: a holder whose /proc
entries this user cannot read (libvirt's QEMU, seen by the VM user or by an admin
without root) is still reported, from the lock itself (issue 20: status as the
VM user said "no lock held" while aa1 held the disk)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BIN, base_env, make_image

LOCKCTL = str(BIN / "qemu-lockctl")


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           LOCKCTL, *args], env=base_env(), capture_output=True, text=True,
                          timeout=60, cwd="/")  # fmt: skip


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path is under a 0700 one)."""
    d = Path(tempfile.mkdtemp(prefix="qlk-status-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def test_a_holder_this_user_cannot_see_is_reported_hidden(shared_dir: Path) -> None:
    img = make_image(shared_dir / "d.img")
    os.chmod(img, 0o644)
    free = as_nobody("status", img)
    assert free.returncode == 0 and free.stdout == "no lock held\n", free.stderr
    code = ("import os,time; from qemu_locked.lock import ofd; "
            f"fd=os.open({img!r}, os.O_RDWR); assert ofd.try_lock(fd, True); "
            "print('held', flush=True); time.sleep(60)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        seen = as_nobody("status", img)
        assert seen.returncode == 0, seen.stderr
        assert "no lock held" not in seen.stdout
        assert (
            "1 hidden: locked by a local process whose /proc entries this user cannot read"
            in seen.stdout
        )
        (row,) = json.loads(as_nobody("status", "--json", img).stdout)["locks"]
        assert row["path"] == img and row["mode"] == "exclusive" and row["state"] == "hidden"
        assert row["pid"] is None
        # root sees the holder itself
        root = json.loads(subprocess.run([LOCKCTL, "status", "--json", img], env=base_env(),
                                         capture_output=True, text=True).stdout)["locks"]  # fmt: skip
        assert [r["pid"] for r in root] == [holder.pid]
    finally:
        holder.kill()
        holder.wait()
