"""qemu-locked under a real libvirtd and a real QEMU (TCG): every promise, end to end.

Each test defines its domains with the stock emulator and puts them under
qemu-locked with ``qemu-lockctl libvirt enable``, as a user would.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from e2e.lab import (
    LOCKD_CONF,
    MARK_BEGIN,
    PREFIX,
    QEMU_CONF,
    REAL_QEMU,
    VENV,
    Lab,
    disk_xml,
    domain_xml,
    kvm_usable,
    lock_free,
    restore_conf,
    write_conf_block,
)
from qemu_locked.lock import procfs

pytestmark = pytest.mark.libvirt


def byte0_holders(path: str) -> dict[int, str]:
    """pid -> mode of every process holding an OFD byte-0 lock on ``path``."""
    st = os.stat(path)
    return {lk.pid: lk.mode for lk in procfs.scan({(st.st_dev, st.st_ino)}) if lk.kind == "OFDLCK"}


def assert_refused_by_us(proc: object, holder: str) -> None:
    err: str = proc.stderr  # type: ignore[attr-defined]
    assert proc.returncode != 0, "the second start was not refused"  # type: ignore[attr-defined]
    assert "qemu-locked: " in err, err
    assert f"guest '{holder}'" in err, err


def test_runs_under_qemu_locked_and_destroy_frees_disks_at_once(lab: Lab) -> None:
    a = lab.image("run-a.qcow2")
    b = lab.image("run-b.raw", fmt="raw")
    name = lab.define(domain_xml(f"{PREFIX}run", [disk_xml(a), disk_xml(b, "vdb", fmt="raw")]))
    assert f"<emulator>{lab.qemu_locked}</emulator>" in lab.dumpxml(name)
    lab.start(name)
    assert lab.state(name) == "running"
    pid = lab.qemu_pid(name)
    # The locks are held by QEMU itself (the wrapper exec'd it), in the right mode.
    assert byte0_holders(a) == {pid: "exclusive"}
    assert byte0_holders(b) == {pid: "exclusive"}
    assert os.readlink(f"/proc/{pid}/exe") == REAL_QEMU
    assert not lock_free(a, exclusive=False)
    lab.destroy(name)
    # No wait: the lock dies with the process.
    assert lock_free(a) and lock_free(b)


def test_second_writer_is_refused_naming_the_first_domain(lab: Lab) -> None:
    disk = lab.image("shared-writer.qcow2")
    first = lab.define(domain_xml(f"{PREFIX}w1", [disk_xml(disk)]))
    second = lab.define(domain_xml(f"{PREFIX}w2", [disk_xml(disk)]))
    lab.start(first)
    proc = lab.start(second, check=False)
    assert_refused_by_us(proc, first)
    assert 'Failed to get "write" lock' not in proc.stderr
    assert lab.state(first) == "running"
    assert lab.state(second) == "shut off"
    lab.destroy(first)
    lab.start(second)  # free again: the second one now runs
    assert lab.state(second) == "running"


def test_shareable_disk_lets_both_run(lab: Lab) -> None:
    disk = lab.image("shareable.raw", fmt="raw")
    xml_disk = disk_xml(disk, fmt="raw", shareable=True, cache="none")
    a = lab.define(domain_xml(f"{PREFIX}sh1", [xml_disk]))
    b = lab.define(domain_xml(f"{PREFIX}sh2", [xml_disk]))
    lab.start(a)
    lab.start(b)
    assert lab.state(a) == lab.state(b) == "running"
    assert set(byte0_holders(disk).values()) == {"shared"}
    assert set(byte0_holders(disk)) == {lab.qemu_pid(a), lab.qemu_pid(b)}
    assert lock_free(disk, exclusive=False) and not lock_free(disk, exclusive=True)


def test_readonly_disk_is_shared_and_excludes_a_writer(lab: Lab) -> None:
    """DESIGN section 4: <readonly/> takes a shared lock, so readers run together and
    a writer is refused while any reader runs (and a reader while the writer runs)."""
    disk = lab.image("ro.raw", fmt="raw")
    r1 = lab.define(domain_xml(f"{PREFIX}ro1", [disk_xml(disk, fmt="raw", readonly=True)]))
    r2 = lab.define(domain_xml(f"{PREFIX}ro2", [disk_xml(disk, fmt="raw", readonly=True)]))
    writer = lab.define(domain_xml(f"{PREFIX}rw", [disk_xml(disk, fmt="raw")]))
    lab.start(r1)
    lab.start(r2)
    assert byte0_holders(disk) == {lab.qemu_pid(r1): "shared", lab.qemu_pid(r2): "shared"}
    assert_refused_by_us(lab.start(writer, check=False), r1)
    lab.destroy(r1)
    lab.destroy(r2)
    lab.start(writer)
    assert_refused_by_us(lab.start(r1, check=False), writer)


def test_backing_chain_base_cannot_be_written_while_an_overlay_runs(lab: Lab) -> None:
    base = lab.image("chain-base.qcow2")
    top1 = lab.image("chain-top1.qcow2", backing=base)
    top2 = lab.image("chain-top2.qcow2", backing=base)
    o1 = lab.define(domain_xml(f"{PREFIX}ov1", [disk_xml(top1)]))
    o2 = lab.define(domain_xml(f"{PREFIX}ov2", [disk_xml(top2)]))
    base_writer = lab.define(domain_xml(f"{PREFIX}base", [disk_xml(base)]))
    lab.start(o1)
    pid = lab.qemu_pid(o1)
    assert byte0_holders(top1) == {pid: "exclusive"}
    assert byte0_holders(base) == {pid: "shared"}
    assert_refused_by_us(lab.start(base_writer, check=False), o1)
    lab.start(o2)  # another overlay on the same base reads it too: allowed
    assert lab.state(o2) == "running"
    lab.destroy(o1)
    lab.destroy(o2)
    lab.start(base_writer)
    assert lab.state(base_writer) == "running"


def test_block_device_disk_on_a_loop_device_is_locked(lab: Lab) -> None:
    dev = lab.loop_device()
    disk = disk_xml(dev, kind="block", fmt="raw")
    name = lab.define(domain_xml(f"{PREFIX}blk", [disk]))
    lab.start(name)
    assert lab.state(name) == "running"
    # QEMU (in the domain's private /dev) holds the lock on its own node of the device.
    pid = lab.qemu_pid(name)
    fdinfo_locks = [
        lk for lk in procfs.scan() if lk.pid == pid and lk.kind == "OFDLCK" and lk.path == dev
    ]
    assert [lk.mode for lk in fdinfo_locks] == ["exclusive"]
    lab.destroy(name)


def test_block_device_second_writer_is_refused(lab: Lab) -> None:
    dev = lab.loop_device()
    disk = disk_xml(dev, kind="block", fmt="raw")
    a = lab.define(domain_xml(f"{PREFIX}blk1", [disk]))
    b = lab.define(domain_xml(f"{PREFIX}blk2", [disk]))
    lab.start(a)
    assert_refused_by_us(lab.start(b, check=False), a)


Configure = Callable[..., None]
LOCKD = 'lock_manager = "lockd"'


@pytest.fixture
def libvirt_conf(lab: Lab) -> Iterator[Configure]:
    """configure(qemu=..., lockd=...): our marked block in qemu.conf / qemu-lockd.conf
    (replacing the previous one), then a libvirtd restart.  Restored afterwards,
    byte for byte, with one more restart; a virtlockd we started is stopped."""
    daemons = lab.daemons
    if "libvirtd" not in daemons.started:
        reason = "libvirtd was not started by the harness: it cannot be reconfigured"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: must run)")
        pytest.skip(reason)
    originals = {
        conf: conf.read_bytes() if conf.exists() else None for conf in (QEMU_CONF, LOCKD_CONF)
    }

    def restore() -> None:
        for conf, data in originals.items():
            if data is None:
                conf.unlink(missing_ok=True)
            else:
                restore_conf(conf, data)

    def configure(qemu: str = "", lockd: str = "") -> None:
        restore()
        if "lockd" in qemu:
            daemons.ensure_virtlockd()
        for conf, body in ((QEMU_CONF, qemu), (LOCKD_CONF, lockd)):
            if body:
                write_conf_block(conf, body)
        daemons.restart_libvirtd()

    try:
        yield configure
    finally:
        lab.cleanup()
        restore()
        daemons.restart_libvirtd()
        daemons.stop("virtlockd")
    assert MARK_BEGIN.encode() not in QEMU_CONF.read_bytes()


def test_virtlockd_side_by_side(lab: Lab, libvirt_conf: Configure) -> None:
    """lock_manager = "lockd" and qemu-locked on one host.

    With virtlockd's leases in a lockspace directory (file_lockspace_dir), both
    protect every disk: no deadlock, and a conflicting start is still refused
    (by us: our wrapper runs before virtlockd acquires, at CPU start).

    With virtlockd's default (it locks byte 0 of the disk itself, like the direct
    backend), each VM's own two locks collide: the start fails at once and
    cleanly, with virtlockd's "Lockspace resource ... is locked"; nothing hangs or
    stays locked.  The same with qemu-locked's lockspace backend, which also
    takes each image's byte-0 lock (one inode, one lock: issue 13).
    """
    disk = lab.image("lockd.qcow2")
    a = lab.define(domain_xml(f"{PREFIX}lk1", [disk_xml(disk)]))
    b = lab.define(domain_xml(f"{PREFIX}lk2", [disk_xml(disk)]))

    (lab.images / "lockd-leases").mkdir(exist_ok=True)
    libvirt_conf(qemu=LOCKD, lockd=f'file_lockspace_dir = "{lab.images}/lockd-leases"')
    t0 = time.monotonic()
    lab.start(a)
    assert time.monotonic() - t0 < 30
    assert lab.state(a) == "running"
    assert byte0_holders(disk) == {lab.qemu_pid(a): "exclusive"}
    assert_refused_by_us(lab.start(b, check=False), a)
    lab.destroy(a)
    lab.start(b)
    assert lab.state(b) == "running"
    lab.destroy(b)

    libvirt_conf(qemu=LOCKD)  # virtlockd's default: it locks byte 0 of the disk itself
    t0 = time.monotonic()
    proc = lab.start(a, check=False)
    assert time.monotonic() - t0 < 30
    assert proc.returncode != 0
    assert "Lockspace resource" in proc.stderr and "is locked" in proc.stderr, proc.stderr
    assert lab.state(a) == "shut off"
    assert lock_free(disk)

    # Still virtlockd's default, with qemu-locked's lockspace backend: its lease
    # files, and the disk's byte 0 as well, so the start fails the same clean way.
    space = lab.images / "lockspace-lockd"
    lab.lockctl("lockspace", "init", str(space))
    env = {"QEMU_LOCKED_BACKEND": "lockspace", "QEMU_LOCKED_LOCKSPACE_DIR": str(space)}
    c = lab.define(domain_xml(f"{PREFIX}lk3", [disk_xml(disk)]), env=env)
    proc = lab.start(c, check=False)
    assert proc.returncode != 0
    assert "Lockspace resource" in proc.stderr and "is locked" in proc.stderr, proc.stderr
    assert lab.state(c) == "shut off"
    assert lock_free(disk)


def test_block_device_conflict_is_refused_with_the_lockspace_backend(lab: Lab) -> None:
    """The other way around the private /dev: backend = "lockspace" keys a block
    device by its device number, in a lease directory every namespace shares."""
    space = lab.images / "lockspace"
    lab.lockctl("lockspace", "init", str(space))
    env = {"QEMU_LOCKED_BACKEND": "lockspace", "QEMU_LOCKED_LOCKSPACE_DIR": str(space)}
    dev = lab.loop_device()
    disk = disk_xml(dev, kind="block", fmt="raw")
    a = lab.define(domain_xml(f"{PREFIX}blkls1", [disk]), env=env)
    b = lab.define(domain_xml(f"{PREFIX}blkls2", [disk]), env=env)
    lab.start(a)
    assert_refused_by_us(lab.start(b, check=False), a)
    lab.destroy(a)
    lab.start(b)
    assert lab.state(b) == "running"


def test_block_device_conflict_is_refused_without_private_dev(
    lab: Lab, libvirt_conf: Configure
) -> None:
    """The workaround for the above: qemu.conf namespaces = [] (QEMU sees the host's
    /dev), and the second writer of a block device is refused like a file's."""
    libvirt_conf(qemu="namespaces = []")
    dev = lab.loop_device()
    disk = disk_xml(dev, kind="block", fmt="raw")
    a = lab.define(domain_xml(f"{PREFIX}blkns1", [disk]))
    b = lab.define(domain_xml(f"{PREFIX}blkns2", [disk]))
    lab.start(a)
    assert byte0_holders(dev) == {lab.qemu_pid(a): "exclusive"}
    assert_refused_by_us(lab.start(b, check=False), a)
    lab.destroy(a)
    assert lock_free(dev)


