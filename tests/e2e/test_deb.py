"""The Debian package against the real libvirtd, as a sysadmin would use it:
`make deb`, `apt install ./qemu-locked_*.deb`, `qemu-lockctl lockspace init`,
`qemu-lockctl libvirt enable VM`; the VM is protected; purge leaves nothing."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest

from e2e.lab import (
    APPARMOR_LOCAL,
    DEFAULT_LOCKSPACE,
    INSTALLED,
    PREFIX,
    Lab,
    disk_xml,
    domain_xml,
    lock_free,
    no_service_starts,
    run,
)

ROOTS = ("/etc", "/usr", "/var/lib", "/opt", "/run")
# Trees other parts of the host change meanwhile (dpkg's own database, libvirt's state).
# The lab's lockspace (/var/lib/qemu-locked) is checked apart: purge removes it.
NOT_OURS = ("/var/lib/dpkg", "/var/lib/apt", "/var/lib/libvirt", "/run/libvirt", "/var/lib/ucf",
            "/var/cache", "/run/qemu-locked-e2e", "/opt/qemu-locked-e2e", "/run/lock",
            "/var/lib/qemu-locked")  # fmt: skip
HEAVY = {"typer", "lxml", "portalocker", "json", "re", "dataclasses", "enum", "hashlib"}


def snapshot() -> set[str]:
    out: set[str] = set()
    for root in ROOTS:
        for top, dirs, files in os.walk(root):
            if top.startswith(NOT_OURS):
                dirs[:] = []
                continue
            out.update(os.path.join(top, n) for n in files + dirs if n != "__pycache__")
    return {p for p in out if not p.startswith(NOT_OURS) and "/__pycache__" not in p}


@pytest.fixture
def deb(deb_package: Path) -> Path:
    if INSTALLED:
        pytest.skip(
            "QLK_E2E_INSTALLED=1: the suite runs the installed package, which this test would purge"
        )
    installed = run(["dpkg-query", "-W", "-f=${Status}", "qemu-locked"], check=False).stdout
    if "install ok installed" in installed:
        pytest.fail(
            "qemu-locked is installed on this host already: this test installs and purges it"
        )
    return deb_package


def test_package_install_enable_protects_a_vm_and_purge_leaves_nothing(lab: Lab, deb: Path) -> None:
    had_lockspace = DEFAULT_LOCKSPACE.is_dir()  # the lab's (its other tests use it)
    before = snapshot()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
           "LANG": "C.UTF-8", "LIBVIRT_DEFAULT_URI": "qemu:///system"}  # fmt: skip
    try:
        with no_service_starts():
            run(["apt-get", "install", "-y", "-q", "--no-install-recommends", str(deb)],
                env=env, timeout=600)  # fmt: skip
        assert run(["head", "-1", "/usr/bin/qemu-locked"]).stdout == "#!/usr/bin/python3 -IS\n"
        assert run(["qemu-lockctl", "--version"], env=env).stdout.startswith("qemu-lockctl ")
        assert run(["man", "-w", "qemu-locked", "qemu-lockctl"], env=env).returncode == 0
        # bash completion as bash runs it (the script under test is bash itself)
        bash = run(["bash", "-c", "source /usr/share/bash-completion/completions/qemu-lockctl; "
                    "COMP_WORDS=(qemu-lockctl locks); COMP_CWORD=1; "
                    'compopt() { :; }; _qemu_lockctl_completion qemu-lockctl; echo "${COMPREPLY[@]}"'],
                   env=env)  # fmt: skip
        assert bash.stdout.split() == ["lockspace"], bash.stdout + bash.stderr
        run(["qemu-lockctl", "lockspace", "init"], env=env)
        st = DEFAULT_LOCKSPACE.stat()
        assert oct(st.st_mode & 0o7777) == "0o2770"

        # the start path of the installed launcher stays lean (run as libvirt libvirt-qemu)
        pw = pwd.getpwnam("libvirt-qemu")
        lean = subprocess.run(
            ["/usr/bin/python3", "-IS", "-X", "importtime", "/usr/bin/qemu-locked", "-name",
             "guest=qlk-lean"],
            env={"PATH": env["PATH"], "QEMU_LOCKED_EMULATOR": "/bin/true"}, cwd="/",
            user=pw.pw_uid, group=pw.pw_gid, extra_groups=os.getgrouplist(pw.pw_name, pw.pw_gid),
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert lean.returncode == 0, lean.stderr
        imported = {ln.rsplit("|", 1)[-1].strip() for ln in lean.stderr.splitlines() if "|" in ln}
        assert "qemu_locked.start.wrapper" in imported and not imported & HEAVY
        assert not {m for m in imported if m in ("site", "sitecustomize")}

        disk = lab.image("deb-disk.qcow2")
        first = lab.define(domain_xml(f"{PREFIX}deb1", [disk_xml(disk)]), locked=False)
        second = lab.define(domain_xml(f"{PREFIX}deb2", [disk_xml(disk)]), locked=False)
        for name in (first, second):
            r = run(["qemu-lockctl", "libvirt", "enable", name], env=env)
            assert "enabled (/usr/bin/qemu-locked" in r.stdout
        # libvirt's domain profiles include the package's AppArmor rules, by one
        # marked block in the admin's file (compiled and run for real: test_apparmor*)
        assert Path("/etc/apparmor.d/abstractions/qemu-locked").is_file()
        block = APPARMOR_LOCAL.read_text().split("# BEGIN qemu-locked", 1)[1]
        assert block.splitlines()[1:] == ["include if exists <abstractions/qemu-locked>",
                                          "# END qemu-locked"]  # fmt: skip
        assert "<emulator>/usr/bin/qemu-locked</emulator>" in lab.dumpxml(first)
        doctor = run(["qemu-lockctl", "doctor"], env=env, check=False)
        assert doctor.returncode == 0, doctor.stdout
        lab.start(first)
        assert not lock_free(disk, exclusive=False)
        refused = lab.start(second, check=False)
        assert refused.returncode != 0 and "qemu-locked: " in refused.stderr
        assert f"guest '{first}'" in refused.stderr
        lab.destroy(first)
        assert lock_free(disk)
        lab.cleanup()  # the domains go before the package
    finally:
        run(["dpkg", "--purge", "qemu-locked"], env=env, check=False, timeout=600)
    for gone in ("/usr/bin/qemu-locked", "/usr/bin/qemu-lockctl", "/etc/qemu-locked",
                 "/var/lib/qemu-locked", "/usr/share/man/man8/qemu-lockctl.8.gz"):  # fmt: skip
        assert not os.path.lexists(gone), gone
    after = snapshot()
    assert after == before, (sorted(after - before), sorted(before - after))
    assert "qemu-locked" not in APPARMOR_LOCAL.read_text()  # purge took the block out
    if had_lockspace:  # give the lab its lockspace back, as it made it
        run([lab.qemu_lockctl, "lockspace", "init", str(DEFAULT_LOCKSPACE)])
