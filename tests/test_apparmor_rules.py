"""The AppArmor rules: compiled with apparmor_parser against Debian's own
abstractions (libvirt's domain profile template, as virt-aa-helper fills it),
the marked block `libvirt enable` keeps in the admin's file, and doctor's
verdict on it.  Run for real under an enforcing kernel: tests/e2e/test_aalab*.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import skip_unless_ci

from qemu_locked.admin import apparmor
from qemu_locked.admin.doctor_confinement import check_apparmor
from qemu_locked.model.config import Config
from qemu_locked.model.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "confinement" / "apparmor" / "qemu-locked"
DEBIAN = Path("/etc/apparmor.d")
UUID = "6f1c0b9e-0000-4000-8000-00000000a001"
ADMIN = "# the admin's own line, kept as it is\n  /srv/isos/** r,\n"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A copy of Debian's /etc/apparmor.d with our abstraction where the .deb puts it."""
    parser = shutil.which("apparmor_parser")
    if parser is None or not (DEBIAN / apparmor.LIBVIRT_ABSTRACTION).is_file():
        skip_unless_ci("apparmor_parser and libvirt's AppArmor abstractions (apt: apparmor, "
                       "libvirt-daemon-system)")  # fmt: skip
    top = tmp_path / "apparmor.d"
    shutil.copytree(DEBIAN, top, symlinks=True)
    shutil.copy(SHIPPED, top / apparmor.OURS)
    (top / apparmor.LOCAL).write_text(ADMIN)
    return top