def test_transient_disks_sharing_a_base_both_run(lab: Lab) -> None:
    """<transient shareBacking='yes'/>: libvirt hot-plugs the disk after start (QMP),
    so it is not on the emulator's argv and qemu-locked cannot lock it; both run.
    (Known limit: that base is then protected by QEMU's own image locks only.)"""
    base = lab.image("golden.qcow2")
    disk = disk_xml(base, transient=True, share_backing=True)
    acpi = "\n  <features><acpi/></features>"  # PCI hotplug on i440fx needs ACPI
    a = lab.define(domain_xml(f"{PREFIX}tr1", [disk], features=acpi))
    b = lab.define(domain_xml(f"{PREFIX}tr2", [disk], features=acpi))
    lab.start(a)
    lab.start(b)
    assert lab.state(a) == lab.state(b) == "running"


def test_save_and_restore(lab: Lab) -> None:
    disk = lab.image("save.qcow2")
    name = lab.define(domain_xml(f"{PREFIX}save", [disk_xml(disk)]))
    lab.start(name)
    first_pid = lab.qemu_pid(name)
    saved = lab.images / "save.state"
    lab.virsh("save", name, str(saved), timeout=180)
    assert lab.state(name) == "shut off"
    assert lock_free(disk)
    lab.virsh("restore", str(saved), timeout=180)
    assert lab.state(name) == "running"
    pid = lab.qemu_pid(name)
    assert pid != first_pid
    assert b"-incoming" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:]
    assert byte0_holders(disk) == {pid: "exclusive"}
    lab.destroy(name)
    assert lock_free(disk)


