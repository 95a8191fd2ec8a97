"""A block device is shown by the path the VM (or the user) gave it, with its stable
key beside it: `status /dev/HostVG/vol` listed `loop:/var/.../x.img@0` and, from
/proc, a second row for the same holding under the kernel's node name (issue 23)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import QEMU_LOCKCTL, base_env, run


@pytest.fixture
def given(tmp_path: Path, loop_device: str) -> str:
    """The name a user or libvirt gives the device (as /dev/HostVG/vol is a symlink)."""
    link = tmp_path / "vol"
    link.symlink_to(loop_device)
    return str(link)


def lockctl(env: dict[str, str], *args: str) -> dict[str, object]:
    r = run([QEMU_LOCKCTL, *args, "--json"] if "--" not in args else
            [QEMU_LOCKCTL, args[0], "--json", *args[1:]], env=env)  # fmt: skip
    assert r.returncode in (0, 1), r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


@pytest.mark.parametrize("backend", ["direct", "lockspace"])
def test_a_block_device_is_shown_by_its_given_path_with_its_key(
    start, tmp_path: Path, loop_device: str, given: str, backend: str
) -> None:  # type: ignore[no-untyped-def]
    space = tmp_path / "lockspace"
    space.mkdir()
    env = base_env(QEMU_LOCKED_BACKEND=backend, QEMU_LOCKED_LOCKSPACE_DIR=str(space))
    vm = start("-name", "guest=blk", "-drive", f"file={given},format=raw", env=env)
    assert vm.started()
    pid = vm.report["pid"]
    plan = lockctl(env, "plan", "--", "-drive", f"file={given},format=raw")
    (disk,) = plan["disks"]  # type: ignore[misc]
    assert disk["path"] == given and disk["key"].startswith("loop:"), disk
    key = disk["key"]

    # every row of this VM's (other tests may hold devices of their own)
    rows = [r for r in lockctl(env, "status")["locks"] if r["pid"] == pid]  # type: ignore[union-attr]
    disks = [r for r in rows if not r["path"].startswith("domain:")]
    assert [(r["path"], r["key"], r["state"]) for r in disks] == [(given, key, "held")], rows
    if backend == "direct":  # it locks the /dev node too: that row is merged into the lease's
        assert disks[0]["comm"] == "qemu-locked-fak", rows

    (row,) = lockctl(env, "status", given)["locks"]  # type: ignore[misc]
    assert (row["path"], row["key"], row["guest"]) == (given, key, "blk"), row
    # asked by another name, answered by that name
    (row,) = lockctl(env, "status", loop_device)["locks"]  # type: ignore[misc]
    assert (row["path"], row["key"]) == (loop_device, key), row

    table = run([QEMU_LOCKCTL, "status", given], env=env).stdout.splitlines()
    assert table[0].split()[-2:] == ["PATH", "KEY"], table
    assert table[1].split()[-2:] == [given, key], table

    check = lockctl(env, "check", "--", "-drive", f"file={given},format=raw")
    (conflict,) = check["conflicts"]  # type: ignore[misc]
    assert (conflict["path"], conflict["key"]) == (given, key), check
    assert "guest 'blk'" in conflict["held_by"], conflict
    assert os.path.realpath(given) == loop_device
