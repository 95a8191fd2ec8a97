"""The e2e lab: Debian packages, a libvirtd of our own, qemu-locked installed
where libvirt-qemu can run it, images and test domains.

Rules it keeps (../shared/reference/libvirt-notes.md, DESIGN.md section 7):
- install only what is missing; start virtlogd / libvirtd / virtlockd only when
  none is running, and stop only what it started, by pid;
- libvirtd runs under ``tini -s`` (a subreaper, so a killed QEMU is reaped at
  once) pinned to CPU 0 (no "host cpuid changed" re-probes on restart);
- /dev/kvm gets the 0660 root:kvm udev would give it (else every start re-probes);
- qemu.conf is changed only inside a marked block, and restored byte for byte.

No shell anywhere: every command is an argument list.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

REPO = Path(__file__).resolve().parents[2]
APT_PKGS = (
    "qemu-system-x86",
    "qemu-utils",
    "libvirt-daemon-system",
    "libvirt-clients",
    "tini",
    "procps",
)
URI = "qemu:///system"
PREFIX = "qlk-"  # every test domain's name starts with this (leftovers are removed by it)
VENV = Path("/opt/qemu-locked-e2e")  # world-readable: libvirt-qemu runs qemu-locked from here
# QLK_E2E_INSTALLED=1: the suite runs the installed package (/usr/bin, e.g. the .deb)
# instead of a venv made from this tree; VENV then only holds the argv logger.
INSTALLED = os.environ.get("QLK_E2E_INSTALLED") == "1"
QEMU_LOCKED = Path("/usr/bin/qemu-locked") if INSTALLED else VENV / "bin" / "qemu-locked"
QEMU_LOCKCTL = Path("/usr/bin/qemu-lockctl") if INSTALLED else VENV / "bin" / "qemu-lockctl"
ARGV_LOGGER = VENV / "bin" / "qemu-argv-logger"
ARGV_DIR = VENV / "argv"  # where the logger writes, owned by libvirt-qemu
REAL_QEMU = "/usr/bin/qemu-system-x86_64"
STATE = Path("/run/qemu-locked-e2e")  # our pidfiles and daemon logs
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
LOCKD_CONF = Path("/etc/libvirt/qemu-lockd.conf")
MARK_BEGIN = "# >>> qemu-locked e2e: temporary, removed by tests/e2e (do not edit)"
MARK_END = "# <<< qemu-locked e2e"
LIBVIRT_SOCK = Path("/run/libvirt/libvirt-sock")
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
QEMU_USER = "libvirt-qemu"


class LabUnavailable(Exception):
    """The lab cannot be built here (the reason is the message)."""


def log(msg: str) -> None:
    sys.stderr.write(f"[e2e] {msg}\n")


def run(
    cmd: list[str], *, check: bool = True, timeout: float = 300, **kw: object
) -> subprocess.CompletedProcess[str]:
    proc: subprocess.CompletedProcess[str] = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw
    )  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def wait_for(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


# -- packages -------------------------------------------------------------------


def missing_packages(pkgs: tuple[str, ...]) -> list[str]:
    out = []
    for p in pkgs:
        proc = run(["dpkg-query", "-W", "-f=${Status}", p], check=False)
        if "install ok installed" not in proc.stdout:
            out.append(p)
    return out


@contextlib.contextmanager
def no_service_starts() -> Iterator[None]:
    """A policy-rc.d saying no, so a package's postinst starts no daemon of its own."""
    policy = Path("/usr/sbin/policy-rc.d")
    if policy.exists():
        yield
        return
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink()


def apt_install(pkgs: tuple[str, ...]) -> None:
    missing = missing_packages(pkgs)
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise LabUnavailable(f"packages missing and cannot install them: {' '.join(missing)}")
    log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    with no_service_starts():
        if run(cmd, check=False, env=env, timeout=900).returncode != 0:
            run(["apt-get", "update", "-q"], env=env, timeout=900)
            run(cmd, env=env, timeout=900)