def test_managedsave_round_trip_keeps_the_disk_protected(lab: Lab) -> None:
    disk = lab.image("managed.qcow2")
    name = lab.define(domain_xml(f"{PREFIX}msave", [disk_xml(disk)]))
    other = lab.define(domain_xml(f"{PREFIX}msave2", [disk_xml(disk)]))
    lab.start(name)
    lab.virsh("managedsave", name, timeout=180)
    assert lab.state(name) == "shut off"
    assert lock_free(disk)
    lab.start(name)  # restores from the managed save image (-incoming defer)
    pid = lab.qemu_pid(name)
    assert b"-incoming" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:]
    assert byte0_holders(disk) == {pid: "exclusive"}
    assert_refused_by_us(lab.start(other, check=False), name)
    lab.destroy(name)
    assert lock_free(disk)


ROUND_TRIP_EXTRA = """
  <qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
    <qemu:arg value='-no-reboot'/>
    <qemu:env name='E2E_MARK' value='kept'/>
  </qemu:commandline>
"""


def test_enable_disable_round_trip_is_byte_identical(lab: Lab) -> None:
    a = lab.image("rt.qcow2")
    plain = domain_xml(f"{PREFIX}rt1", [disk_xml(a)])
    # A domain that already has qemu:commandline of its own keeps it.
    custom = domain_xml(f"{PREFIX}rt2", [disk_xml(a, readonly=True, fmt="qcow2")]).replace(
        "</domain>", ROUND_TRIP_EXTRA + "</domain>"
    )
    # A VNC password is only in the XML with --security-info: enable must keep it.
    custom = custom.replace(
        "<memballoon", "<graphics type='vnc' autoport='yes' passwd='s3cret'/>\n    <memballoon"
    )
    names = [lab.define(plain, locked=False), lab.define(custom, locked=False)]
    before = {n: lab.dumpxml(n) for n in names}
    secure = {n: lab.virsh("dumpxml", "--inactive", "--security-info", n).stdout for n in names}
    assert "passwd='s3cret'" in secure[names[1]]
    out = lab.lockctl("libvirt", "enable", *names).stdout
    assert all(f"{n}: enabled" in out for n in names), out
    for n in names:
        xml = lab.dumpxml(n)
        assert f"<emulator>{lab.qemu_locked}</emulator>" in xml
        assert f"<qemu:env name='QEMU_LOCKED_EMULATOR' value='{REAL_QEMU}'/>" in xml
    assert "<qemu:env name='E2E_MARK' value='kept'/>" in lab.dumpxml(names[1])
    # Idempotent both ways.
    assert "already under qemu-locked" in lab.lockctl("libvirt", "enable", names[0]).stdout
    lab.start(names[1])  # it really runs that way
    assert lab.state(names[1]) == "running"
    lab.destroy(names[1])
    lab.lockctl("libvirt", "disable", *names)
    for n in names:
        assert lab.dumpxml(n) == before[n]
        assert lab.virsh("dumpxml", "--inactive", "--security-info", n).stdout == secure[n]
    assert "not under qemu-locked" in lab.lockctl("libvirt", "disable", names[0]).stdout