def domain_profile(root: Path, *, preprocess: bool = False) -> subprocess.CompletedProcess[str]:
    """libvirt's TEMPLATE.qemu as virt-aa-helper names it, compiled (-Q: not loaded)."""
    template = (root / "libvirt" / "TEMPLATE.qemu").read_text()
    profile = root.parent / f"libvirt-{UUID}"
    profile.write_text(template.replace("LIBVIRT_TEMPLATE", f"libvirt-{UUID}"))
    mode = ["-p"] if preprocess else ["-Q", "-K"]
    return subprocess.run(
        ["apparmor_parser", *mode, "--base", str(root), "-I", str(root), str(profile)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def rules(root: Path) -> list[str]:
    out = domain_profile(root, preprocess=True)
    assert out.returncode == 0, out.stderr
    return [ln.strip() for ln in out.stdout.splitlines()]


def test_the_shipped_rules_compile_into_libvirts_domain_profile(root: Path) -> None:
    assert "/usr/bin/qemu-locked rix," not in rules(root)  # before: libvirt's alone
    done = apparmor.install(Config(), "/usr/bin/qemu-locked", str(root))
    assert (
        done == f"AppArmor: added qemu-locked's rules in {root / apparmor.LOCAL} (a marked block)"
    )
    compiled = domain_profile(root)
    assert compiled.returncode == 0, compiled.stderr
    have = rules(root)
    for need in ("/usr/bin/qemu-locked rix,", "/var/lib/qemu-locked/lockspace/[0-9a-f]*.lease rwk,",
                 "@{PROC}/locks r,", "ptrace (read) peer=libvirt-*,"):  # fmt: skip
        assert need in have, need
    assert "/srv/isos/** r," in have  # the admin's line still there


def test_a_broken_rule_fails_the_compile(root: Path) -> None:
    """The compile check can fail: a rule the parser rejects is caught."""
    apparmor.install(Config(), "/usr/bin/qemu-locked", str(root))
    with (root / apparmor.OURS).open("a") as f:
        f.write("  /no/permission/here,\n")
    assert domain_profile(root).returncode != 0


def test_a_host_s_own_settings_get_their_own_lines_and_compile(root: Path, tmp_path: Path) -> None:
    lockspace = tmp_path / "shared leases"
    lockspace.mkdir()
    cfg = Config(lockspace_dir=str(lockspace), backend="sanlock")
    apparmor.install(cfg, "/opt/qemu-locked/bin/qemu-locked", str(root))
    assert domain_profile(root).returncode == 0, domain_profile(root).stderr
    have = rules(root)
    assert '"/opt/qemu-locked/bin/qemu-locked" rix,' in have
    assert f'"{lockspace}/[0-9a-f]*.lease" rwk,' in have
    assert "/run/sanlock/sanlock.sock rw," in have


def test_install_is_idempotent_refreshes_and_uninstall_gives_the_file_back(root: Path) -> None:
    local = root / apparmor.LOCAL
    local.chmod(0o640)
    assert apparmor.install(Config(), "/usr/bin/qemu-locked", str(root)) is not None
    assert apparmor.install(Config(), "/usr/bin/qemu-locked", str(root)) is None
    once = local.read_text()
    moved = Config(lockspace_dir="/srv/leases")
    assert "refreshed" in (apparmor.install(moved, "/usr/bin/qemu-locked", str(root)) or "")
    text = local.read_text()
    assert text.count(apparmor.BEGIN) == 1 and '"/srv/leases/" r,' in text and text != once
    assert text.startswith(ADMIN)
    assert apparmor.uninstall(str(root)) == f"AppArmor: removed qemu-locked's rules from {local}"
    assert local.read_text() == ADMIN
    assert local.stat().st_mode & 0o777 == 0o640
    assert apparmor.uninstall(str(root)) is None


def test_no_libvirt_profiles_no_change(tmp_path: Path) -> None:
    assert apparmor.install(Config(), "/usr/bin/qemu-locked", str(tmp_path)) is None
    assert list(tmp_path.iterdir()) == []


def test_a_path_a_rule_cannot_state_is_refused(root: Path) -> None:
    with pytest.raises(UsageError, match="cannot state plainly"):
        apparmor.install(Config(lockspace_dir="/srv/le*ses"), "/usr/bin/qemu-locked", str(root))
    assert (root / apparmor.LOCAL).read_text() == ADMIN


def test_doctor_fails_before_the_rules_and_passes_after(root: Path) -> None:
    cfg, launcher = Config(), "/usr/bin/qemu-locked"
    before = check_apparmor(cfg, launcher, str(root), active=True)
    assert before.status == "FAIL", before
    assert "denies every start through /usr/bin/qemu-locked" in before.message
    assert before.fix.startswith("qemu-lockctl libvirt enable DOMAIN")
    apparmor.install(cfg, launcher, str(root))
    after = check_apparmor(cfg, launcher, str(root), active=True)
    assert after.status == "OK", after
    stale = check_apparmor(Config(lockspace_dir="/srv/leases"), launcher, str(root), active=True)
    assert stale.status == "FAIL" and "do not match this host's settings" in stale.message
    (root / apparmor.OURS).unlink()
    gone = check_apparmor(cfg, launcher, str(root), active=True)
    assert gone.status == "FAIL" and "is missing" in gone.message and "apt install" in gone.fix
    off = check_apparmor(cfg, launcher, str(root), active=False)
    assert off.status == "OK" and "not active" in off.message


def test_doctor_reads_selinux_mode_and_the_launchers_label(tmp_path: Path, monkeypatch) -> None:
    """This kernel has no SELinux: its mode file is a stand-in, the label is a
    real security.selinux attribute on a real file (root may set it)."""
    from qemu_locked.admin import doctor_confinement

    launcher = tmp_path / "qemu-locked"
    launcher.write_text("#!/usr/bin/python3 -IS\n")
    enforce = tmp_path / "enforce"
    monkeypatch.setattr(doctor_confinement, "SYS_SELINUX", str(enforce))
    assert doctor_confinement.check_selinux(str(launcher)) is None  # no SELinux: nothing said
    enforce.write_text("1")
    unlabeled = doctor_confinement.check_selinux(str(launcher))
    assert unlabeled is not None and unlabeled.status == "FAIL", unlabeled
    assert "semodule -i qemu_locked.pp" in unlabeled.fix
    enforce.write_text("0")
    assert doctor_confinement.check_selinux(str(launcher)).status == "WARN"  # type: ignore[union-attr]
    os.setxattr(launcher, "security.selinux", b"system_u:object_r:qemu_locked_exec_t:s0\0")
    labelled = doctor_confinement.check_selinux(str(launcher))
    assert labelled is not None and labelled.status == "OK", labelled
