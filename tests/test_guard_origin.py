"""The QMP guard's ORIGIN for a lock taken after start: a new cdrom medium is the
medium of its device, not `blockdev-add NODE` (issue 23).  Real QEMU under TCG,
libvirt's sequence of commands for a medium change."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QEMU_LOCKCTL, base_env, make_image, skip_unless_ci, wait_for
from guard_helpers import QEMU, Domain

QEMU_IMG = shutil.which("qemu-img")


@pytest.fixture
def domain(tmp_path: Path) -> Iterator[Domain]:
    if QEMU is None or QEMU_IMG is None:
        skip_unless_ci("qemu-system-x86_64 and qemu-img")
    disk = str(tmp_path / "boot.qcow2")
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", disk, "16M"], check=True)
    d = Domain(tmp_path, "media", [disk])
    yield d
    d.stop()


def origin_of(path: str) -> object:
    r = subprocess.run([QEMU_LOCKCTL, "status", "--json", path], env=base_env(),
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    rows = json.loads(r.stdout)["locks"]
    return rows[0].get("origin") if rows else None


def test_a_new_medium_is_named_by_its_device(tmp_path: Path, domain: Domain) -> None:
    iso = make_image(tmp_path / "new.iso")
    q = domain.qmp()
    device = {"driver": "scsi-cd", "bus": "scsi0.0", "scsi-id": 3, "id": "cd0"}
    assert q.cmd("device_add", **device)["return"] == {}
    assert q.cmd("blockdev-add", driver="file", filename=iso,
                 **{"node-name": "m1s", "read-only": True})["return"] == {}  # fmt: skip
    assert q.cmd("blockdev-add", driver="raw", file="m1s",
                 **{"node-name": "m1", "read-only": True})["return"] == {}  # fmt: skip
    wait_for(lambda: origin_of(iso) == "blockdev-add m1s", "the opened node published")
    assert q.cmd("blockdev-open-tray", id="cd0", force=True)["return"] == {}
    assert q.cmd("blockdev-insert-medium", id="cd0", **{"node-name": "m1"})["return"] == {}
    assert q.cmd("blockdev-close-tray", id="cd0")["return"] == {}
    wait_for(lambda: origin_of(iso) == "medium cd0", "the medium named by its device")