def test_enable_all_and_errors(lab: Lab) -> None:
    a = lab.image("all.qcow2")
    n1 = lab.define(domain_xml(f"{PREFIX}all1", [disk_xml(a)]), locked=False)
    n2 = lab.define(domain_xml(f"{PREFIX}all2", [disk_xml(a)]), locked=False)
    others = [
        n
        for n in lab.virsh("list", "--all", "--persistent", "--name").stdout.split()
        if n not in (n1, n2)
    ]
    before = {n: lab.dumpxml(n) for n in others}
    # --all touches every persistent domain, so only run it when ours are the only ones.
    if not others:
        lab.lockctl("libvirt", "enable", "--all")
        assert lab.lockctl("libvirt", "disable", "--all").returncode == 0
    for n in others:
        assert lab.dumpxml(n) == before[n]
    bad = lab.lockctl("libvirt", "enable", f"{PREFIX}no-such-domain", check=False)
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qemu-lockctl: "), bad.stderr
    assert "Traceback" not in bad.stderr
    # A transient domain (virsh create) has no persistent XML to change.
    transient = domain_xml(f"{PREFIX}transient-dom", [disk_xml(lab.image("tr.qcow2"))])
    xml_file = lab.images / "transient.xml"
    xml_file.write_text(transient)
    lab.virsh("create", str(xml_file))
    lab.defined.append(f"{PREFIX}transient-dom")
    refused = lab.lockctl("libvirt", "enable", f"{PREFIX}transient-dom", check=False)
    assert refused.returncode == 2 and "is transient" in refused.stderr, refused.stderr
    assert lab.virsh("dominfo", f"{PREFIX}transient-dom").stdout.count("Persistent:     no") == 1
    usage = lab.lockctl("libvirt", "enable", check=False)
    assert usage.returncode == 2 and usage.stderr.startswith("qemu-lockctl: "), usage.stderr
    noexec = lab.lockctl(
        "libvirt", "enable", "--emulator", "/nonexistent/qemu-locked", n1, check=False
    )
    assert noexec.returncode == 2 and noexec.stderr.startswith("qemu-lockctl: "), noexec.stderr


