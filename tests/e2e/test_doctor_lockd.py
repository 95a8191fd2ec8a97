"""doctor and `libvirt enable` against the real libvirtd with libvirt's own lock
manager: lock_manager = "lockd" with virtlockd's default (it locks byte 0 of each
disk itself) fails every start of a domain under qemu-locked's direct backend, so
doctor says FAIL and enable warns; with virtlockd's leases in a directory both work."""

from __future__ import annotations

import json

from e2e.lab import PREFIX, Lab, disk_xml, domain_xml
from e2e.test_libvirt import LOCKD, Configure, libvirt_conf  # noqa: F401  (the fixture)


def lockd_finding(lab: Lab) -> tuple[int, dict[str, str]]:
    r = lab.lockctl("doctor", "--json", check=False)
    findings = json.loads(r.stdout)["findings"]
    (f,) = [f for f in findings if f["check"] == "libvirt" and "lockd" in f["message"]]
    return r.returncode, f


def test_doctor_fails_and_enable_warns_while_lockd_takes_the_disks(
    lab: Lab,
    libvirt_conf: Configure,  # noqa: F811
) -> None:
    disk = lab.image("doctor-lockd.qcow2")
    a = lab.define(domain_xml(f"{PREFIX}dl1", [disk_xml(disk)]))  # under qemu-locked
    b = lab.define(domain_xml(f"{PREFIX}dl2", [disk_xml(disk, "vdb")]), locked=False)

    libvirt_conf(qemu=LOCKD)  # virtlockd's default: byte 0 of the disk itself
    assert lab.start(a, check=False).returncode != 0  # every start fails
    code, finding = lockd_finding(lab)
    assert code == 1 and finding["status"] == "FAIL" and a in finding["message"]
    assert "comment out lock_manager" in finding["fix"]
    # enable warns (a domain may still choose the lockspace backend, which works
    # beside lockd: test_virtlockd_side_by_side)
    enable = lab.lockctl("libvirt", "enable", b, check=False)
    assert enable.returncode == 0, enable.stderr
    assert enable.stderr.startswith("qemu-lockctl: warning: ") and "lockd" in enable.stderr
    code, finding = lockd_finding(lab)
    assert code == 1 and a in finding["message"] and b in finding["message"]

    (lab.images / "doctor-lockd-leases").mkdir(exist_ok=True)
    libvirt_conf(qemu=LOCKD, lockd=f'file_lockspace_dir = "{lab.images}/doctor-lockd-leases"')
    lab.start(a)
    assert lab.state(a) == "running"
    _code, finding = lockd_finding(lab)
    assert finding["status"] == "OK" and "indirect leases" in finding["message"]
    lab.destroy(a)
