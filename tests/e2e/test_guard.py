"""The monitor guard under a real libvirtd and a real QEMU: disks that change
while the VM runs (virsh attach-disk, detach-disk, change-media, snapshots,
blockcopy) get the same locks as disks on the command line.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
from collections.abc import Iterator

import pytest
from guard_helpers import helper_of

from e2e.lab import PREFIX, QEMU_USER, Lab, disk_xml, domain_xml, lock_free, run, wait_for
from qemu_locked.lock import procfs

pytestmark = pytest.mark.libvirt

SCSI = "<controller type='scsi' index='0' model='virtio-scsi'/>"


# The guard runs only where the supervisor is off (a kernel without seccomp user
# notification): these domains say so, as such a host's config would.
GUARDED = {"QEMU_LOCKED_SUPERVISOR": "false", "QEMU_LOCKED_MONITOR_GUARD": "true"}


def vm(lab: Lab, name: str, disks: list[str], extra: str = "") -> str:
    dom = lab.define(domain_xml(f"{PREFIX}{name}", disks, devices_extra=SCSI + extra), env=GUARDED)
    lab.start(dom)
    return dom


def attach(lab: Lab, dom: str, path: str, target: str, *extra: str,
           check: bool = False) -> subprocess.CompletedProcess[str]:  # fmt: skip
    fmt = "raw" if path.startswith("/dev/") or path.endswith((".raw", ".iso")) else "qcow2"
    args = ["attach-disk", dom, path, target, "--targetbus", "scsi", "--live",
            "--subdriver", fmt, *extra]  # fmt: skip
    if path.startswith("/dev/"):
        args += ["--sourcetype", "block"]
    return lab.virsh(*args, check=check)


def refused(proc: subprocess.CompletedProcess[str], holder: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "qemu-locked: " in proc.stderr, proc.stderr
    assert holder in proc.stderr, proc.stderr


def guard_of(qemu_pid: int) -> int:
    return helper_of(procfs.GUARD_COMM, qemu_pid)


def test_attach_of_a_disk_another_vm_writes_is_refused_naming_it(lab: Lab) -> None:
    a, b = lab.image("g-a.qcow2"), lab.image("g-b.qcow2")
    one = vm(lab, "g1", [disk_xml(a)])
    two = vm(lab, "g2", [disk_xml(b)])
    proc = attach(lab, one, b, "sdb")
    refused(proc, f"guest '{two}'")
    assert 'Failed to get "write" lock' not in proc.stderr
    assert "sdb" not in lab.virsh("domblklist", one).stdout
    # both VMs go on, and vm2 still has its disk to itself
    assert lab.state(one) == lab.state(two) == "running"
    assert not lock_free(b, exclusive=False)


def test_attach_takes_the_lock_and_detach_frees_it(lab: Lab) -> None:
    a, b = lab.image("d-a.qcow2"), lab.image("d-b.qcow2")
    one = vm(lab, "d1", [disk_xml(a)])
    attach(lab, one, b, "sdb", check=True)
    pid = lab.qemu_pid(one)
    st = os.stat(b)
    held = [lk for lk in procfs.scan({(st.st_dev, st.st_ino)}) if lk.kind == "OFDLCK"]
    assert [(lk.pid, lk.mode) for lk in held] == [(pid, "exclusive")]  # QEMU's, not the guard's
    rows = json.loads(lab.lockctl("status", "--json", b).stdout)["locks"]
    assert [(r["pid"], r["guest"], r.get("origin")) for r in rows] == [(pid, one, "hot-plug sdb")]
    assert "hot-plug sdb" in lab.lockctl("status", b).stdout
    other = vm(lab, "d2", [])
    refused(attach(lab, other, b, "sdc"), f"guest '{one}'")
    # check sees the hot-plugged disk as held by the VM it was added to
    check = lab.lockctl("check", "--", "-drive", f"file={b}", check=False)
    assert check.returncode == 1 and f"guest '{one}'" in check.stdout + check.stderr, check
    # HMP through libvirt's monitor is guarded too
    hmp = lab.virsh("qemu-monitor-command", other, "--hmp",
                    f"drive_add 0 file={b},if=none,id=x9", check=False)  # fmt: skip
    refused(hmp, f"guest '{one}'")
    lab.virsh("detach-disk", one, "sdb", "--live")
    assert lock_free(b)
    attach(lab, other, b, "sdc", check=True)  # free again: the other VM may have it
    assert not lock_free(b, exclusive=False)


def test_block_device_either_order(lab: Lab) -> None:
    dev = lab.loop_device()
    a = lab.image("blk-a.qcow2")
    holder = vm(lab, "b1", [disk_xml(dev, kind="block", fmt="raw")])
    one = vm(lab, "b2", [disk_xml(a)])
    refused(attach(lab, one, dev, "sdb"), f"guest '{holder}'")
    lab.destroy(holder)
    attach(lab, one, dev, "sdb", check=True)  # hot-plug first, then a start on it
    proc = lab.start(holder, check=False)
    refused(proc, f"guest '{one}'")


def test_disk_held_by_lockctl_run_is_refused(lab: Lab) -> None:
    a, b = lab.image("r-a.qcow2"), lab.image("r-b.qcow2")
    one = vm(lab, "r1", [disk_xml(a)])
    # As root: the guard (libvirt-qemu) cannot read root's /proc entries, so it
    # says the disk is locked without naming the holder.
    tool = subprocess.Popen([lab.qemu_lockctl, "run", "--disk", b, "--", "sleep", "600"])
    try:
        wait_for(lambda: not lock_free(b, exclusive=False), 30, "qemu-lockctl run to lock")
        proc = attach(lab, one, b, "sdb")
        refused(proc, f"cannot read {b}: in use (writing) by a local process")  # libvirt: RO first
    finally:
        tool.kill()
        tool.wait()
    attach(lab, one, b, "sdb", check=True)


def test_shareable_and_readonly_hot_plug_are_shared(lab: Lab) -> None:
    a, c, iso = (
        lab.image("s-a.qcow2"),
        lab.image("s-c.raw", fmt="raw"),
        lab.image("s.iso", fmt="raw"),
    )
    holder = vm(lab, "s1", [disk_xml(c, fmt="raw", shareable=True)])
    one = vm(lab, "s2", [disk_xml(a)])
    attach(lab, one, c, "sdb", "--mode", "shareable", "--cache", "none", check=True)
    attach(lab, one, iso, "sdc", "--mode", "readonly", check=True)
    assert lock_free(c, exclusive=False) and not lock_free(c)
    assert lock_free(iso, exclusive=False) and not lock_free(iso)
    assert lab.state(holder) == "running"
    # a writer that does not share: refused when its device comes (libvirt adds the nodes first)
    writer = vm(lab, "s3", [])
    proc = attach(lab, writer, c, "sdb", "--cache", "none")
    refused(proc, f"guest '{holder}'")
    assert "device_add" in proc.stderr and f"guest '{writer}'" not in proc.stderr, proc.stderr
    assert lock_free(c, exclusive=False)  # nothing left behind by the refused attach


def test_change_media_locks_the_new_medium_and_frees_the_old(lab: Lab) -> None:
    a = lab.image("m-a.qcow2")
    iso1, iso2 = lab.image("m1.iso", fmt="raw"), lab.image("m2.iso", fmt="raw")
    cd = disk_xml(None, "sdz", bus="scsi", fmt="raw", device="cdrom", readonly=True)
    # Paused: a booting firmware may lock the tray, and then libvirt's open-tray waits in vain.
    one = lab.define(domain_xml(f"{PREFIX}m1", [disk_xml(a), cd], devices_extra=SCSI), env=GUARDED)
    lab.virsh("start", "--paused", one)
    lab.virsh("change-media", one, "sdz", iso1, "--insert", "--live")
    assert not lock_free(iso1) and lock_free(iso1, exclusive=False)
    lab.virsh("change-media", one, "sdz", iso2, "--update", "--live")
    assert not lock_free(iso2) and lock_free(iso2, exclusive=False)
    assert lock_free(iso1)
    lab.virsh("change-media", one, "sdz", "--eject", "--live")
    assert lock_free(iso2)


def test_external_snapshot_overlay_exclusive_old_top_shared(lab: Lab) -> None:
    a = lab.image("sn-a.qcow2")
    one = vm(lab, "sn1", [disk_xml(a)])
    ov = str(lab.images / "sn-ov.qcow2")
    lab.virsh("snapshot-create-as", one, "--disk-only", "--no-metadata",
              "--diskspec", f"vda,file={ov}")  # fmt: skip
    assert not lock_free(ov, exclusive=False)
    assert lock_free(a, exclusive=False) and not lock_free(a)


def test_active_block_commit_makes_the_base_exclusive_again(lab: Lab) -> None:
    a = lab.image("cm-a.qcow2")
    one = vm(lab, "cm1", [disk_xml(a)])
    ov = str(lab.images / "cm-ov.qcow2")
    lab.virsh("snapshot-create-as", one, "--disk-only", "--no-metadata",
              "--diskspec", f"vda,file={ov}")  # fmt: skip
    assert lock_free(a, exclusive=False)
    lab.virsh("blockcommit", one, "vda", "--active", "--pivot", "--wait", timeout=120)
    assert not lock_free(a, exclusive=False)  # written again: exclusive
    assert lock_free(ov)


def test_blockcopy_with_pivot(lab: Lab) -> None:
    a = lab.image("bc-a.qcow2")
    one = vm(lab, "bc1", [disk_xml(a)])
    dest = str(lab.images / "bc-copy.qcow2")
    lab.virsh("blockcopy", one, "vda", dest, "--transient-job", "--wait", "--pivot", timeout=120)
    assert not lock_free(dest, exclusive=False)
    assert lock_free(a)


def test_libvirtd_restart_then_hot_plug_is_still_guarded(lab: Lab) -> None:
    if "libvirtd" not in lab.daemons.started:
        pytest.fail("libvirtd was not started by the harness: it cannot be restarted")
    a, b, c = lab.image("lr-a.qcow2"), lab.image("lr-b.qcow2"), lab.image("lr-c.qcow2")
    one = vm(lab, "lr1", [disk_xml(a)])
    two = vm(lab, "lr2", [disk_xml(b)])
    lab.daemons.restart_libvirtd()
    assert lab.state(one) == lab.state(two) == "running"
    refused(attach(lab, one, b, "sdb"), f"guest '{two}'")
    attach(lab, one, c, "sdc", check=True)
    assert not lock_free(c, exclusive=False)


def test_kill_9_of_the_guard_stops_the_vm_and_frees_everything(lab: Lab) -> None:
    a, b = lab.image("k-a.qcow2"), lab.image("k-b.qcow2")
    one = vm(lab, "k1", [disk_xml(a)])
    attach(lab, one, b, "sdb", check=True)
    os.kill(guard_of(lab.qemu_pid(one)), signal.SIGKILL)
    wait_for(lambda: lab.state(one) == "shut off", 60, "libvirt to stop the VM")
    assert lock_free(a) and lock_free(b)


def test_fd_passing_through_the_guard(lab: Lab, tmp_path: object) -> None:
    """virsh dump hands QEMU the output file with getfd; the guard relays the fd."""
    a = lab.image("fd-a.qcow2")
    one = vm(lab, "fd1", [disk_xml(a)])
    out = lab.images / "fd1.core"
    lab.virsh("dump", one, str(out), "--memory-only", "--format", "elf", timeout=120)
    assert out.stat().st_size > 32 << 20  # the guest's 64 MiB, written through the passed fd
    reply = lab.virsh("qemu-monitor-command", one, '{"execute":"query-fdsets"}').stdout
    assert '"return"' in reply


def test_reserved_fd_names_are_refused(lab: Lab) -> None:
    one = vm(lab, "rs1", [])
    proc = lab.virsh("qemu-monitor-command", one,
                     '{"execute":"closefd","arguments":{"fdname":"qemu-locked-1"}}', check=False)  # fmt: skip
    assert "reserved for the monitor guard" in proc.stdout + proc.stderr
    assert lab.state(one) == "running"


def test_lockspace_backend_hot_plug(lab: Lab) -> None:
    """Leases in a lockspace directory (what spans hosts): taken and freed the same way."""
    space = lab.images / "guard-lockspace"
    lab.lockctl("lockspace", "init", str(space))
    env = {"QEMU_LOCKED_BACKEND": "lockspace", "QEMU_LOCKED_LOCKSPACE_DIR": str(space), **GUARDED}
    a, b, c = lab.image("ls-a.qcow2"), lab.image("ls-b.qcow2"), lab.image("ls-c.qcow2")
    doms = []
    for name, disks in (("ls1", [disk_xml(a)]), ("ls2", [disk_xml(b)]), ("ls3", [disk_xml(c)])):
        doms.append(lab.define(domain_xml(f"{PREFIX}{name}", disks, devices_extra=SCSI), env=env))
    one, two, three = doms
    lab.start(one)
    lab.start(two)
    refused(attach(lab, one, b, "sdb"), f"guest '{two}'")
    attach(lab, one, c, "sdc", check=True)
    proc = lab.start(three, check=False)  # the hot-plugged lease is held: refused
    refused(proc, f"guest '{one}'")
    assert f"pid {lab.qemu_pid(one)}" in proc.stderr  # the record names QEMU, not the guard
    lab.virsh("detach-disk", one, "sdc", "--live")
    lab.start(three)
    assert lab.state(three) == "running"


@pytest.fixture
def sanlock_env(lab: Lab) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """A sanlock daemon the VM user reaches (socket group = QEMU's group), a
    lockspace joined as host 1: (domain env, admin env).  Stopped by pid."""
    from sanlock_helpers import install_sanlock

    why = install_sanlock()
    if why is not None:
        pytest.fail(f"sanlock unavailable: {why}")
    base = lab.images / "sanlock"
    run_dir = base / "run"
    run_dir.mkdir(parents=True)
    for d in (base, run_dir):
        d.chmod(0o755)
    qemu_group = grp.getgrgid(pwd.getpwnam(QEMU_USER).pw_gid).gr_name
    log = open(base / "daemon.log", "ab")
    daemon = subprocess.Popen(
        ["sanlock", "daemon", "-D", "-w", "0", "-l", "0", "-h", "0", "-U", "root",
         "-G", qemu_group, "-L", "-1", "-S", "-1", "-e", "host-1"],
        env=dict(os.environ, SANLOCK_RUN_DIR=str(run_dir), SANLOCK_PRIVILEGED="0"),
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for((run_dir / "sanlock.sock").exists, 10, "the sanlock socket")
        space, leases, cfg = base / "lockspace.img", base / "leases.img", base / "sanlock.toml"
        cfg.write_text(f'backend = "sanlock"\nsanlock_lockspace = "qlk"\nsanlock_path = "{space}"\n'
                       f'sanlock_resources = "{leases}"\nsanlock_host_id = 1\n'
                       "sanlock_io_timeout = 2\n")  # fmt: skip
        cfg.chmod(0o644)
        dom_env = {"QEMU_LOCKED_CONFIG": str(cfg), "SANLOCK_RUN_DIR": str(run_dir), **GUARDED}
        admin = dict(os.environ, **dom_env)
        run([lab.qemu_lockctl, "sanlock", "init", "--slots", "64"], env=admin)
        user = pwd.getpwnam(QEMU_USER)
        for f in (space, leases):  # the VM user takes leases there
            os.chown(f, user.pw_uid, user.pw_gid)
            f.chmod(0o660)
        run([lab.qemu_lockctl, "sanlock", "join"], env=admin, timeout=120)
        yield dom_env, admin
    finally:
        lab.cleanup()  # the VMs first: their registrations end with them
        daemon.kill()
        daemon.wait(10)
        log.close()
        shutil.rmtree(base)  # the next test's daemon starts from nothing


def test_sanlock_backend_under_libvirt(
    lab: Lab, sanlock_env: tuple[dict[str, str], dict[str, str]]
) -> None:
    """The wrapper and the guard run as the VM user and reach the sanlock daemon:
    start, hot-plug refused naming the holder's host, hot-plug lease held, freed on detach."""
    dom_env, _admin = sanlock_env
    a, b, c = lab.image("sl-a.qcow2"), lab.image("sl-b.qcow2"), lab.image("sl-c.qcow2")
    doms = [lab.define(domain_xml(f"{PREFIX}{name}", disks, devices_extra=SCSI), env=dom_env)
            for name, disks in (("sl1", [disk_xml(a)]), ("sl2", [disk_xml(b)]),
                                ("sl3", [disk_xml(c)]))]  # fmt: skip
    one, two, three = doms
    lab.start(one)
    lab.start(two)
    refused(attach(lab, one, b, "sdb"), "by host id 1 (host-1)")
    attach(lab, one, c, "sdc", check=True)
    refused(lab.start(three, check=False), "by host id 1 (host-1)")  # the hot-plug lease is held
    lab.virsh("detach-disk", one, "sdc", "--live")
    lab.start(three)
    assert lab.state(three) == "running"