def test_host_wide_install_in_place_of_the_real_binary(lab: Lab) -> None:
    """The dpkg-divert layout, in a directory of its own: qemu-locked under the QEMU
    binary's name, the real binary beside it as NAME.real, no per-domain XML."""
    where = VENV / "divert"  # ours, whichever qemu-locked runs (venv or package)
    where.mkdir(exist_ok=True)
    where.chmod(0o755)
    link = where / "qemu-system-x86_64"
    real = where / "qemu-system-x86_64.real"
    for path, target in ((link, lab.qemu_locked), (real, REAL_QEMU)):
        if path.is_symlink():
            path.unlink()  # a previous session may have run another qemu-locked
        path.symlink_to(target)
    disk = lab.image("divert.qcow2")
    name = lab.define(
        domain_xml(f"{PREFIX}div", [disk_xml(disk)], emulator=str(link)), locked=False
    )
    other = lab.define(
        domain_xml(f"{PREFIX}div2", [disk_xml(disk)], emulator=str(link)), locked=False
    )
    lab.start(name)
    pid = lab.qemu_pid(name)
    assert byte0_holders(disk) == {pid: "exclusive"}
    assert os.readlink(f"/proc/{pid}/exe") == REAL_QEMU
    assert_refused_by_us(lab.start(other, check=False), name)


def test_kvm_domain(lab: Lab) -> None:
    if not kvm_usable():
        if os.environ.get("CI") == "true":
            # No KVM here: prove the TCG path again instead of skipping.
            dom_type = "qemu"
        else:
            pytest.skip("/dev/kvm is not usable on this machine")
    else:
        dom_type = "kvm"
    disk = lab.image("kvm.qcow2")
    name = lab.define(domain_xml(f"{PREFIX}kvm", [disk_xml(disk)], dom_type=dom_type))
    lab.start(name)
    pid = lab.qemu_pid(name)
    assert byte0_holders(disk) == {pid: "exclusive"}
    lab.destroy(name)
    assert lock_free(disk)
