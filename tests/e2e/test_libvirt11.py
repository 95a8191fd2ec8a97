"""qemu-locked under a real libvirt 11.3 + QEMU 10.0 (Debian 13), next to the host's own.

The Debian 13 root filesystem is built once and cached under /var/cache/qemu-locked-lab
(tests/e2e/lab11/rootfs.py); libvirtd and virtlogd run inside private namespaces rooted in
it (tests/e2e/lab11/harness.py), so the host's libvirt, /dev and cgroups are untouched.
Every domain runs qemu-locked (the tree's copy of this checkout) as its emulator.
Under CI=true it must run: a reason to skip is a failure.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QEMU_LOCKCTL, base_env, lock_free

from e2e.conftest import lab11_up
from e2e.lab11.harness import Lab

pytestmark = [pytest.mark.libvirt, pytest.mark.qemu, pytest.mark.root]
IMAGES = "/var/lib/libvirt/images/lab11"  # inside the tree
EMULATOR = "/usr/local/bin/qemu-locked"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    the_lab = Lab()
    lab11_up("libvirt 11 lab", the_lab.start, the_lab.stop)
    try:
        yield the_lab
    finally:
        the_lab.stop()


@pytest.fixture
def images(lab: Lab) -> Iterator[Path]:
    d = lab.path(IMAGES)
    d.mkdir(parents=True, exist_ok=True)
    yield d
    for name in lab.virsh("list", "--all", "--name").stdout.split():
        lab.virsh("destroy", name, check=False)
        lab.virsh("undefine", name, "--nvram", check=False)
    for f in d.iterdir():
        f.unlink()


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def disk_xml(path: str, fmt: str = "qcow2", dev: str = "vda", extra: str = "") -> str:
    kind, attr = ("block", "dev") if path.startswith("/dev/") else ("file", "file")
    return (
        f"<disk type='{kind}' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source {attr}='{path}'/><target dev='{dev}' bus='virtio'/>{extra}</disk>"
    )


def define(lab: Lab, name: str, disks: list[str], features: str = "") -> None:
    xml = (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
        f"<features>{features}</features>"
        f"<devices><emulator>{EMULATOR}</emulator>{''.join(disks)}"
        "<serial type='pty'/><console type='pty'/></devices></domain>"
    )
    f = lab.path("/root") / f"{name}.xml"
    f.write_text(xml)
    lab.virsh("define", str(f))


def start(lab: Lab, name: str) -> subprocess.CompletedProcess[str]:
    return lab.virsh("start", name, check=False)


def ns_pid(host_pid: int) -> int:
    """The pid the lab itself gives a process (what its messages say)."""
    for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise LookupError(f"no NSpid for {host_pid}")


def our_line(text: str) -> str:
    """Our line in libvirt's error or a domain log: from ``qemu-locked: `` to its end."""
    line = next((ln for ln in text.splitlines() if "qemu-locked: " in ln), "")
    assert line, text
    return line[line.index("qemu-locked: ") :]


