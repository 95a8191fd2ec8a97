"""The review's ways past the monitor guard (issue 21), each run against the real
QEMU 7.2 under the supervisor: whatever the command, the open it ends in is
refused while another process holds the disk, and nothing is written to it.

The holders are plain processes holding byte 0 (tests/test_supervisor.py's
``holder``): exclusive for a disk someone writes, shared for one someone reads.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest
import test_supervisor
from conftest import QEMU_LOCKED, base_env, byte0_modes, lock_free, skip_unless_ci, wait_for
from guard_helpers import QEMU
from test_supervisor import BUSY, VM, qcow2

vm, holder = test_supervisor.vm, test_supervisor.holder  # the same fixtures

pytestmark = pytest.mark.qemu


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hmp(vm: VM, line: str) -> str:
    r = vm.qmp.cmd("human-monitor-command", **{"command-line": line})
    return str(r.get("return", r))


def job_error(vm: VM, job: str) -> str:
    """The error a block job ended with ('' if it completed), waiting for it."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        jobs = {j["id"]: j for j in vm.qmp.cmd("query-jobs")["return"]}  # type: ignore[union-attr,index]
        if job not in jobs or jobs[job]["status"] in ("concluded", "null"):
            return str(jobs.get(job, {}).get("error", ""))
        time.sleep(0.1)
    raise AssertionError(f"job {job} did not end")


@pytest.mark.parametrize(
    "form",
    ["drive_add -n 0 node-name=h1,driver=file,filename={}",
     "drive_add 0 if=none,id=h1,file.filename={}", "drive_add 0 if=none,id=h1,file=file:{}",
     'drive_add 0 if=none,id=h1,file=json:{{"driver":"file",,"filename":"{}"}}'],
)  # fmt: skip
def test_hmp_drive_add_forms(vm: VM, tmp_path: Path, holder, form: str) -> None:
    disk = qcow2(tmp_path / "held.qcow2")
    holder(disk)
    assert BUSY in hmp(vm, form.format(disk))


def test_a_writable_export_of_a_node_another_vm_reads(vm: VM, tmp_path: Path, holder) -> None:
    """libvirt's way to add a node: the file read-only until a writer needs it."""
    disk = str(tmp_path / "golden.raw")
    Path(disk).write_bytes(b"\0" * (1 << 20))
    holder(disk, exclusive=False)
    r = vm.qmp.cmd("blockdev-add", driver="raw", **{"node-name": "g", "read-only": False,
                   "file": {"driver": "file", "filename": disk, "auto-read-only": True}})  # fmt: skip
    assert "return" in r, "reading beside a reader is fine"
    sock = str(tmp_path / "nbd.sock")
    assert "return" in vm.qmp.cmd("nbd-server-start",
                                  addr={"type": "unix", "data": {"path": sock}})  # fmt: skip
    r = vm.qmp.cmd("block-export-add", type="nbd", id="e1", **{"node-name": "g", "writable": True})
    assert BUSY in r["error"]["desc"], r  # type: ignore[index]  # needs it read-write: refused
    r = vm.qmp.cmd("nbd-server-add", device="g", writable=True)
    assert BUSY in r["error"]["desc"], r  # type: ignore[index]
    assert set(byte0_modes(vm.proc.pid, disk)) == {"shared"}  # never taken exclusive


def test_hmp_device_add_on_a_node_another_vm_reads(vm: VM, tmp_path: Path, holder) -> None:
    disk = qcow2(tmp_path / "golden.qcow2")
    holder(disk, exclusive=False)
    r = vm.qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": "g", "read-only": False,
                   "file": {"driver": "file", "filename": disk, "auto-read-only": True}})  # fmt: skip
    if "return" in r:  # the qcow2 node writes its file at once: refused here, or at device_add
        assert BUSY in hmp(vm, "device_add virtio-blk-pci,drive=g,id=v1")
    else:
        assert BUSY in r["error"]["desc"], r  # type: ignore[index]


def test_commit_and_stream_into_a_backing_file_another_vm_reads(tmp_path: Path, holder) -> None:
    base = qcow2(tmp_path / "base.qcow2")
    mid = str(tmp_path / "mid.qcow2")
    top = str(tmp_path / "top.qcow2")
    for image, back in ((mid, base), (top, mid)):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", back,
                        image], check=True)  # fmt: skip
    # names for the header's chain (QEMU's iotests form), so a job can target mid
    machine = VM(tmp_path, "-drive", f"file={top},if=none,id=d0,node-name=top,"
                 "backing.node-name=mid,backing.backing.node-name=base")  # fmt: skip
    try:
        holder(base, exclusive=False)
        holder(mid, exclusive=False)
        before = digest(base), digest(mid)
        for cmd, device, into in (("block-commit", "top", base), ("block-stream", "mid", mid)):
            r = machine.qmp.cmd(
                cmd, **{"job-id": cmd, "device": device}
            )  # no base: the whole chain
            why = str(r["error"]["desc"]) if "error" in r else job_error(machine, cmd)  # type: ignore[index]
            assert why == f"Could not open '{into}': {BUSY}", (cmd, r, why)
        assert (digest(base), digest(mid)) == before
    finally:
        machine.quit()


