"""doctor says FAIL (exit 1) on every set-up where a VM start fails, and each
test first proves that start really fails as the VM user (libvirt-qemu);
`libvirt enable` refuses what would make every start fail; refusals name a
local holder as local; every fix points at something that exists."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QEMU_LOCKCTL, QEMU_LOCKED, base_env

REPO = Path(__file__).resolve().parents[1]
VM_USER = "libvirt-qemu"
UUID = "16161616-1616-4616-8616-161616161616"


def _need_vm_user() -> None:
    try:
        pwd.getpwnam(VM_USER)
    except KeyError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no {VM_USER} user under CI=true (make apt-test installs libvirt)")
        pytest.skip(f"needs the {VM_USER} user (libvirt-daemon-system)")
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("these tests run as root under CI=true")
        pytest.skip("needs root (files owned by root, a start as the VM user)")


class Lab:
    """A directory the VM user can reach, with a config and a lockspace in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cfg = root / "qemu-locked.toml"
        self.lockspace = root / "lockspace"
        self.env = base_env(QEMU_LOCKED_CONFIG=str(self.cfg), QEMU_LOCKED_EMULATOR="/bin/true")

    def config(self, text: str = "", mode: int = 0o644) -> None:
        self.cfg.write_text(f'lockspace_dir = "{self.lockspace}"\n{text}')
        self.cfg.chmod(mode)

    def make_lockspace(self, mode: int = 0o2770, group: str = "kvm") -> None:
        self.lockspace.mkdir()
        shutil.chown(self.lockspace, "root", group)
        self.lockspace.chmod(mode)

    def image(self, name: str = "a.img") -> str:
        p = self.root / name
        p.write_bytes(b"\0" * 4096)
        shutil.chown(p, VM_USER)
        return str(p)

    def run(self, *argv: str, as_vm_user: bool = False) -> subprocess.CompletedProcess[str]:
        ids: dict[str, object] = {}
        if as_vm_user:
            pw = pwd.getpwnam(VM_USER)
            ids = {
                "user": pw.pw_uid,
                "group": pw.pw_gid,
                "extra_groups": os.getgrouplist(VM_USER, pw.pw_gid),
            }
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True,
                              timeout=120, check=False, **ids)  # type: ignore[call-overload]  # fmt: skip

    def start(self, *qemu_args: str) -> subprocess.CompletedProcess[str]:
        """A VM start as libvirt would make it: the launcher as the VM user (/bin/true as QEMU)."""
        return self.run(QEMU_LOCKED, *qemu_args, as_vm_user=True)

    def doctor(self, *extra: str) -> tuple[int, list[dict[str, str]]]:
        r = self.run(QEMU_LOCKCTL, "doctor", "--json", "--path", str(self.root), *extra)
        return r.returncode, json.loads(r.stdout)["findings"]


