"""What the two-host scenarios share (test_two_hosts.py, test_two_hosts_migration.py):
domains defined alike on both hosts, and the lock state read on the machine after
every step: `qemu-lockctl status --json` on each host (its namespaces) and
/proc/locks (never two writers).  libvirt's own lockd is read from virtlockd's
leases instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

from e2e.lab11.harness import Lab
from e2e.lab11.hosts import HOST_IDS, IMAGES, TwoHosts

EMULATOR = "/usr/local/bin/qemu-locked"
STOCK = "/usr/bin/qemu-system-x86_64"
# qemu-locked's backends, and libvirt's own lock manager (virtlockd) as the anchor
BACKENDS = ["direct", "lockspace", "sanlock", "lockd"]
BALLAST = "ballast.bin"


def image(hosts: TwoHosts, name: str) -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(hosts.images / name), "32M"],
                   check=True)  # fmt: skip
    return f"{IMAGES}/{name}"


def define(hosts: TwoHosts, lab: Lab, name: str, disk: str, backend: str, uid: str = "",
           ballast: bool = False, env: dict[str, str] | None = None) -> str:  # fmt: skip
    """The same XML a cluster would give every host (same name, same UUID); a
    disk under /dev is a block device (a LUN both hosts see).  ``ballast``: 32 MiB
    of random bytes loaded into the guest's RAM (a guest with no OS has nothing but
    zero pages, which migrate in no time): a migration window to aim at.  ``env``:
    qemu-locked settings the domain carries (they travel with a migration)."""
    source = (f"<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
              f"<source dev='{disk}'/>" if disk.startswith("/dev/") else
              "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
              f"<source file='{disk}'/>")  # fmt: skip
    xml = (
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
        f"<name>{name}</name><uuid>{uid or uuid.uuid5(uuid.NAMESPACE_DNS, name)}</uuid>"
        "<memory unit='MiB'>128</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
        f"<emulator>{STOCK if backend == 'lockd' else EMULATOR}</emulator>"
        f"{source}<target dev='vda' bus='virtio'/>"
        "</disk><serial type='pty'/><console type='pty'/></devices>"
        + "<qemu:commandline>"
        + ("" if backend == "lockd" else f"<qemu:env name='QEMU_LOCKED_BACKEND' value='{backend}'/>")
        + "".join(f"<qemu:env name='{k}' value='{v}'/>" for k, v in (env or {}).items())
        + (f"<qemu:arg value='-device'/><qemu:arg value='loader,file={IMAGES}/{BALLAST},"
           "addr=0x1000000,force-raw=on'/>" if ballast else "")
        + "</qemu:commandline></domain>"
    )  # fmt: skip
    f = hosts.work / f"{name}.{lab.host}.xml"
    f.write_text(xml)
    lab.virsh("define", str(f))
    return name


def held(hosts: TwoHosts, disk: str, backend: str) -> dict[str, str]:
    """{host: mode} of who holds ``disk``, from `qemu-lockctl status --json` run on
    each host (its own namespaces): a host names its own QEMU; the other must show
    the disk held too (by the lease record, or "held elsewhere"), never free.  And
    /proc/locks on the machine: never two writers."""
    if backend == "lockd":
        return held_by_virtlockd(hosts)
    out: dict[str, str] = {}
    views: dict[str, list[dict[str, object]]] = {}
    for host in hosts.hosts:
        r = hosts.lockctl(host, backend, "status", "--json", disk)
        assert r.returncode == 0, r.stderr
        # A stale record (its writer gone, its slot free) holds nothing.
        views[host] = [r for r in json.loads(r.stdout)["locks"] if r.get("state") != "stale"]
        for row in views[host]:
            if row.get("host") in hosts.hosts and row.get("state") in (None, "held"):
                out[str(row["host"])] = str(row["mode"])
    if out:
        for host, rows in views.items():
            assert rows, f"{host}'s status calls {disk} free while {out} holds it"
    writers = byte0_writers(hosts, disk)
    assert writers <= 1, f"{writers} writers on {disk}"
    assert (writers == 1) == ("exclusive" in out.values()), (writers, out, views)
    return out


def settled(hosts: TwoHosts, disk: str, backend: str, want: dict[str, str]) -> None:
    """``held`` once it says ``want``: a QEMU that has just exited (a migration's
    source, a managedsave) has lost its own fds, but its supervisor lets go of its
    copies when it sees the exit, a few ms later; a read in between is retried."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if held(hosts, disk, backend) == want:
                return
        except AssertionError:
            pass  # two reads (status, /proc/locks) straddled the exit
        time.sleep(0.1)
    assert held(hosts, disk, backend) == want