# -- host set-up ----------------------------------------------------------------


def fix_kvm() -> None:
    """/dev/kvm as udev leaves it: root:kvm 0660 (else libvirt re-probes QEMU on every start)."""
    kvm = Path("/dev/kvm")
    if not kvm.exists():
        return
    try:
        gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        return
    st = kvm.stat()
    if st.st_gid != gid:
        os.chown(kvm, -1, gid)
    if stat.S_IMODE(st.st_mode) != 0o660:
        kvm.chmod(0o660)


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def reachable_by_others(path: Path) -> bool:
    """Can an unprivileged user (libvirt-qemu) traverse to ``path`` and read it?"""
    p = path.resolve()
    for parent in [*reversed(p.parents)]:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
    mode = os.stat(p).st_mode
    need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(mode) else 0)
    return mode & need == need


# -- processes ------------------------------------------------------------------


def pids_named(comm: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == comm and alive(int(entry)):
                    out.append(int(entry))
        except OSError:
            continue
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def read_pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def stop_pid(pid: int, timeout: float = 15) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        wait_for(lambda: not alive(pid), timeout, f"pid {pid} to exit")
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Daemons:
    """The daemons this session started (and so may stop), by pid."""

    started: dict[str, int] = field(default_factory=dict)
    libvirtd_proc: subprocess.Popen[bytes] | None = None
    libvirtd_foreign: bool = False

    def ensure_virtlogd(self) -> None:
        self._ensure_simple("virtlogd")

    def ensure_virtlockd(self) -> None:
        self._ensure_simple("virtlockd")

    def _ensure_simple(self, name: str) -> None:
        if pids_named(name):
            return
        pidfile = STATE / f"{name}.pid"
        pidfile.unlink(missing_ok=True)
        run([name, "-d", "-p", str(pidfile)], timeout=30)
        wait_for(lambda: read_pidfile(pidfile) is not None, 10, f"{name} pidfile")
        pid = read_pidfile(pidfile)
        assert pid is not None
        self.started[name] = pid
        log(f"started {name} (pid {pid})")

    def stop(self, name: str) -> None:
        pid = self.started.pop(name, None)
        if pid is not None:
            stop_pid(pid)
            log(f"stopped {name} (pid {pid})")

    def ensure_libvirtd(self) -> None:
        if pids_named("libvirtd"):
            self.libvirtd_foreign = "libvirtd" not in self.started
        else:
            pidfile = STATE / "libvirtd.pid"
            pidfile.unlink(missing_ok=True)
            logf = open(STATE / "libvirtd.log", "ab")  # handed to the child
            cmd = ["taskset", "-c", "0", "tini", "-s", "--", "libvirtd", "-p", str(pidfile)]
            self.libvirtd_proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True
            )
            logf.close()
            wait_for(lambda: read_pidfile(pidfile) is not None, 30, "libvirtd pidfile")
            pid = read_pidfile(pidfile)
            assert pid is not None
            self.started["libvirtd"] = pid
            log(f"started libvirtd (pid {pid}, under tini pid {self.libvirtd_proc.pid})")
        wait_for(
            lambda: run(["virsh", "-c", URI, "uri"], check=False, timeout=30).returncode == 0,
            60,
            "libvirtd to answer",
            step=0.1,
        )

    def stop_libvirtd(self) -> None:
        pid = self.started.pop("libvirtd", None)
        if pid is None:
            return
        stop_pid(pid, timeout=30)
        if self.libvirtd_proc is not None:
            try:
                self.libvirtd_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.libvirtd_proc.kill()
                self.libvirtd_proc.wait(10)
            self.libvirtd_proc = None
        log(f"stopped libvirtd (pid {pid})")

    def restart_libvirtd(self) -> None:
        if "libvirtd" not in self.started:
            raise LabUnavailable("libvirtd was not started by this harness: cannot restart it")
        self.stop_libvirtd()
        self.ensure_libvirtd()

    def stop_all(self) -> None:
        self.stop_libvirtd()
        for name in list(self.started):
            self.stop(name)