@pytest.fixture
def lab() -> Iterator[Lab]:
    _need_vm_user()
    root = Path(tempfile.mkdtemp(prefix="qemu-locked-doctor-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield Lab(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def failed(findings: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {f["check"]: f for f in findings if f["status"] == "FAIL"}


def test_a_good_set_up_starts_and_doctor_passes(lab: Lab) -> None:
    lab.make_lockspace()
    lab.config()
    r = lab.start("-name", "guest=a", "-uuid", UUID, "-drive", f"file={lab.image()}")
    assert r.returncode == 0, r.stderr
    code, findings = lab.doctor()
    assert code == 0, failed(findings)
    probe = next(f for f in findings if f["check"] == f"start as {VM_USER}")
    assert probe["status"] == "OK"
    # the probe leaves no lease behind (the start above left one)
    assert len(list(lab.lockspace.iterdir())) == 1


def test_config_unreadable_by_the_vm_user(lab: Lab) -> None:
    lab.make_lockspace()
    lab.config(mode=0o600)
    r = lab.start("-drive", f"file={lab.image()}")
    assert r.returncode == 2 and "cannot read: Permission denied" in r.stderr
    code, findings = lab.doctor()
    bad = failed(findings)
    assert code == 1 and set(bad) >= {"config", f"start as {VM_USER}"}
    assert bad["config"]["fix"] == f"chmod 644 {lab.cfg}"
    lab.cfg.chmod(0o644)  # the fix works
    assert lab.doctor()[0] == 0


def test_lockspace_0700_with_the_default_backend(lab: Lab) -> None:
    lab.make_lockspace(mode=0o700, group="root")
    lab.config()  # backend direct: domain leases live in lockspace_dir
    r = lab.start("-name", "guest=a", "-uuid", UUID, "-drive", f"file={lab.image()}")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    code, findings = lab.doctor()
    bad = failed(findings)
    assert code == 1 and set(bad) >= {"lockspace", f"start as {VM_USER}"}
    assert bad["lockspace"]["fix"] == "qemu-lockctl lockspace init"
    assert lab.run(QEMU_LOCKCTL, "lockspace", "init", str(lab.lockspace)).returncode == 0
    assert lab.doctor()[0] == 0


_BIND_THEN_EXEC = (
    "import os, subprocess, sys\n"
    "for spec in sys.argv[1:sys.argv.index('--')]:\n"
    "    src, dst = spec.split('=', 1)\n"
    "    subprocess.run(['mount', '--bind', src, dst], check=True)\n"
    "args = sys.argv[sys.argv.index('--') + 1:]\n"
    "os.execv(args[0], args)\n"
)


def test_lockd_with_a_domain_under_qemu_locked(lab: Lab) -> None:
    """lock_manager = "lockd" (libvirt's virtlockd, direct disk leases): virtlockd
    holds byte 0 of each disk before QEMU starts.  doctor reads a qemu.conf and
    domain directory of our own, bound over /etc/libvirt in a private mount
    namespace, so the host's libvirt set-up is never touched."""
    if not shutil.which("unshare"):
        pytest.fail("unshare (util-linux) missing")
    lab.make_lockspace()
    lab.config()
    img = lab.image()
    # What virtlockd does: a POSIX write lock on byte 0, taken before QEMU runs.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0); print('ready', flush=True); "
         "sys.stdin.read()", img],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        assert lab.start("-drive", f"file={img}").returncode == 3
    finally:
        holder.communicate("")
    conf = lab.root / "qemu.conf"
    conf.write_text('lock_manager = "lockd"\n')
    domains = lab.root / "domains"
    domains.mkdir()
    (domains / "vm1.xml").write_text(
        f"<domain type='kvm'><name>vm1</name><uuid>{UUID}</uuid>"
        f"<devices><emulator>{QEMU_LOCKED}</emulator></devices></domain>\n"
    )
    binds = [f"{conf}=/etc/libvirt/qemu.conf", f"{domains}=/etc/libvirt/qemu"]
    if not Path("/etc/libvirt/qemu").is_dir():
        pytest.fail("/etc/libvirt/qemu missing: libvirt-daemon-system is not installed")
    r = lab.run("unshare", "-m", "--propagation", "private", "--", sys.executable, "-c",
                _BIND_THEN_EXEC, *binds, "--", QEMU_LOCKCTL, "doctor", "--json")  # fmt: skip
    bad = failed(json.loads(r.stdout)["findings"])
    assert r.returncode == 1 and "libvirt" in bad, r.stdout + r.stderr
    assert (
        'lock_manager = "lockd"' in bad["libvirt"]["message"] and "vm1" in bad["libvirt"]["message"]
    )
    # enable says so (a warning: the fix is libvirt's configuration); vm1 is not
    # defined here, so virsh then fails
    enable = lab.run("unshare", "-m", "--propagation", "private", "--", sys.executable, "-c",
                     _BIND_THEN_EXEC, *binds, "--", QEMU_LOCKCTL, "libvirt", "enable", "vm1")  # fmt: skip
    (warning,) = [ln for ln in enable.stderr.splitlines() if "warning" in ln]
    assert warning.startswith("qemu-lockctl: warning: ") and 'lock_manager = "lockd"' in warning
    assert "comment out lock_manager" in warning
    # a domain that chose the lockspace backend fails the same way: that backend
    # takes each image's byte 0 too (one inode, one lock), where virtlockd is first
    (domains / "vm1.xml").write_text(
        f"<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
        f"<name>vm1</name><uuid>{UUID}</uuid><devices><emulator>{QEMU_LOCKED}</emulator>"
        "</devices><qemu:commandline><qemu:env name='QEMU_LOCKED_BACKEND' value='lockspace'/>"
        "</qemu:commandline></domain>\n"
    )
    r = lab.run("unshare", "-m", "--propagation", "private", "--", sys.executable, "-c",
                _BIND_THEN_EXEC, *binds, "--", QEMU_LOCKCTL, "doctor", "--json")  # fmt: skip
    assert "vm1" in failed(json.loads(r.stdout)["findings"])["libvirt"]["message"], r.stdout


def test_enable_refuses_a_launcher_the_vm_user_cannot_run(lab: Lab) -> None:
    private = lab.root / "private"
    private.mkdir(mode=0o700)
    launcher = private / "qemu-locked"
    shutil.copy(QEMU_LOCKED, launcher)
    with pytest.raises(PermissionError):  # what libvirt meets at every start
        lab.run(str(launcher), "-version", as_vm_user=True)
    node = lab.root / "node.xml"  # libvirt's test driver: no daemon, nothing on the host
    node.write_text(
        f"<node><domain type='test'><name>vm1</name><uuid>{UUID}</uuid><memory>65536</memory>"
        "<os><type>hvm</type></os><devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
        "</devices></domain></node>"
    )
    r = lab.run(QEMU_LOCKCTL, "libvirt", "enable", "--emulator", str(launcher),
                "-c", f"test://{node}", "vm1")  # fmt: skip
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and f"{private} is not searchable (x) by {VM_USER}" in r.stderr


def test_doctor_fails_a_launcher_the_vm_user_cannot_run_and_fixes_name_real_things(
    lab: Lab,
) -> None:
    private = lab.root / "private"
    private.mkdir(mode=0o700)
    shutil.copy(QEMU_LOCKED, private / "qemu-locked")
    lab.env["PATH"] = f"{private}:{lab.env['PATH']}"
    lab.make_lockspace()
    lab.config()
    code, findings = lab.doctor()
    bad = failed(findings)
    assert code == 1 and set(bad) >= {"launcher", f"start as {VM_USER}"}
    for f in findings:
        fix = f["fix"]
        assert "DESIGN.md" not in fix and "§" not in fix
        for doc in re.findall(r"\b(README\.md|docs/[\w.-]+\.md)", fix):
            assert (REPO / doc).exists(), (doc, fix)
        for word in re.findall(r"qemu-lockctl ([a-z]+(?: [a-z]+)?)", fix):
            assert lab.run(QEMU_LOCKCTL, *word.split(), "--help").returncode == 0, fix


def test_a_refusal_calls_a_local_holder_local(lab: Lab) -> None:
    """root holds the disk through `qemu-lockctl run`; the VM user cannot read
    root's /proc entries, but /proc/locks shows the lock is on this host."""
    lab.config("domain_lease = false\n")
    img = lab.image()
    holder = subprocess.Popen(
        [QEMU_LOCKCTL, "run", "--disk", img, "--", sys.executable, "-c",
         "import sys; print('ready', flush=True); sys.stdin.read()"],
        env=lab.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        r = lab.start("-drive", f"file={img}")
        assert r.returncode == 3
        assert "by a local process" in r.stderr and "another host" not in r.stderr
        # root names it
        check = lab.run(QEMU_LOCKCTL, "check", "--", "-drive", f"file={img}")
        assert check.returncode == 1 and f"pid {holder.pid}" in check.stdout
    finally:
        holder.communicate("")


def test_version_and_man_pages() -> None:
    from qemu_locked import __version__

    r = subprocess.run([QEMU_LOCKCTL, "--version"], capture_output=True, text=True, check=False)
    assert (r.returncode, r.stdout) == (0, f"qemu-lockctl {__version__}\n")
    for page, must in (("qemu-lockctl", [".SS lockspace gc", ".SS libvirt enable", "\\-\\-json"]),
                       ("qemu-locked", ["\\fBlockspace_dir\\fR", ".SH EXIT STATUS"])):  # fmt: skip
        man = subprocess.run([sys.executable, "-m", "qemu_locked.admin.manpage", page],
                             capture_output=True, text=True, check=False)  # fmt: skip
        assert man.returncode == 0 and man.stdout.startswith(f".TH {page.upper()} ")
        for text in must:
            assert text in man.stdout, text
        if shutil.which("groff"):
            out = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=man.stdout,
                                 capture_output=True, text=True, check=False)  # fmt: skip
            assert out.returncode == 0 and out.stderr == "", out.stderr


def test_doctor_warns_a_launcher_pip_rewrote_without_its_flags(lab: Lab) -> None:
    bindir = lab.root / "bin"
    bindir.mkdir()
    first, rest = Path(QEMU_LOCKED).read_text().split("\n", 1)
    assert first.endswith(" -IS")
    (bindir / "qemu-locked").write_text(first.removesuffix(" -IS") + "\n" + rest)
    (bindir / "qemu-locked").chmod(0o755)
    lab.env["PATH"] = f"{bindir}:{lab.env['PATH']}"
    lab.make_lockspace()
    lab.config()
    code, findings = lab.doctor()
    (warn,) = [f for f in findings if f["check"] == "launcher" and f["status"] == "WARN"]
    assert code == 0 and "without -IS" in warn["message"]
    assert warn["fix"].endswith(" -m qemu_locked.start.launcher")
