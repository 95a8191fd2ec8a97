"""The ORIGIN of each lock under the supervisor (the default): the start-time
argument for a disk of the command line; for a file QEMU opened later, only what
the kernel says: that it was opened after start (no device name: the supervisor
sees an open, not the QMP command behind it).  Real QEMU under TCG (issue 23)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QEMU_LOCKCTL, base_env, skip_unless_ci, wait_for
from schema_check import errors
from test_supervisor import VM, qcow2

STATUS_SCHEMA = json.loads((Path(__file__).parent.parent / "docs/status.schema.json").read_text())


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VM]:
    boot = qcow2(tmp_path / "boot.qcow2")
    machine = VM(tmp_path, "-drive", f"file={boot},if=virtio", name="origins")
    yield machine
    if machine.proc.poll() is None:
        machine.quit()


def origins(vm: VM) -> dict[str, str | None]:
    r = subprocess.run([QEMU_LOCKCTL, "status", "--json"], env=base_env(), capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["locks"]
    return {Path(x["path"]).name: x.get("origin") for x in rows if x["pid"] == vm.proc.pid}


def test_origins_under_the_supervisor(vm: VM, tmp_path: Path) -> None:
    boot = str(tmp_path / "boot.qcow2")
    wait_for(lambda: origins(vm).get("boot.qcow2") is not None, "the start-time lock published")
    assert origins(vm) == {"boot.qcow2": f"-drive file={boot},if=virtio"}

    added = qcow2(tmp_path / "added.qcow2")
    assert "return" in vm.add(added, "added")
    wait_for(lambda: origins(vm).get("added.qcow2") is not None, "the later lock published")
    assert origins(vm) == {
        "boot.qcow2": f"-drive file={boot},if=virtio",
        "added.qcow2": "opened after start",
    }
    table = subprocess.run([QEMU_LOCKCTL, "status", added], env=base_env(),
                           capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert "opened after start" in table and "ORIGIN" in table, table

    assert "return" in vm.qmp.cmd("blockdev-del", **{"node-name": "added"})
    wait_for(lambda: "added.qcow2" not in origins(vm), "released after blockdev-del")


@pytest.fixture
def nbd(tmp_path: Path) -> Iterator[str]:
    """A real NBD server (qemu-nbd) on a unix socket: QEMU connects, opens no file."""
    if shutil.which("qemu-nbd") is None:
        skip_unless_ci("qemu-nbd (apt: qemu-utils)")
    sock = str(tmp_path / "nbd.sock")
    server = subprocess.Popen(["qemu-nbd", "--persistent", "--shared=4", "--socket", sock,
                               "--format=qcow2", qcow2(tmp_path / "served.qcow2")])  # fmt: skip
    wait_for(lambda: os.path.exists(sock), "qemu-nbd listening")
    yield sock
    server.kill()
    server.wait()


def test_a_network_disk_is_listed_as_not_locked(tmp_path: Path, nbd: str) -> None:
    machine = VM(tmp_path, "-drive", f"file=nbd:unix:{nbd},if=virtio", name="netdisk")
    try:
        source = f"-drive file=nbd:unix:{nbd},if=virtio"

        def rows() -> list[dict[str, object]]:
            r = subprocess.run([QEMU_LOCKCTL, "status", "--json"], env=base_env(),
                               capture_output=True, text=True, timeout=60)  # fmt: skip
            doc = json.loads(r.stdout)
            assert errors(doc, STATUS_SCHEMA) == [], doc  # the network row too
            return [x for x in doc["locks"] if x["pid"] == machine.proc.pid]

        wait_for(lambda: bool(rows()), "the supervisor published the network disk")
        (row,) = rows()
        assert (row["path"], row["state"], row["mode"], row["guest"]) == (
            source, "not locked: network disk", None, "netdisk"), row  # fmt: skip
        table = subprocess.run([QEMU_LOCKCTL, "status"], env=base_env(), capture_output=True,
                               text=True, timeout=60).stdout  # fmt: skip
        assert (
            "1 not locked: network disk: the storage server arbitrates access; qemu-locked "
            "locks only local files and block devices" in table
        ), table
        # plan and check say the same, before any start
        for command in ("plan", "check"):
            r = subprocess.run([QEMU_LOCKCTL, command, "--", "-drive", f"file=nbd:unix:{nbd}"],
                               env=base_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
            assert "network disk (nbd): not a local file" in r.stdout, r.stdout
            assert "network disks: the storage server arbitrates access" in r.stdout, r.stdout
    finally:
        machine.quit()