# -- qemu.conf ------------------------------------------------------------------


def strip_marked_block(text: str) -> str:
    lines = text.splitlines(keepends=True)
    out, inside = [], False
    for line in lines:
        if line.rstrip("\n") == MARK_BEGIN:
            inside = True
            continue
        if inside and line.rstrip("\n") == MARK_END:
            inside = False
            continue
        if not inside:
            out.append(line)
    return "".join(out)


def write_conf_block(conf: Path, body: str) -> bytes:
    """Append our marked block to a libvirt config file; returns the original bytes
    for restore_conf."""
    original = conf.read_bytes() if conf.exists() else b""
    text = original.decode()
    if text and not text.endswith("\n"):
        text += "\n"
    conf.write_text(f"{text}{MARK_BEGIN}\n{body.rstrip()}\n{MARK_END}\n")
    return original


def restore_conf(conf: Path, original: bytes) -> None:
    conf.write_bytes(original)


def clean_stale_conf() -> None:
    """Blocks left by a run that was killed: remove them (before libvirtd starts)."""
    for conf in (QEMU_CONF, LOCKD_CONF):
        if conf.exists() and MARK_BEGIN in (text := conf.read_text()):
            log(f"removing a stale qemu-locked e2e block from {conf}")
            conf.write_text(strip_marked_block(text))


# -- qemu-locked, installed for libvirt-qemu ---------------------------------------


def source_digest() -> str:
    h = hashlib.sha256()
    files = [REPO / "pyproject.toml"] + sorted(
        p for p in (REPO / "qemu_locked").rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    for p in files:
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(ARGV_LOGGER_SOURCE.encode())
    return h.hexdigest()


ARGV_LOGGER_SOURCE = '''#!/usr/bin/python3 -I
"""qemu-argv-logger (installed by tests/e2e): record the argv libvirt gave the
emulator, as JSON, in {argv_dir}/GUEST.json, then exec the real QEMU unchanged."""
import json
import os
import sys

REAL = {real!r}
OUT = {argv_dir!r}

args = sys.argv[1:]
guest = None
for i, a in enumerate(args[:-1]):
    if a == "-name":
        guest = args[i + 1].split(",")[0].removeprefix("guest=")
if guest and "/" not in guest:
    record = {{"argv": args, "env": {{k: v for k, v in os.environ.items()
                                       if k.startswith("QEMU_LOCKED_")}}}}
    tmp = os.path.join(OUT, ".%s.%d" % (guest, os.getpid()))
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(OUT, guest + ".json"))
os.execv(REAL, [REAL] + args)
'''


def install_qemu_locked() -> None:
    """A venv from Debian's /usr/bin/python3 under /opt, the package installed
    from a copy of the tree (not editable), the launcher rewritten for it."""
    if INSTALLED:
        if not QEMU_LOCKED.exists():
            raise LabUnavailable(
                f"QLK_E2E_INSTALLED=1 but {QEMU_LOCKED} is missing: install the package first"
            )
        VENV.mkdir(mode=0o755, parents=True, exist_ok=True)
        (VENV / "bin").mkdir(mode=0o755, exist_ok=True)
        write_argv_logger()
        return
    digest = source_digest()
    stamp = VENV / ".source-digest"
    if stamp.exists() and stamp.read_text() == digest and QEMU_LOCKED.exists():
        return
    t0 = time.monotonic()
    if not (VENV / "bin" / "python").exists():
        VENV.mkdir(mode=0o755, parents=True, exist_ok=True)
        run(["/usr/bin/python3", "-m", "venv", str(VENV)], timeout=300)
        fresh = True
    else:
        fresh = False
    with tempfile.TemporaryDirectory(prefix="qemu-locked-src-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        shutil.copy2(REPO / "pyproject.toml", src)
        for extra in ("README.md", "LICENSE", "COPYING"):
            if (REPO / extra).exists():
                shutil.copy2(REPO / extra, src)
        if not (src / "README.md").exists():
            (src / "README.md").write_text("qemu-locked\n")
        shutil.copytree(
            REPO / "qemu_locked", src / "qemu_locked", ignore=shutil.ignore_patterns("__pycache__")
        )
        pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
        if not fresh:
            pip += ["--force-reinstall", "--no-deps"]
        run([*pip, str(src)], timeout=600)
    run([str(VENV / "bin" / "python"), "-m", "qemu_locked.start.launcher"], timeout=60)
    write_argv_logger()
    stamp.write_text(digest)
    log(f"installed qemu-locked into {VENV} in {time.monotonic() - t0:.1f}s")


def write_argv_logger() -> None:
    ARGV_DIR.mkdir(exist_ok=True)
    logger = ARGV_LOGGER.with_suffix(".tmp")
    logger.write_text(ARGV_LOGGER_SOURCE.format(real=REAL_QEMU, argv_dir=str(ARGV_DIR)))
    logger.chmod(0o755)
    logger.replace(ARGV_LOGGER)
    run(["chmod", "-R", "a+rX", str(VENV)])


def prepare_argv_dir() -> None:
    import pwd

    ARGV_DIR.mkdir(exist_ok=True)
    user = pwd.getpwnam(QEMU_USER)
    os.chown(ARGV_DIR, user.pw_uid, user.pw_gid)
    ARGV_DIR.chmod(0o755)


# -- domains --------------------------------------------------------------------


def domain_uuid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"qemu-locked-e2e:{name}"))


