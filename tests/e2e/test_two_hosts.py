"""Two real libvirt 11.3 hosts sharing storage (issue 22): tests/e2e/lab11/hosts.py.

Each host has its own namespaces, libvirtd, hostname and host UUID; the images and
the lockspace are shared, and the two libvirtd reach each other over TCP in a
network namespace of their own.  Every domain runs qemu-locked (the supervisor on,
the default).  After every step the lock state is read on the machine itself:
`qemu-lockctl status --json` (which host's QEMU holds what) and /proc/locks
(never two writers).  Under CI=true it must run.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.conftest import lab11_up
from e2e.lab11.harness import Lab
from e2e.lab11.hosts import IMAGES, TwoHosts

pytestmark = [pytest.mark.libvirt, pytest.mark.qemu, pytest.mark.root]
EMULATOR = "/usr/local/bin/qemu-locked"
STOCK = "/usr/bin/qemu-system-x86_64"
# qemu-locked's backends, and libvirt's own lock manager (virtlockd) as the anchor
BACKENDS = ["direct", "lockspace", "lockd"]


def _pair(work: Path, lockd: bool) -> Iterator[TwoHosts]:
    pair = TwoHosts(work, lockd=lockd)
    lab11_up("two-host lab", pair.start, pair.stop)
    try:
        yield pair
    finally:
        pair.stop()


@pytest.fixture(scope="module")
def ql_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    yield from _pair(tmp_path_factory.mktemp("two-hosts"), lockd=False)


@pytest.fixture(scope="module")
def lockd_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    yield from _pair(tmp_path_factory.mktemp("two-hosts-lockd"), lockd=True)


@pytest.fixture
def hosts(request: pytest.FixtureRequest, backend: str) -> Iterator[TwoHosts]:
    pair: TwoHosts = request.getfixturevalue("lockd_hosts" if backend == "lockd" else "ql_hosts")
    yield pair
    for lab in pair.hosts.values():
        for name in lab.virsh("list", "--all", "--name").stdout.split():
            lab.virsh("destroy", name, check=False)
            lab.virsh("undefine", name, "--managed-save", check=False)
    for f in pair.images.iterdir():
        f.unlink()


@pytest.fixture
def a_b(hosts: TwoHosts) -> tuple[Lab, Lab]:
    return hosts.hosts["host-a"], hosts.hosts["host-b"]


def image(hosts: TwoHosts, name: str) -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(hosts.images / name), "32M"],
                   check=True)  # fmt: skip
    return f"{IMAGES}/{name}"


def define(hosts: TwoHosts, lab: Lab, name: str, disk: str, backend: str, uid: str = "") -> str:
    """The same XML a cluster would give every host (same name, same UUID)."""
    xml = (
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
        f"<name>{name}</name><uuid>{uid or uuid.uuid5(uuid.NAMESPACE_DNS, name)}</uuid>"
        "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
        f"<emulator>{STOCK if backend == 'lockd' else EMULATOR}</emulator>"
        "<disk type='file' device='disk'>"
        f"<driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/>"
        "</disk><serial type='pty'/><console type='pty'/></devices>"
        + ("" if backend == "lockd" else "<qemu:commandline><qemu:env name='QEMU_LOCKED_BACKEND' "
           f"value='{backend}'/></qemu:commandline>")
        + "</domain>"
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
    path = str(hosts.images / Path(disk).name)
    writers = byte0_writers(path)
    assert writers <= 1, f"{writers} writers on {path}"
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


def stale_records(hosts: TwoHosts, host: str) -> list[str]:
    """Lease records ``host`` left in the shared lockspace whose writer no longer
    holds its slot: a refused start must leave none behind (a VM that ran and quit
    leaves its own, overwritten by the next holder or removed by lockspace gc)."""
    from qemu_locked.backends.lockspace.leases import read_records

    out = []
    for lease in hosts.lockspace.glob("*.lease"):
        fd = os.open(lease, os.O_RDONLY)
        try:
            out += [f"{lease.name}: {r.describe()}" for r in read_records(fd)
                    if not r.live and r.host == host]  # fmt: skip
        finally:
            os.close(fd)
    return out


def byte0_writers(path: str) -> int:
    ino = os.stat(path).st_ino
    lines = [ln.split() for ln in Path("/proc/locks").read_text().splitlines()]
    return sum(1 for f in lines if f[5].endswith(f":{ino}") and f[3] == "WRITE" and f[6] == "0")


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_domain_on_both_hosts_runs_once(
    hosts: TwoHosts, a_b: tuple[Lab, Lab], backend: str
) -> None:
    a, b = a_b
    disk = image(hosts, "one.qcow2")
    for lab in (a, b):
        define(hosts, lab, "qlk-one", disk, backend)
    assert a.virsh("start", "qlk-one", check=False).returncode == 0
    assert held(hosts, disk, backend) == {"host-a": "exclusive"}
    line = refused(b.virsh("start", "qlk-one", check=False))
    if backend != "lockd":  # virtlockd names the lease's hash only
        assert "guest 'qlk-one' on host 'host-a'" in line, line  # the domain lease's record
    assert held(hosts, disk, backend) == {"host-a": "exclusive"}
    assert b.virsh("domstate", "qlk-one").stdout.strip() == "shut off"
    assert stale_records(hosts, "host-b") == []  # the refused start left no record


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_domains_one_disk_across_hosts(
    hosts: TwoHosts, a_b: tuple[Lab, Lab], backend: str
) -> None:
    a, b = a_b
    disk = image(hosts, "shared.qcow2")
    define(hosts, a, "qlk-d1", disk, backend)
    define(hosts, b, "qlk-d2", disk, backend)
    assert a.virsh("start", "qlk-d1", check=False).returncode == 0
    line = refused(b.virsh("start", "qlk-d2", check=False))
    assert backend == "lockd" or f"{disk} is locked (exclusive) by" in line, line
    if backend == "lockspace":  # the lease record names the guest and its host
        assert "guest 'qlk-d1' on host 'host-a'" in line, line
    assert held(hosts, disk, backend) == {"host-a": "exclusive"}
    assert stale_records(hosts, "host-b") == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_live_migration_there_and_back(hosts: TwoHosts, a_b: tuple[Lab, Lab], backend: str) -> None:
    """virsh migrate --live --p2p between the two libvirtd: the guest keeps
    running, the locks follow it, a start on the host it left is refused."""
    a, b = a_b
    disk = image(hosts, "mig.qcow2")
    for lab in (a, b):
        define(hosts, lab, "qlk-mig", disk, backend)
    assert a.virsh("start", "qlk-mig", check=False).returncode == 0
    migrate(hosts, a, "host-b", "qlk-mig")
    assert b.virsh("domstate", "qlk-mig").stdout.strip() == "running"
    assert a.virsh("domstate", "qlk-mig").stdout.strip() == "shut off"
    settled(hosts, disk, backend, {"host-b": "exclusive"})
    line = refused(a.virsh("start", "qlk-mig", check=False))
    assert backend == "lockd" or "guest 'qlk-mig' on host 'host-b'" in line, line
    migrate(hosts, b, "host-a", "qlk-mig")
    assert a.virsh("domstate", "qlk-mig").stdout.strip() == "running"
    settled(hosts, disk, backend, {"host-a": "exclusive"})
    refused(b.virsh("start", "qlk-mig", check=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_migration_rolls_back(hosts: TwoHosts, a_b: tuple[Lab, Lab], backend: str) -> None:
    """The destination cannot listen (a privileged port for an unprivileged QEMU):
    the migration fails, the guest runs on where it was, nothing moved."""
    a, b = a_b
    disk = image(hosts, "fail.qcow2")
    for lab in (a, b):
        define(hosts, lab, "qlk-fail", disk, backend)
    assert a.virsh("start", "qlk-fail", check=False).returncode == 0
    r = a.virsh("migrate", "--live", "--p2p", "--unsafe", "qlk-fail", hosts.uri("host-b"),
                "tcp://127.0.0.1:1", check=False)  # fmt: skip
    assert r.returncode != 0, r
    assert a.virsh("domstate", "qlk-fail").stdout.strip() == "running"
    assert b.virsh("domstate", "qlk-fail").stdout.strip() == "shut off"
    assert held(hosts, disk, backend) == {"host-a": "exclusive"}
    if backend == "lockspace":
        assert stale_records(hosts, "host-b") == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_vm_its_libvirtd_forgot_still_holds(
    hosts: TwoHosts, a_b: tuple[Lab, Lab], backend: str
) -> None:
    """Host A's libvirtd stops while its VM runs: host B cannot start that VM; A's
    libvirtd, back, finds it running."""
    a, b = a_b
    disk = image(hosts, "forgot.qcow2")
    for lab in (a, b):
        define(hosts, lab, "qlk-forgot", disk, backend)
    assert a.virsh("start", "qlk-forgot", check=False).returncode == 0
    pidfile = "/run/qemu-locked-lab/libvirtd.pid"
    pid = a.run("cat", pidfile).stdout.strip()
    assert pid.isdigit() and a.run("kill", pid).returncode == 0
    deadline = time.monotonic() + 30
    while a.run("kill", "-0", pid).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        refused(b.virsh("start", "qlk-forgot", check=False))
        assert held(hosts, disk, backend) == {"host-a": "exclusive"}
    finally:
        r = a.run("taskset", "-c", "0", "libvirtd", "-d", "--listen", "-p", pidfile)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 30
        while a.virsh("list", check=False).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert a.virsh("domstate", "qlk-forgot").stdout.strip() == "running"


@pytest.mark.parametrize("backend", BACKENDS)
def test_managedsave_then_the_other_host(
    hosts: TwoHosts, a_b: tuple[Lab, Lab], backend: str
) -> None:
    """managedsave on A (its QEMU gone, the state saved on A): B may start the
    domain from its disk; A's restore of the saved state is then refused."""
    a, b = a_b
    disk = image(hosts, "saved.qcow2")
    for lab in (a, b):
        define(hosts, lab, "qlk-saved", disk, backend)
    assert a.virsh("start", "qlk-saved", check=False).returncode == 0
    assert a.virsh("managedsave", "qlk-saved", check=False).returncode == 0
    settled(hosts, disk, backend, {})
    assert b.virsh("start", "qlk-saved", check=False).returncode == 0
    assert held(hosts, disk, backend) == {"host-b": "exclusive"}
    refused(a.virsh("start", "qlk-saved", check=False))  # the restore
    assert held(hosts, disk, backend) == {"host-b": "exclusive"}
