#!/usr/bin/python3
"""qemu-locked under libvirt's AppArmor confinement, as a Debian 12 admin meets it.

Runs inside the aalab guest as /payload/run (tests/e2e/test_aalab_qemu_locked.py puts
it there with the .deb this tree builds).  Every step reports one JSON line; the host
asserts them.  Ubuntu's Yama default (ptrace_scope = 1) is the second half.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from guest import (
    IMAGES,
    Step,
    define,
    denials,
    label,
    mark,
    qemu_pid,
    sh,
    step,
    tiny_domain,
    virsh,
)

LOCAL = Path("/etc/apparmor.d/local/abstractions/libvirt-qemu")
SHARED, OWN, BARE = (str(IMAGES / f"ql-{n}.img") for n in ("shared", "own", "bare"))
VM_USER = "libvirt-qemu"


def lockctl(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-lockctl", *args]
    return sh(["runuser", "-u", user, "--", *argv] if user else argv)


def ours(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "qemu-locked: " in ln]


def comm_pids(name: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and (p / "comm").read_text().strip() == name:
                out.append(int(p.name))
        except OSError:
            pass
    return out


def refused_second_domain(s: Step) -> None:
    r = virsh("start", "aa2")
    s.check(r.returncode != 0, "aa2 started on aa1's disk")
    s.data["stderr"] = r.stderr.strip()
    line = next(iter(ours(r.stderr)), "")
    s.check("guest 'aa1'" in line and SHARED in line, f"not our line naming aa1: {r.stderr}")


def domain_log(name: str) -> str:
    return Path(f"/var/log/libvirt/qemu/{name}.log").read_text()


def refused_hotplug(s: Step) -> None:
    """Under the supervisor QEMU's open fails with EBUSY (what virsh shows) and
    our line naming the holder goes to the domain log at that moment; under the
    monitor guard our line is the QMP error itself."""
    before = len(domain_log("aa3"))
    r = virsh("attach-disk", "aa3", SHARED, "vdb", "--live")
    s.data["stderr"] = r.stderr.strip()
    s.data["log"] = "\n".join(ours(domain_log("aa3")[before:]))
    s.check(r.returncode != 0, "hot-plug of aa1's disk into aa3 succeeded")
    s.check("guest 'aa1'" in r.stderr + s.data["log"], f"the refusal does not name aa1: {r.stderr}")
    blk = virsh("domblklist", "aa3").stdout
    s.check(SHARED not in blk, f"aa3 has the disk anyway: {blk}")


def admin_views(s: Step, user: str | None) -> None:
    """status, check and doctor as an admin runs them (unconfined).  Root names
    aa1; the VM user may not read a confined QEMU's /proc entries, so it must
    at least see the disk held, never "no lock held"."""
    status = lockctl("status", SHARED, user=user)
    s.data["status"] = status.stdout.strip()
    named = "aa1" in status.stdout
    s.check(status.returncode == 0 and (named or (user and "hidden" in status.stdout)),
            status.stdout + status.stderr)  # fmt: skip
    Path("/tmp/aa2.xml").write_text(virsh("dumpxml", "aa2", check=True).stdout)
    os.chmod("/tmp/aa2.xml", 0o644)
    check = lockctl("check", "-d", "/tmp/aa2.xml", user=user)
    s.data["check"] = check.stdout.strip()
    s.check(check.returncode == 1 and SHARED in check.stdout, check.stdout + check.stderr)
    s.check(named <= ("guest 'aa1'" in check.stdout), "status named aa1 but check did not")
    doctor = lockctl("doctor", user=user)
    s.data["doctor"] = doctor.stdout.strip()
    s.check(doctor.returncode == 0, doctor.stdout + doctor.stderr)


with step("install") as s:
    r = sh(["dpkg", "-i", "/payload/qemu-locked.deb"])
    s.check(r.returncode == 0, r.stdout + r.stderr)
    for img in (SHARED, OWN, BARE):
        sh(["qemu-img", "create", "-q", "-f", "raw", img, "16M"], check=True)
    for name, disk in (("aa1", SHARED), ("aa2", SHARED), ("aa3", OWN)):
        define(name, tiny_domain(name, disk))
    # What an admin who only set <emulator> by hand meets: the package's rules
    # exist but libvirt's profiles do not include them yet.
    define("bare", tiny_domain("bare", BARE, emulator="/usr/bin/qemu-locked"))

with step("doctor-before") as s:
    r = lockctl("doctor")
    s.data["doctor"] = r.stdout.strip()
    fail = [ln for ln in r.stdout.splitlines() if ln.startswith("FAIL") and "apparmor" in ln]
    s.check(r.returncode != 0 and fail, "doctor did not FAIL on AppArmor:\n" + r.stdout)
    s.check("qemu-lockctl libvirt enable" in r.stdout, "doctor names no fix:\n" + r.stdout)

with step("denied-without-rules") as s:
    since = mark()
    r = virsh("start", "bare")
    s.data["stderr"] = r.stderr.strip()
    s.data["denied"] = denied = denials(since)
    s.check(r.returncode != 0 and "Permission denied" in r.stderr, r.stderr)
    s.check(any('operation="exec"' in d and "/usr/bin/qemu-locked" in d for d in denied),
            "no exec denial of the wrapper")  # fmt: skip

with step("enable") as s:
    r = lockctl("libvirt", "enable", "aa1", "aa2", "aa3")
    s.data["stdout"] = r.stdout.strip()
    s.check(r.returncode == 0, r.stdout + r.stderr)
    s.check(
        f"AppArmor: added qemu-locked's rules in {LOCAL} (a marked block)" in r.stdout, r.stdout
    )
    s.data["block"] = LOCAL.read_text()

with step("doctor-after") as s:
    r = lockctl("doctor")
    s.data["doctor"] = r.stdout.strip()
    s.check(r.returncode == 0, r.stdout + r.stderr)

SINCE = mark()  # from here on, not one denial

with step("start-aa1") as s:
    r = virsh("start", "aa1")
    s.check(r.returncode == 0, r.stderr)
    pid = qemu_pid("aa1")
    uuid = virsh("domuuid", "aa1", check=True).stdout.strip()
    s.data["label"] = label(pid)
    s.data["expected"] = f"libvirt-{uuid} (enforce)"
    s.data["exe"] = os.readlink(f"/proc/{pid}/exe")
    s.data["supervisors"] = {g: label(g) for g in comm_pids("ql-supervisor")}
    s.data["guards"] = comm_pids("ql-guard") + comm_pids("ql-keeper")  # none: one process beside
    s.check(s.data["label"] == s.data["expected"], "QEMU is not in its domain's profile")

with step("refused-aa2") as s:
    refused_second_domain(s)

with step("start-aa3") as s:
    r = virsh("start", "aa3")
    s.check(r.returncode == 0, r.stderr)

with step("refused-hotplug") as s:
    refused_hotplug(s)

with step("views-root", keep_going=True) as s:
    admin_views(s, None)

with step("views-vm-user", keep_going=True) as s:
    admin_views(s, VM_USER)

with step("yama-1") as s:
    Path("/proc/sys/kernel/yama/ptrace_scope").write_text("1\n")
    virsh("destroy", "aa3", check=True)
    r = virsh("start", "aa3")
    s.check(r.returncode == 0, r.stderr)
    s.data["ptrace_scope"] = Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip()

with step("refused-aa2-yama", keep_going=True) as s:
    refused_second_domain(s)

with step("refused-hotplug-yama", keep_going=True) as s:
    refused_hotplug(s)

with step("views-vm-user-yama", keep_going=True) as s:
    admin_views(s, VM_USER)

with step("denials", keep_going=True) as s:
    s.data["denied"] = denials(SINCE)

with step("blind-vms") as s:
    # The abstraction's own comment: drop the two ptrace lines to keep VMs blind
    # to each other.  The refusal must then say the policy hides the holder,
    # never "another host".
    ours_file = Path("/etc/apparmor.d/abstractions/qemu-locked")
    kept = ours_file.read_text()
    ours_file.write_text(
        "".join(
            ln
            for ln in kept.splitlines(True)
            if not (ln.lstrip().startswith("ptrace") and "peer=libvirt-*" in ln)
        )  # fmt: skip
    )
    since = mark()
    r = virsh("start", "aa2")
    s.data["stderr"] = r.stderr.strip()
    s.data["denied"] = denials(since)
    ours_file.write_text(kept)
    s.check(r.returncode != 0 and SHARED in r.stderr, r.stderr)
    s.check("another host" not in r.stderr, r.stderr)

with step("lockspace-backend", keep_going=True) as s:
    # The same story with backend = "lockspace": lease files for the disks too.
    since = mark()
    conf = Path("/etc/qemu-locked/qemu-locked.toml")
    conf.write_text(conf.read_text().replace('backend = "direct"', 'backend = "lockspace"'))
    virsh("destroy", "aa1", check=True)
    r = virsh("start", "aa1")
    s.check(r.returncode == 0, r.stderr)
    r = virsh("start", "aa2")
    s.data["stderr"] = r.stderr.strip()
    s.check(r.returncode != 0 and "guest 'aa1'" in r.stderr, r.stderr)
    s.data["leases"] = len(list(Path("/var/lib/qemu-locked/lockspace").glob("*.lease")))
    s.data["denied"] = denials(since)

with step("guard", keep_going=True) as s:
    # supervisor = false with the QMP guard (a kernel without seccomp user
    # notification): the guard's socket pair and fd passing inside the profile.
    since = mark()
    conf = Path("/etc/qemu-locked/qemu-locked.toml")
    text = conf.read_text().replace('backend = "lockspace"', 'backend = "direct"')
    text = text.replace("supervisor = true", "supervisor = false")
    conf.write_text(text.replace("monitor_guard = false", "monitor_guard = true"))
    virsh("destroy", "aa3", check=True)
    r = virsh("start", "aa3")
    s.check(r.returncode == 0, r.stderr)
    s.data["guards"] = {p: label(p) for p in comm_pids("ql-guard")}
    s.data["supervisors"] = comm_pids("ql-supervisor")
    r = virsh("attach-disk", "aa3", SHARED, "vdb", "--live")
    s.data["held"] = r.stderr.strip()
    s.check(r.returncode != 0, "aa1's disk was attached")
    sh(["qemu-img", "create", "-q", "-f", "raw", str(IMAGES / "ql-free.img"), "16M"], check=True)
    r = virsh("attach-disk", "aa3", str(IMAGES / "ql-free.img"), "vdc", "--live")
    s.data["free"] = r.stderr.strip()
    s.check(r.returncode == 0, r.stderr)
    s.data["denied"] = denials(since)

with step("disable-purge") as s:
    for name in ("aa1", "aa3"):
        virsh("destroy", name)
    virsh("undefine", "bare", check=True)  # set by hand, so not ours to disable
    r = lockctl("libvirt", "disable", "--all")
    s.data["stdout"] = r.stdout.strip()
    s.check(f"AppArmor: removed qemu-locked's rules from {LOCAL}" in r.stdout, r.stdout + r.stderr)
    sh(["dpkg", "--purge", "qemu-locked"], check=True)
    s.check("qemu-locked" not in LOCAL.read_text(), LOCAL.read_text())
    s.data["versions"] = re.findall(
        r"\S+", sh(["dpkg-query", "-W", "libvirt-daemon", "qemu-system-x86"]).stdout
    )
