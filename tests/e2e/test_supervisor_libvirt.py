"""The seccomp supervisor (supervisor = true) under the host's real libvirtd 9 and
QEMU 7.2: hot-plugged disks are locked at QEMU's open, whatever asked for it.

libvirt passes on QEMU's own error (`Could not open '...': Device or resource
busy`); our line naming the holder is in the domain's log at the same moment.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e import test_guard
from e2e.lab import PREFIX, Lab, disk_xml, domain_xml, lock_free, wait_for

pytestmark = pytest.mark.libvirt

SUPERVISED = {"QEMU_LOCKED_SUPERVISOR": "true"}
sanlock_env = test_guard.sanlock_env  # the same daemon and lockspace as the guard's test
SCSI = "<controller type='scsi' index='0' model='virtio-scsi'/>"
BUSY = "Device or resource busy"


def vm(lab: Lab, name: str, disks: list[str]) -> str:
    dom = lab.define(domain_xml(f"{PREFIX}{name}", disks, devices_extra=SCSI), env=SUPERVISED)
    lab.start(dom)
    return dom


def attach(lab: Lab, dom: str, path: str, target: str, check: bool = False):  # type: ignore[no-untyped-def]
    args = ["attach-disk", dom, path, target, "--targetbus", "scsi", "--live"]
    if path.startswith("/dev/"):
        args += ["--sourcetype", "block", "--subdriver", "raw"]
    else:
        args += ["--subdriver", "qcow2"]
    return lab.virsh(*args, check=check)


def logged(dom: str) -> str:
    return Path(f"/var/log/libvirt/qemu/{dom}.log").read_text(errors="replace")


def refused_naming(lab: Lab, proc, dom: str, holder: str) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode != 0, proc.stdout
    assert BUSY in proc.stderr, proc.stderr
    wait_for(lambda: f"guest '{holder}'" in logged(dom), 10, "our line in the domain log")


def test_attach_of_a_disk_another_vm_writes_is_refused(lab: Lab) -> None:
    a, b = lab.image("s-a.qcow2"), lab.image("s-b.qcow2")
    one = vm(lab, "s1", [disk_xml(a)])
    two = vm(lab, "s2", [disk_xml(b)])
    refused_naming(lab, attach(lab, one, b, "sdb"), one, two)
    assert "sdb" not in lab.virsh("domblklist", one).stdout
    assert lab.state(one) == lab.state(two) == "running"
    # HMP through libvirt's monitor: the same open, the same refusal
    hmp = lab.virsh("qemu-monitor-command", one, "--hmp", f"drive_add 0 file={b},if=none,id=x9",
                    check=False)  # fmt: skip
    assert BUSY in hmp.stdout + hmp.stderr, hmp


def test_attach_locks_and_detach_frees(lab: Lab) -> None:
    a, b = lab.image("t-a.qcow2"), lab.image("t-b.qcow2")
    one = vm(lab, "t1", [disk_xml(a)])
    attach(lab, one, b, "sdb", check=True)
    assert not lock_free(b, exclusive=False)
    other = vm(lab, "t2", [])
    refused_naming(lab, attach(lab, other, b, "sdc"), other, one)
    lab.virsh("detach-disk", one, "sdb", "--live")
    wait_for(lambda: lock_free(b), 10, "the lock released after detach")
    attach(lab, other, b, "sdc", check=True)
    assert not lock_free(b, exclusive=False)


def test_block_device_held_by_another_vm(lab: Lab) -> None:
    dev = lab.loop_device()
    holder = vm(lab, "u1", [disk_xml(dev, kind="block", fmt="raw")])
    one = vm(lab, "u2", [disk_xml(lab.image("u-a.qcow2"))])
    refused_naming(lab, attach(lab, one, dev, "sdb"), one, holder)


def test_change_media_locks_the_new_medium_and_frees_the_old(lab: Lab) -> None:
    a = lab.image("sm-a.qcow2")
    iso1, iso2 = lab.image("sm1.iso", fmt="raw"), lab.image("sm2.iso", fmt="raw")
    cd = disk_xml(None, "sdz", bus="scsi", fmt="raw", device="cdrom", readonly=True)
    one = lab.define(domain_xml(f"{PREFIX}sm1", [disk_xml(a), cd], devices_extra=SCSI),
                     env=SUPERVISED)  # fmt: skip
    lab.virsh("start", "--paused", one)
    lab.virsh("change-media", one, "sdz", iso1, "--insert", "--live")
    assert not lock_free(iso1) and lock_free(iso1, exclusive=False)
    lab.virsh("change-media", one, "sdz", iso2, "--update", "--live")
    assert not lock_free(iso2) and lock_free(iso2, exclusive=False)
    wait_for(lambda: lock_free(iso1), 10, "the old medium freed")
    lab.virsh("change-media", one, "sdz", "--eject", "--live")
    wait_for(lambda: lock_free(iso2), 10, "the ejected medium freed")


def test_external_snapshot_then_commit(lab: Lab) -> None:
    a = lab.image("ss-a.qcow2")
    one = vm(lab, "ss1", [disk_xml(a)])
    ov = str(lab.images / "ss-ov.qcow2")
    lab.virsh("snapshot-create-as", one, "--disk-only", "--no-metadata",
              "--diskspec", f"vda,file={ov}")  # fmt: skip
    assert not lock_free(ov, exclusive=False)  # created by the supervisor, locked first
    wait_for(lambda: lock_free(a, exclusive=False) and not lock_free(a), 10, "old top shared")
    lab.virsh("blockcommit", one, "vda", "--active", "--pivot", "--wait", timeout=120)
    assert not lock_free(a, exclusive=False)  # written again: exclusive
    wait_for(lambda: lock_free(ov), 10, "the overlay freed after the pivot")


def test_blockcopy_with_pivot(lab: Lab) -> None:
    a = lab.image("sb-a.qcow2")
    one = vm(lab, "sb1", [disk_xml(a)])
    dest = str(lab.images / "sb-copy.qcow2")
    lab.virsh("blockcopy", one, "vda", dest, "--transient-job", "--wait", "--pivot", timeout=120)
    assert not lock_free(dest, exclusive=False)
    wait_for(lambda: lock_free(a), 10, "the source freed after the pivot")


def test_libvirtd_restart_changes_nothing(lab: Lab) -> None:
    """The supervisor sits on no monitor: libvirtd's restart (and its reconnect)
    is not its business; hot-plugs after it are locked as before."""
    if "libvirtd" not in lab.daemons.started:
        pytest.fail("libvirtd was not started by the harness: it cannot be restarted")
    a, b, c = lab.image("sr-a.qcow2"), lab.image("sr-b.qcow2"), lab.image("sr-c.qcow2")
    one = vm(lab, "sr1", [disk_xml(a)])
    two = vm(lab, "sr2", [disk_xml(b)])
    lab.daemons.restart_libvirtd()
    assert lab.state(one) == lab.state(two) == "running"
    refused_naming(lab, attach(lab, one, b, "sdb"), one, two)
    attach(lab, one, c, "sdc", check=True)
    assert not lock_free(c, exclusive=False)


def test_sanlock_backend_under_libvirt(
    lab: Lab, sanlock_env: tuple[dict[str, str], dict[str, str]]
) -> None:
    """The supervisor as the VM user reaches the sanlock daemon: a hot-plug of a
    disk another domain holds is refused naming the holder's host; a hot-plug's
    lease is held (a third domain on that disk is refused) and freed on detach."""
    dom_env, _admin = sanlock_env
    env = {**dom_env, "QEMU_LOCKED_SUPERVISOR": "true", "QEMU_LOCKED_MONITOR_GUARD": "false"}
    a, b, c = lab.image("ssl-a.qcow2"), lab.image("ssl-b.qcow2"), lab.image("ssl-c.qcow2")
    one, two, three = (lab.define(domain_xml(f"{PREFIX}{name}", disks, devices_extra=SCSI), env=env)
                       for name, disks in (("ssl1", [disk_xml(a)]), ("ssl2", [disk_xml(b)]),
                                           ("ssl3", [disk_xml(c)])))  # fmt: skip
    lab.start(one)
    lab.start(two)
    r = attach(lab, one, b, "sdb")
    assert r.returncode != 0 and BUSY in r.stderr, r.stderr
    wait_for(lambda: "by host id 1 (host-1)" in logged(one), 10, "our line in the domain log")
    attach(lab, one, c, "sdc", check=True)
    r = lab.start(three, check=False)
    assert r.returncode != 0 and "by host id 1 (host-1)" in r.stderr, r.stderr
    lab.virsh("detach-disk", one, "sdc", "--live")
    wait_for(lambda: lab.start(three, check=False).returncode == 0, 15, "the lease freed on detach")
    assert lab.state(three) == "running"