def disk_xml(
    path: str | None,
    target: str = "vda",
    *,
    bus: str = "virtio",
    fmt: str = "qcow2",
    device: str = "disk",
    kind: str = "file",
    readonly: bool = False,
    shareable: bool = False,
    transient: bool = False,
    share_backing: bool = False,
    cache: str | None = None,
    driver_extra: str = "",
    source_xml: str | None = None,
    backing_xml: str = "",
) -> str:
    cache_attr = f" cache={quoteattr(cache)}" if cache else ""
    parts = [f"<disk type={quoteattr(kind)} device={quoteattr(device)}>"]
    parts.append(f"<driver name='qemu' type={quoteattr(fmt)}{cache_attr}{driver_extra}/>")
    if source_xml is not None:
        parts.append(source_xml)
    elif path is not None:
        attr = {"file": "file", "block": "dev", "dir": "dir"}[kind]
        parts.append(f"<source {attr}={quoteattr(path)}/>")
    parts.append(backing_xml)
    parts.append(f"<target dev={quoteattr(target)} bus={quoteattr(bus)}/>")
    if readonly:
        parts.append("<readonly/>")
    if shareable:
        parts.append("<shareable/>")
    if transient:
        parts.append("<transient shareBacking='yes'/>" if share_backing else "<transient/>")
    parts.append("</disk>")
    return "".join(parts)