def test_a_command_hidden_behind_a_byte_qemu_resyncs_on(vm: VM, tmp_path: Path, holder) -> None:
    """0xFE inside a QMP string: QEMU's lexer resyncs and runs what follows."""
    disk = qcow2(tmp_path / "held.qcow2")
    holder(disk)
    hidden = ('{"execute":"blockdev-add","id":"hid","arguments":{"driver":"file",'
              f'"node-name":"x","filename":"{disk}"}}}}')  # fmt: skip
    vm.qmp.send(b'{"execute":"query-status","id":"a","arguments":{"s":"\xfe' + hidden.encode()
                + b'"}}\r\n')  # fmt: skip
    seen = ""
    deadline = time.monotonic() + 20
    while "hid" not in seen and time.monotonic() < deadline:
        seen += repr(vm.qmp.reply())
    assert "hid" in seen and BUSY in seen, seen


@pytest.mark.parametrize(
    "target", ["file:{}", 'json:{{"driver":"raw","file":{{"driver":"file","filename":"{}"}}}}']
)
def test_drive_mirror_and_backup_to_a_held_target(vm: VM, tmp_path: Path, holder, target) -> None:
    disk = qcow2(tmp_path / "held.qcow2")
    holder(disk)
    before = digest(disk)
    name = target.format(disk)
    qdev = vm.qmp.cmd("query-block")["return"][0]  # type: ignore[index]
    dev = qdev["inserted"]["node-name"]  # type: ignore[index]
    for cmd in ("drive-mirror", "drive-backup"):
        args = {"job-id": cmd, "device": dev, "target": name, "sync": "full", "mode": "existing"}
        r = vm.qmp.cmd(cmd, **args, **({} if name.startswith("json:") else {"format": "raw"}))
        assert "error" in r and BUSY in r["error"]["desc"], (cmd, r)  # type: ignore[index]
    assert digest(disk) == before


def test_an_overlays_data_file_that_is_held(vm: VM, tmp_path: Path, holder) -> None:
    data = str(tmp_path / "data.raw")
    overlay = str(tmp_path / "overlay.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data}",
                    overlay, "16M"], check=True)  # fmt: skip
    holder(data)
    r = vm.add(overlay, "ov")
    assert "error" in r and BUSY in r["error"]["desc"], r  # type: ignore[index]


def test_blockdev_reopen_onto_another_file(vm: VM, tmp_path: Path, holder) -> None:
    free = qcow2(tmp_path / "free.qcow2")
    held = qcow2(tmp_path / "held.qcow2")
    assert "return" in vm.add(free, "n", read_only=True)
    holder(held, exclusive=False)
    # read-only until a writer needs it (libvirt's form): the reopen is that writer
    assert "return" in vm.qmp.cmd("blockdev-add", driver="file", filename=held,
                                  **{"node-name": "hf", "auto-read-only": True})  # fmt: skip
    before = digest(held)
    r = vm.qmp.cmd("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "n",
                   "file": "hf", "read-only": False}])  # fmt: skip
    assert r["error"]["desc"] == f"Could not open '{held}': {BUSY}", r  # type: ignore[index]
    assert digest(held) == before


def test_a_vmdk_extent_that_is_held(vm: VM, tmp_path: Path, holder) -> None:
    extent = tmp_path / "ext.raw"
    extent.write_bytes(b"\0" * (1 << 20))
    desc = tmp_path / "disk.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\n\nRW 2048 FLAT "ext.raw" 0\n\n'
                    'ddb.virtualHWVersion = "4"\n')  # fmt: skip
    holder(str(extent))
    r = vm.qmp.cmd("blockdev-add", driver="vmdk", **{"node-name": "v",
                   "file": {"driver": "file", "filename": str(desc)}})  # fmt: skip
    assert "error" in r and BUSY in r["error"]["desc"], r  # type: ignore[index]


def test_a_failed_blockdev_add_keeps_no_lock(vm: VM, tmp_path: Path) -> None:
    plain = tmp_path / "plain.raw"
    plain.write_bytes(b"\0" * 4096)
    r = vm.add(str(plain), "bad")  # qcow2 driver on a raw file: QEMU opens it, then fails
    assert "error" in r and "qcow2" in r["error"]["desc"], r  # type: ignore[index]
    wait_for(lambda: lock_free(str(plain)), "the failed open's lock let go", timeout=10)


def test_a_huge_id_does_not_wedge_the_monitor(vm: VM) -> None:
    vm.qmp.send(b'{"execute":"query-status","id":18446744073709551617}\r\n')
    assert "id" in vm.qmp.reply()  # (QEMU hands it back as a double)
    assert "return" in vm.qmp.cmd("query-status")


def test_hmp_on_stdio_is_supervised_too(tmp_path: Path, holder) -> None:
    if QEMU is None:
        skip_unless_ci("qemu-system-x86_64 (apt: qemu-system-x86)")
    disk = qcow2(tmp_path / "held.qcow2")
    holder(disk)
    env = base_env(QEMU_LOCKED_SUPERVISOR="true", QEMU_LOCKED_EMULATOR=str(QEMU))
    p = subprocess.run([QEMU_LOCKED, "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
                        "-monitor", "stdio"],
                       input=f"drive_add 0 if=none,id=h,file={disk}\nquit\n", env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert f"Could not open '{disk}': {BUSY}" in p.stdout, p.stdout
    assert f"qemu-locked: cannot read {disk}: in use (writing) by pid" in p.stderr, p.stderr
    assert os.path.getsize(disk) > 0