def qemu_pid(name: str) -> int:
    """Host pid of the domain's QEMU (after qemu-locked exec'd it)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        tag = f"guest={name},".encode()
        if argv[0].endswith(b"qemu-system-x86_64") and any(a.startswith(tag) for a in argv):
            return int(entry)
    raise LookupError(f"no QEMU for {name}")


def argv_of(name: str) -> list[str]:
    raw = Path(f"/proc/{qemu_pid(name)}/cmdline").read_bytes().split(b"\0")[1:-1]
    return [a.decode() for a in raw]


def plan_disks(argv: list[str], root: Path) -> dict[str, str]:
    p = subprocess.run([QEMU_LOCKCTL, "plan", "--json", "--", *argv], capture_output=True,
                       text=True, env=base_env())  # fmt: skip
    assert p.returncode == 0, p.stderr
    return {d["path"]: d["mode"] for d in json.loads(p.stdout)["disks"]}


def wait_free(path: Path, exclusive: bool = True) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if lock_free(str(path), exclusive):
            return True
        time.sleep(0.05)
    return False


def test_start_is_locked_and_destroy_frees(lab: Lab, images: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(images / "a.qcow2"), "16M")
    define(lab, "qlk-a", [disk_xml(f"{IMAGES}/a.qcow2")])
    r = start(lab, "qlk-a")
    assert r.returncode == 0, r.stderr
    assert not lock_free(str(images / "a.qcow2"), exclusive=False)  # our exclusive lock
    # the argv libvirt 11 really passed plans exactly that disk
    assert plan_disks(argv_of("qlk-a"), images) == {f"{IMAGES}/a.qcow2": "exclusive"}
    lab.virsh("destroy", "qlk-a")
    assert lock_free(str(images / "a.qcow2"))


def test_async_teardown_domain_starts_and_its_lock_goes_with_it(lab: Lab, images: Path) -> None:
    """libvirt 11 passes -run-with async-teardown=on; it once failed with
    'qemu-locked: async-teardown=on: No such file or directory'."""
    qemu_img("create", "-q", "-f", "qcow2", str(images / "t.qcow2"), "16M")
    define(lab, "qlk-async", [disk_xml(f"{IMAGES}/t.qcow2")], "<async-teardown enabled='yes'/>")
    r = start(lab, "qlk-async")
    assert r.returncode == 0, r.stderr
    argv = argv_of("qlk-async")
    assert argv[argv.index("-run-with") + 1] == "async-teardown=on"
    assert plan_disks(argv, images) == {f"{IMAGES}/t.qcow2": "exclusive"}
    assert not lock_free(str(images / "t.qcow2"), exclusive=False)
    lab.virsh("destroy", "qlk-async")
    assert wait_free(images / "t.qcow2")  # the teardown child holds none of our fds


def test_second_writer_is_refused_with_our_line(lab: Lab, images: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(images / "w.qcow2"), "16M")
    define(lab, "qlk-w1", [disk_xml(f"{IMAGES}/w.qcow2")])
    define(lab, "qlk-w2", [disk_xml(f"{IMAGES}/w.qcow2")])
    assert start(lab, "qlk-w1").returncode == 0
    r = start(lab, "qlk-w2")
    assert r.returncode != 0
    pid = ns_pid(qemu_pid("qlk-w1"))
    assert our_line(r.stderr) == (
        f"qemu-locked: cannot write {IMAGES}/w.qcow2: in use (writing) by pid {pid}, guest 'qlk-w1'"
    )


@pytest.mark.parametrize("flag", ["shareable", "readonly"])
def test_shared_disks_start_side_by_side_and_keep_writers_out(
    lab: Lab, images: Path, flag: str
) -> None:
    """<shareable/> and <readonly/> disks are locked shared: two such VMs run, a writer is refused."""
    name = f"{flag[0]}.img"
    qemu_img("create", "-q", "-f", "raw", str(images / name), "16M")
    shared = disk_xml(f"{IMAGES}/{name}", "raw", extra=f"<{flag}/>")
    define(lab, f"qlk-{flag[0]}1", [shared])
    define(lab, f"qlk-{flag[0]}2", [shared])
    define(lab, f"qlk-{flag[0]}3", [disk_xml(f"{IMAGES}/{name}", "raw")])
    assert start(lab, f"qlk-{flag[0]}1").returncode == 0
    r = start(lab, f"qlk-{flag[0]}2")
    assert r.returncode == 0, r.stderr
    r = start(lab, f"qlk-{flag[0]}3")
    assert r.returncode != 0 and "qemu-locked: " in r.stderr


def test_backing_chain_is_shared_and_protected(lab: Lab, images: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(images / "base.qcow2"), "16M")
    # -u: the backing path is the tree's, which the host's qemu-img cannot open
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", f"{IMAGES}/base.qcow2", "-F", "qcow2",
             str(images / "top.qcow2"), "16M")  # fmt: skip
    define(lab, "qlk-top", [disk_xml(f"{IMAGES}/top.qcow2")])
    define(lab, "qlk-base", [disk_xml(f"{IMAGES}/base.qcow2")])
    r = start(lab, "qlk-top")
    assert r.returncode == 0, r.stderr
    assert plan_disks(argv_of("qlk-top"), images) == {
        f"{IMAGES}/top.qcow2": "exclusive",
        f"{IMAGES}/base.qcow2": "shared",
    }
    assert lock_free(str(images / "base.qcow2"), exclusive=False)
    assert not lock_free(str(images / "base.qcow2"), exclusive=True)
    r = start(lab, "qlk-base")  # writing the backing file under a running overlay
    assert r.returncode != 0 and "qemu-locked: " in r.stderr


def test_block_device(lab: Lab, images: Path, loop_device: str) -> None:
    st = os.stat(loop_device)
    name = os.path.basename(loop_device)
    # the lab's /dev is its own: give it a node for this loop device
    r = lab.run("mknod", "-m", "0660", f"/dev/{name}", "b", str(os.major(st.st_rdev)),
                str(os.minor(st.st_rdev)))  # fmt: skip
    assert r.returncode == 0 or "File exists" in r.stderr, r.stderr
    assert stat.S_ISBLK(st.st_mode)
    define(lab, "qlk-b1", [disk_xml(f"/dev/{name}", "raw")])
    define(lab, "qlk-b2", [disk_xml(f"/dev/{name}", "raw")])
    r = start(lab, "qlk-b1")
    assert r.returncode == 0, r.stderr
    r = start(lab, "qlk-b2")
    assert r.returncode != 0 and "qemu-locked: " in r.stderr
    lab.virsh("destroy", "qlk-b1")
    r = start(lab, "qlk-b2")
    assert r.returncode == 0, r.stderr


def test_save_and_restore_keep_the_disk_protected(lab: Lab, images: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(images / "v.qcow2"), "16M")
    define(lab, "qlk-v1", [disk_xml(f"{IMAGES}/v.qcow2")])
    define(lab, "qlk-v2", [disk_xml(f"{IMAGES}/v.qcow2")])
    assert start(lab, "qlk-v1").returncode == 0
    saved = f"{IMAGES}/v1.save"
    lab.virsh("save", "qlk-v1", saved)
    assert lock_free(str(images / "v.qcow2"))  # saved: nothing runs, nothing held
    lab.virsh("restore", saved)
    assert not lock_free(str(images / "v.qcow2"), exclusive=False)
    r = start(lab, "qlk-v2")
    assert r.returncode != 0 and "qemu-locked: " in r.stderr


def test_qemu_10_first_pass_agrees_with_the_table(lab: Lab) -> None:
    """The tree's QEMU 10.0 asked about every option of the table, the way the wrapper
    asks about an unknown one: 10.0.txt's options take a value exactly as the table says,
    the others are unknown to it."""
    data = Path(__file__).resolve().parents[1] / "data" / "qemu-options" / "10.0.txt"
    known = {ln.split("\t")[0] for ln in data.read_text().splitlines() if ln and ln[0] != "#"}
    code = (
        "import sys; sys.path.insert(0, '/opt/qemu-locked/src')\n"
        "from qemu_locked.parse.options import OPTIONS\n"
        "from qemu_locked.start.probe import ask\n"
        "for name, takes, _f, _l in OPTIONS:\n"
        "    print(name, takes, ask('/usr/bin/qemu-system-x86_64', name))\n"
    )
    r = lab.run("python3", "-c", code)
    assert r.returncode == 0, r.stderr
    wrong = []
    for line in r.stdout.splitlines():
        name, takes, got = line.split()
        want = ("arg" if takes == "True" else "none") if name in known | {"h"} else "unknown"
        if got != want:
            wrong.append((name, want, got))
    assert len(r.stdout.splitlines()) > 150 and wrong == []


def test_hot_plug_under_the_supervisor(lab: Lab, images: Path) -> None:
    """libvirt 11.3 + QEMU 10.0 hot-plug, locked by the kernel's word: the
    supervisor (the default) is the one process beside each QEMU; a disk another
    domain writes is refused (QEMU's open fails, our line names the holder in the
    domain log), a free one is locked while attached and freed on detach, a
    shareable one joins a domain that shares it."""
    from guard_helpers import helper_of

    from qemu_locked.lock.procfs import SUPERVISOR_COMM

    for name, fmt in (("ha.qcow2", "qcow2"), ("hb.qcow2", "qcow2"), ("free.qcow2", "qcow2"),
                      ("sh.img", "raw")):  # fmt: skip
        qemu_img("create", "-q", "-f", fmt, str(images / name), "16M")
    shareable = disk_xml(f"{IMAGES}/sh.img", "raw", dev="vdb", extra="<shareable/>")
    # SCSI: unplugging it needs no guest to answer (a virtio-pci unplug waits for one).
    scsi = "<controller type='scsi' model='virtio-scsi'/>"
    define(lab, "qlk-ha", [disk_xml(f"{IMAGES}/ha.qcow2"), shareable, scsi])
    define(lab, "qlk-hb", [disk_xml(f"{IMAGES}/hb.qcow2"), scsi])
    assert start(lab, "qlk-ha").returncode == 0 and start(lab, "qlk-hb").returncode == 0
    assert helper_of(SUPERVISOR_COMM, qemu_pid("qlk-hb"))
    log = lab.path("/var/log/libvirt/qemu/qlk-hb.log")
    before = len(log.read_text())
    r = lab.virsh("attach-disk", "qlk-hb", f"{IMAGES}/ha.qcow2", "sdc", "--live",
                  "--targetbus", "scsi", "--subdriver", "qcow2", check=False)  # fmt: skip
    assert r.returncode != 0 and "Device or resource busy" in r.stderr, r.stderr
    # libvirt opens it read-only first (auto-read-only): the VM asks to read, refused
    assert our_line(log.read_text()[before:]) == (
        f"qemu-locked: cannot read {IMAGES}/ha.qcow2: in use (writing) by pid "
        f"{ns_pid(qemu_pid('qlk-ha'))}, guest 'qlk-ha'"
    )
    r = lab.virsh("attach-disk", "qlk-hb", f"{IMAGES}/free.qcow2", "sdd", "--live",
                  "--targetbus", "scsi", "--subdriver", "qcow2", check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not lock_free(str(images / "free.qcow2"), exclusive=False)
    assert lab.virsh("detach-disk", "qlk-hb", "sdd", "--live", check=False).returncode == 0
    assert wait_free(images / "free.qcow2")
    r = lab.virsh("attach-disk", "qlk-hb", f"{IMAGES}/sh.img", "sde", "--live", "--targetbus",
                  "scsi", "--subdriver", "raw", "--mode", "shareable", check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not lock_free(str(images / "sh.img")) and lock_free(str(images / "sh.img"), False)
