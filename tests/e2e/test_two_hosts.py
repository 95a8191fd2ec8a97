"""Two real libvirt 11.3 hosts sharing storage (issue 22): tests/e2e/lab11/hosts.py.

Each host has its own namespaces, libvirtd, hostname and host UUID; the images and
the lockspace are shared, and the two libvirtd reach each other over TCP in a
network namespace of their own.  Every domain runs qemu-locked (the supervisor on,
the default).  After every step the lock state is read on the machine itself:
`qemu-lockctl status --json` (which host's QEMU holds what) and /proc/locks
(never two writers).  Under CI=true it must run.
"""

from __future__ import annotations

import pytest

from e2e.lab11.harness import Lab
from e2e.lab11.hosts import BLOCK_DISK, TwoHosts
from e2e.lab11.scenario import (
    BACKENDS,
    define,
    held,
    image,
    migrate,
    names_holder,
    refused,
    rolled_back,
    settled,
    stale_records,
    start_libvirtd,
    stop_libvirtd,
)  # fmt: skip

pytestmark = [pytest.mark.libvirt, pytest.mark.qemu, pytest.mark.root]


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
    names_holder(refused(b.virsh("start", "qlk-one", check=False)), "qlk-one", "host-a", backend)
    assert held(hosts, disk, backend) == {"host-a": "exclusive"}
    assert b.virsh("domstate", "qlk-one").stdout.strip() == "shut off"
    assert stale_records(hosts, "host-b", "qlk-one") == []  # the refused start left none


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
    assert backend == "lockd" or f"cannot write {disk}: in use (writing) by" in line, line
    if backend in ("lockspace", "sanlock"):  # the lease names the holder
        names_holder(line, "qlk-d1", "host-a", backend)
    assert held(hosts, disk, backend) == {"host-a": "exclusive"}
    assert stale_records(hosts, "host-b", "qlk-d2") == []


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
    names_holder(refused(a.virsh("start", "qlk-mig", check=False)), "qlk-mig", "host-b", backend)
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
    rolled_back(hosts, "qlk-fail", disk, backend)


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
    stop_libvirtd(a)
    try:
        refused(b.virsh("start", "qlk-forgot", check=False))
        assert held(hosts, disk, backend) == {"host-a": "exclusive"}
    finally:
        start_libvirtd(a)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_block_device_across_hosts(hosts: TwoHosts, a_b: tuple[Lab, Lab], backend: str) -> None:
    """One LUN (a loop device, a node in each host's /dev: two inodes, one disk):
    a domain on A writes it, a domain on B is refused, and may start once A's is gone."""
    a, b = a_b
    define(hosts, a, "qlk-blk1", BLOCK_DISK, backend)
    define(hosts, b, "qlk-blk2", BLOCK_DISK, backend)
    assert a.virsh("start", "qlk-blk1", check=False).returncode == 0
    assert held(hosts, BLOCK_DISK, backend) == {"host-a": "exclusive"}
    line = refused(b.virsh("start", "qlk-blk2", check=False))
    if backend != "lockd":
        assert f"cannot write {BLOCK_DISK}: in use (writing) by" in line, line
        assert "host-a" in line, line
    assert held(hosts, BLOCK_DISK, backend) == {"host-a": "exclusive"}
    a.virsh("destroy", "qlk-blk1")
    settled(hosts, BLOCK_DISK, backend, {})
    assert b.virsh("start", "qlk-blk2", check=False).returncode == 0
    assert held(hosts, BLOCK_DISK, backend) == {"host-b": "exclusive"}