def held_by_virtlockd(hosts: TwoHosts) -> dict[str, str]:
    """{host: mode} of virtlockd's leases in the shared directory: /proc/locks on
    the machine (POSIX locks name their process; its PID namespace, its host)."""
    inodes = {os.stat(f).st_ino for f in hosts.lockd_files.iterdir()}
    ns = {os.readlink(f"/proc/{lab.host_pid}/ns/pid"): h for h, lab in hosts.hosts.items()}
    out: dict[str, str] = {}
    for f in (ln.split() for ln in Path("/proc/locks").read_text().splitlines()):
        if f[1] == "POSIX" and int(f[5].rsplit(":", 1)[1]) in inodes:
            host = ns.get(os.readlink(f"/proc/{f[4]}/ns/pid"), "?")
            out[host] = "exclusive" if f[3] == "WRITE" else "shared"
    return out


def stale_records(hosts: TwoHosts, host: str, guest: str) -> list[str]:
    """Lease records of ``guest`` on ``host`` in the shared lockspace whose writer
    no longer holds its slot: a refused start must leave none behind (a VM that ran
    and quit leaves its own, overwritten by the next holder or removed by lockspace
    gc: hence one guest's, the lockspace is shared by the module's tests)."""
    from qemu_locked.backends.lockspace.leases import read_records

    out = []
    for lease in hosts.lockspace.glob("*.lease"):
        fd = os.open(lease, os.O_RDONLY)
        try:
            out += [f"{lease.name}: {r.describe()}" for r in read_records(fd)
                    if not r.live and r.host == host and r.guest == guest]  # fmt: skip
        finally:
            os.close(fd)
    return out


def byte0_writers(hosts: TwoHosts, disk: str) -> int:
    """Write locks on byte 0 of ``disk``: the shared image, or a block device's
    node: in either host's /dev, or in the /dev libvirt gives each QEMU (one
    device, an inode per /dev)."""
    if disk.startswith("/dev/"):
        nodes = [lab.path_in_ns(disk) for lab in hosts.hosts.values()]
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system"):
                    nodes.append(Path(f"/proc/{pid}/root{disk}"))
            except OSError:
                continue  # gone meanwhile
        nodes = [n for n in nodes if n.exists()]
    else:
        nodes = [hosts.images / Path(disk).name]
    ids = {f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
           for st in map(os.stat, nodes)}  # fmt: skip
    lines = [ln.split() for ln in Path("/proc/locks").read_text().splitlines()]
    return sum(1 for f in lines if f[5] in ids and f[3] == "WRITE" and f[6] == "0")


def names_holder(line: str, guest: str, host: str, backend: str) -> None:
    """The refusal names the holder: the lease record (guest and host); sanlock's
    leases carry no guest, only the host id and the name its daemon gave itself."""
    if backend == "sanlock":
        assert f"by host id {HOST_IDS[host]} ({host})" in line, line
    elif backend != "lockd":  # virtlockd names the lease's hash only
        assert f"guest '{guest}' on host '{host}'" in line, line


def refused(r: subprocess.CompletedProcess[str]) -> str:
    """The refusal's line: ours; under lockd, libvirt's or QEMU's own (libvirt takes
    lockd's disk leases when the CPUs start, after QEMU has opened its images: on a
    filesystem whose locks reach QEMU, QEMU's own image lock refuses first)."""
    assert r.returncode != 0, r
    for sign in ("Lockspace resource", 'Failed to get "write" lock'):
        if sign in r.stderr:
            return "lockd: " + next(ln for ln in r.stderr.splitlines() if sign in ln)
    line = next((ln for ln in r.stderr.splitlines() if "qemu-locked: " in ln), "")
    assert line, r.stderr
    return line[line.index("qemu-locked: ") :]


def migrate(hosts: TwoHosts, src: Lab, dst: str, name: str) -> float:
    t0 = time.monotonic()
    r = src.virsh("migrate", "--live", "--p2p", "--unsafe", name, hosts.uri(dst),
                  "tcp://127.0.0.1", check=False)  # fmt: skip
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    return took


LIBVIRTD_PID = "/run/qemu-locked-lab/libvirtd.pid"


def stop_libvirtd(lab: Lab) -> None:
    """SIGTERM to the host's libvirtd; back once it is gone (its VMs run on)."""
    pid = lab.run("cat", LIBVIRTD_PID).stdout.strip()
    assert pid.isdigit() and lab.run("kill", pid).returncode == 0
    deadline = time.monotonic() + 30
    while lab.run("kill", "-0", pid).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.1)


def start_libvirtd(lab: Lab) -> None:
    """The host's libvirtd again, as its init started it; back once it answers."""
    r = lab.run("taskset", "-c", "0", "libvirtd", "-d", "--listen", "-p", LIBVIRTD_PID)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 30
    while lab.virsh("list", check=False).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.1)


def rolled_back(hosts: TwoHosts, name: str, disk: str, backend: str) -> None:
    """A migration A -> B that failed: the guest runs on on A, which holds its disk,
    B has no domain running and left no lease record."""
    a, b = hosts.hosts["host-a"], hosts.hosts["host-b"]
    assert a.virsh("domstate", name).stdout.strip() == "running"
    assert b.virsh("domstate", name).stdout.strip() == "shut off"
    settled(hosts, disk, backend, {"host-a": "exclusive"})
    if backend == "lockspace":
        assert stale_records(hosts, "host-b", name) == []