def domain_xml(
    name: str,
    disks: list[str],
    *,
    emulator: str = REAL_QEMU,
    dom_type: str = "qemu",
    memory_mib: int = 64,
    machine: str = "pc",
    os_extra: str = "",
    devices_extra: str = "",
    features: str = "",
) -> str:
    body = "\n    ".join(disks)
    return f"""<domain type={quoteattr(dom_type)}>
  <name>{escape(name)}</name>
  <uuid>{domain_uuid(name)}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine={quoteattr(machine)}>hvm</type>{os_extra}
  </os>{features}
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(emulator)}</emulator>
    {body}
    {devices_extra}
    <serial type='pty'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class Lab:
    """What a test talks to: virsh on qemu:///system, images, domains, locks."""

    def __init__(self, daemons: Daemons, images: Path) -> None:
        self.daemons = daemons
        self.images = images
        self.qemu_locked = str(QEMU_LOCKED)
        self.qemu_lockctl = str(QEMU_LOCKCTL)
        self.defined: list[str] = []
        self.loops: list[str] = []

    # virsh
    def virsh(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return run(["virsh", "-c", URI, "-q", *args], check=check, timeout=timeout)

    def lockctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, LIBVIRT_DEFAULT_URI=URI)
        return run([self.qemu_lockctl, *args], check=check, env=env, timeout=120)

    def define(self, xml: str, *, locked: bool = True, env: dict[str, str] | None = None) -> str:
        """Define a domain (the original emulator), then put it under qemu-locked;
        ``env``: more QEMU_LOCKED_* settings for its emulator (<qemu:env>)."""
        name = xml.split("<name>", 1)[1].split("</name>", 1)[0]
        assert name.startswith(PREFIX), name
        self._define_xml(xml)
        self.defined.append(name)
        if locked:
            self.lockctl("libvirt", "enable", name)
        if env:
            extra = "".join(
                f"<qemu:env name={quoteattr(k)} value={quoteattr(v)}/>" for k, v in env.items()
            )
            xml = self.dumpxml(name).replace("</qemu:commandline>", extra + "</qemu:commandline>")
            assert extra in xml, "env needs a domain under qemu-locked"
            self._define_xml(xml)
        return name

    def _define_xml(self, xml: str) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".xml", delete=False) as f:
            f.write(xml)
        try:
            self.virsh("define", f.name)
        finally:
            os.unlink(f.name)

    def start(self, name: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.virsh("start", name, check=check)

    def destroy(self, name: str) -> None:
        self.virsh("destroy", name, check=False)

    def state(self, name: str) -> str:
        return self.virsh("domstate", name, check=False).stdout.strip()

    def dumpxml(self, name: str, *, inactive: bool = True) -> str:
        return self.virsh("dumpxml", *(["--inactive"] if inactive else []), name).stdout

    def qemu_pid(self, name: str) -> int:
        pid = read_pidfile(Path(f"/run/libvirt/qemu/{name}.pid"))
        assert pid is not None, f"no pidfile for {name}"
        return pid

    def remove_domain(self, name: str) -> None:
        if self.state(name) not in ("shut off", ""):
            self.destroy(name)
        self.virsh("undefine", "--nvram", name, check=False)
        self.virsh("undefine", name, check=False)

    def cleanup(self) -> None:
        for name in reversed(self.defined):
            self.remove_domain(name)
        self.defined.clear()
        for dev in self.loops:
            run(["losetup", "-d", dev], check=False)
        self.loops.clear()

    # images
    def image(
        self, name: str, fmt: str = "qcow2", size: str = "16M", backing: str | None = None
    ) -> str:
        path = self.images / name
        cmd = ["qemu-img", "create", "-q", "-f", fmt]
        if backing is not None:
            base_fmt = "raw" if backing.endswith((".raw", ".img", ".iso")) else "qcow2"
            cmd += ["-b", backing, "-F", base_fmt]
        cmd += [str(path)]
        if backing is None:
            cmd.append(size)
        run(cmd)
        path.chmod(0o666)
        return str(path)

    def loop_device(self, size_mib: int = 16) -> str:
        backing = self.images / f"loop-{len(self.loops)}.raw"
        with open(backing, "wb") as f:
            f.truncate(size_mib << 20)
        dev = run(["losetup", "--find", "--show", str(backing)]).stdout.strip()
        self.loops.append(dev)
        return dev


def lock_free(path: str, exclusive: bool = True) -> bool:
    """Can a brand-new open file description take the byte-0 lock now? (released at once)"""
    from qemu_locked.lock import ofd

    fd = os.open(path, (os.O_RDWR if exclusive else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        return ofd.try_lock(fd, exclusive)
    finally:
        os.close(fd)


def remove_leftover_domains() -> None:
    names = run(["virsh", "-c", URI, "list", "--all", "--name"], check=False).stdout.split()
    for name in names:
        if name.startswith(PREFIX):
            log(f"removing leftover domain {name}")
            run(["virsh", "-c", URI, "destroy", name], check=False)
            run(["virsh", "-c", URI, "undefine", "--nvram", name], check=False)
            run(["virsh", "-c", URI, "undefine", name], check=False)


def make_images_dir() -> Path:
    base = Path("/var/lib/libvirt/images")
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="qemu-locked-e2e-", dir=base))
    path.chmod(0o755)
    if not reachable_by_others(path):
        raise LabUnavailable(f"{path} is not reachable by {QEMU_USER} (check the parents' modes)")
    return path


DEFAULT_LOCKSPACE = Path("/var/lib/qemu-locked/lockspace")
CREATED: list[Path] = []  # what setup() created on the host, removed by teardown()


def ensure_default_lockspace() -> None:
    """The default lockspace_dir, as `qemu-lockctl lockspace init` makes it: the
    direct backend keeps domain leases and block-device leases there."""
    if DEFAULT_LOCKSPACE.exists():
        return
    top = next(p for p in [DEFAULT_LOCKSPACE, *DEFAULT_LOCKSPACE.parents] if p.parent.exists())
    run(
        [str(QEMU_LOCKCTL), "lockspace", "init", str(DEFAULT_LOCKSPACE)],
        check=True,
    )
    CREATED.append(top)


def teardown() -> None:
    """Remove what setup() created, newest first (daemons are stopped by then)."""
    import shutil

    while CREATED:
        shutil.rmtree(CREATED.pop(), ignore_errors=True)


# `qemu-lockctl libvirt enable` puts a marked block in the host's AppArmor file
# for libvirt's domain profiles (libvirt-daemon-system installs them even where
# the kernel has no AppArmor): the session gives the admin's file back as it was.
APPARMOR_LOCAL = Path("/etc/apparmor.d/local/abstractions/libvirt-qemu")
_APPARMOR_ORIGINAL: list[bytes | None] = []


def keep_apparmor_local() -> None:
    _APPARMOR_ORIGINAL[:] = [APPARMOR_LOCAL.read_bytes() if APPARMOR_LOCAL.exists() else None]


def restore_apparmor_local() -> None:
    if not _APPARMOR_ORIGINAL:
        return
    original = _APPARMOR_ORIGINAL.pop()
    if original is not None:
        APPARMOR_LOCAL.write_bytes(original)
    elif APPARMOR_LOCAL.exists():
        APPARMOR_LOCAL.unlink()


def shutdown(daemons: Daemons, images: Path) -> None:
    """The end of a lab session, in the one safe order: leftover test domains,
    the daemons the lab started, what setup() created, the images directory."""
    import shutil

    remove_leftover_domains()
    daemons.stop_all()
    restore_apparmor_local()
    teardown()
    shutil.rmtree(images, ignore_errors=True)


def setup() -> tuple[Daemons, Path]:
    """Everything before the first test.  Raises LabUnavailable with the reason."""
    if sys.platform != "linux":
        raise LabUnavailable("Linux only")
    if os.geteuid() != 0:
        raise LabUnavailable("needs root (installs packages, starts libvirtd)")
    apt_install(APT_PKGS)
    keep_apparmor_local()
    fix_kvm()
    # What the lab creates on the host goes again at teardown (it is rebuilt per session).
    CREATED.extend(p for p in (VENV, STATE) if not p.exists())
    STATE.mkdir(mode=0o755, parents=True, exist_ok=True)
    daemons = Daemons()
    if not pids_named("libvirtd"):
        clean_stale_conf()
    install_qemu_locked()
    ensure_default_lockspace()
    prepare_argv_dir()
    daemons.ensure_virtlogd()
    daemons.ensure_libvirtd()
    remove_leftover_domains()
    return daemons, make_images_dir()
