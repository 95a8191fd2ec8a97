"""Shareable disks under the supervisor (issue 21, item 6): `share-rw=on` keeps its
meaning at start and when hot-plugged; a plain writable attach of a disk other VMs
write is refused.  Real QEMU 7.2 under TCG, real locks, the VMs are real QEMUs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import byte0_modes, has_open, lock_free
from test_supervisor import VM

pytestmark = pytest.mark.qemu


def raw(path: Path) -> str:
    path.write_bytes(b"\0" * (1 << 20))
    return str(path)


def shared_device(disk: str, share: bool = True) -> tuple[str, ...]:
    dev = "virtio-blk-pci,drive=d0" + (",share-rw=on" if share else "")
    return ("-drive", f"file={disk},format=raw,if=none,id=d0", "-device", dev)


def attach(vm: VM, disk: str, node: str, share: bool) -> dict[str, object]:
    """As libvirt 9-11 hot-plugs a disk: a file node opened read-only until a
    writer attaches (auto-read-only), a writable raw node, then the device."""
    r = vm.qmp.cmd("blockdev-add", driver="file", filename=disk,
                   **{"node-name": f"{node}-storage", "auto-read-only": True})  # fmt: skip
    if "return" in r:
        r = vm.qmp.cmd("blockdev-add", driver="raw", file=f"{node}-storage",
                       **{"node-name": f"{node}-format", "read-only": False})  # fmt: skip
    if "error" in r:
        return r
    args: dict[str, object] = {"driver": "virtio-blk-pci", "drive": f"{node}-format", "id": node}
    if share:
        args["share-rw"] = True
    return vm.qmp.cmd("device_add", **args)


def test_two_vms_share_a_disk_declared_shareable_at_start(tmp_path: Path) -> None:
    disk = raw(tmp_path / "cluster.img")
    a = VM(tmp_path, *shared_device(disk), name="a")
    b = VM(tmp_path, *shared_device(disk), name="b")
    try:
        # QEMU opened it read-write, under the shared lock the plan gave it.
        assert byte0_modes(a.proc.pid, disk) == ["shared"], byte0_modes(a.proc.pid, disk)
        assert byte0_modes(b.proc.pid, disk) == ["shared"]
        assert not lock_free(disk) and lock_free(disk, exclusive=False)
    finally:
        a.quit(), b.quit()


def test_a_shareable_hot_plug_joins_and_a_plain_one_is_refused(tmp_path: Path) -> None:
    disk = raw(tmp_path / "cluster.img")
    a = VM(tmp_path, *shared_device(disk), name="a")
    b = VM(tmp_path, name="b")
    c = VM(tmp_path, name="c")
    try:
        assert "return" in attach(b, disk, "s1", share=True), "a second sharer is let in"
        assert byte0_modes(b.proc.pid, disk) == ["shared"]
        r = attach(c, disk, "p1", share=False)
        # The writer that did not declare it shareable: refused (by QEMU's own image
        # lock, which the supervisor relies on: docs/semantics.md).
        assert "error" in r and 'Failed to get shared "write" lock' in r["error"]["desc"], r  # type: ignore[index]
        assert "exclusive" not in byte0_modes(c.proc.pid, disk)
    finally:
        for vm in (a, b, c):
            vm.quit()


def test_a_writable_hot_plug_of_a_disk_another_vm_reads_is_refused(tmp_path: Path) -> None:
    disk = raw(tmp_path / "golden.img")
    reader = VM(tmp_path, "-drive", f"file={disk},format=raw,if=virtio,readonly=on", name="r")
    w = VM(tmp_path, name="w")
    try:
        r = attach(w, disk, "w1", share=True)  # even declared shareable: the reader forbids writers
        assert "error" in r and "Device or resource busy" in r["error"]["desc"], r  # type: ignore[index]
        err = w.quit()
        assert (
            f"qemu-locked: cannot write {disk}: in use (sharing) by pid {reader.proc.pid}" in err
        ), err
        assert "guest 'r'" in err, err
    finally:
        reader.quit()


def test_a_plain_writer_keeps_a_sharer_out(tmp_path: Path) -> None:
    disk = raw(tmp_path / "mine.img")
    owner = VM(tmp_path, *shared_device(disk, share=False), name="o")
    late = VM(tmp_path, name="l")
    try:
        assert byte0_modes(owner.proc.pid, disk) == ["exclusive"]
        r = attach(late, disk, "x1", share=True)
        assert "Device or resource busy" in r["error"]["desc"], r  # type: ignore[index]
        assert byte0_modes(owner.proc.pid, disk) == ["exclusive"]
    finally:
        owner.quit(), late.quit()


def test_files_left_unlocked_on_purpose_pass(tmp_path: Path) -> None:
    """QEMU's own locking=off (honoured) and a force-share reader: the command
    line says these are opened without locks, so the supervisor lets them pass."""
    disk = raw(tmp_path / "free-for-all.img")
    off = ("-drive", f"file.filename={disk},file.driver=file,file.locking=off,format=raw,if=virtio")
    a = VM(tmp_path, *off, name="a")
    b = VM(tmp_path, *off, name="b")
    reader = VM(tmp_path, "-drive", f"driver=raw,file.driver=file,file.filename={disk},"
                "read-only=on,force-share=on,if=virtio", name="r")  # fmt: skip
    try:
        for vm in (a, b, reader):
            assert byte0_modes(vm.proc.pid, disk) == [], vm.proc.pid
        assert lock_free(disk)
    finally:
        for vm in (a, b, reader):
            vm.quit()


def test_shared_memory_between_two_vms_keeps_working(tmp_path: Path) -> None:
    """libvirt's <shmem>: ivshmem over a share=on memory-backend-file in /dev/shm,
    opened read-write by both VMs: not a disk, so the supervisor lets it pass."""
    shm = f"/dev/shm/ql-test-{os.getpid()}-{tmp_path.name}"
    args = ("-object", f"memory-backend-file,id=shm0,mem-path={shm},size=1M,share=on",
            "-device", "ivshmem-plain,memdev=shm0")  # fmt: skip
    try:
        a = VM(tmp_path, *args, name="a")
        b = VM(tmp_path, *args, name="b")
        try:
            assert has_open(a.proc.pid, shm) and has_open(b.proc.pid, shm)
            assert byte0_modes(a.proc.pid, shm) == [] == byte0_modes(b.proc.pid, shm)
        finally:
            a.quit(), b.quit()
    finally:
        if os.path.exists(shm):
            os.unlink(shm)  # QEMU leaves a file it created for a backend
