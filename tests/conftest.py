"""Shared test helpers: the installed commands, and VMs under qemu-locked that
run the fake QEMU and report (through a ready handshake) what they inherited."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from stress.support import stress_sessionfinish, tally  # noqa: F401 - the stress suite's fixture


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stress_sessionfinish(session, exitstatus)


BIN = Path(sys.executable).parent
QEMU_LOCKED = str(BIN / "qemu-locked")
QEMU_LOCKCTL = str(BIN / "qemu-lockctl")
FAKE_QEMU = str(BIN / "qemu-locked-fake-qemu")


# A config file of the tests' own, so no /etc/qemu-locked config of this host leaks in.
_EMPTY_CONFIG = Path(tempfile.mkdtemp(prefix="qemu-locked-test-")) / "empty.toml"
# A host's real lockspace (/var/lib/qemu-locked/lockspace) must neither get the
# tests' domain leases nor change what they see: point at one that does not exist.
_EMPTY_CONFIG.write_text(f'lockspace_dir = "{_EMPTY_CONFIG.parent / "no-lockspace"}"\n')
_EMPTY_CONFIG.parent.chmod(0o755)  # readable by the unprivileged users some tests run as
_EMPTY_CONFIG.chmod(0o644)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QEMU_LOCKED_")}
    env["QEMU_LOCKED_CONFIG"] = str(_EMPTY_CONFIG)
    env["QEMU_LOCKED_EMULATOR"] = FAKE_QEMU
    env.update(extra)
    if env["QEMU_LOCKED_EMULATOR"] == FAKE_QEMU:
        # The stub is a Python program: under the supervisor each of the ~100 files
        # its interpreter reads outside the system's directories (the venv, this
        # tree) would be locked shared, as any file QEMU reads is.  The stub's
        # tests are about the wrapper; the real QEMU's prove the supervisor.
        env.setdefault("QEMU_LOCKED_SUPERVISOR", "false")
    return env


class VM:
    """qemu-locked + fake QEMU as a real process; started() waits for `ready`."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [QEMU_LOCKED, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env or base_env(),
            text=True,
        )
        self.report: dict[str, object] = {}

    def started(self, timeout: float = 20) -> bool:
        """True once the fake QEMU printed `ready`; False if qemu-locked exited."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout)
            return False
        self.report = json.loads(line)
        assert self.proc.stdout.readline().strip() == "ready"
        return True

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def locks(self) -> dict[str, list[str]]:
        """path -> modes of byte-0 locks the exec'd process inherited."""
        out: dict[str, list[str]] = {}
        for fd in self.report["fds"]:  # type: ignore[union-attr]
            modes = [
                lk["mode"] for lk in fd["locks"] if lk["start"] == 0 and lk["kind"] == "OFDLCK"
            ]
            if modes:
                out.setdefault(fd["path"], []).extend(modes)
        return out

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


@pytest.fixture
def vms() -> Iterator[list[VM]]:
    started: list[VM] = []
    yield started
    for vm in started:
        try:
            vm.kill()
        except Exception:
            pass


@pytest.fixture
def start(vms: list[VM]):  # type: ignore[no-untyped-def]
    def _start(*args: str, env: dict[str, str] | None = None) -> VM:
        vm = VM(list(args), env)
        vms.append(vm)
        return vm

    return _start


# Built without the product's lock code: a wrong ``struct flock`` layout or
# fdinfo reader in qemu_locked must not be able to agree with itself here.
# struct flock (64-bit Linux): short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid; native alignment pads after l_whence and at the end.
_FLOCK = struct.Struct("@hhqqi")
_F_OFD_SETLK = 37  # <asm-generic/fcntl.h>


def _flock(l_type: int) -> bytes:
    raw = _FLOCK.pack(l_type, os.SEEK_SET, 0, 1, 0)
    return raw + bytes(32 - len(raw))


def lock_free(path: str, exclusive: bool = True) -> bool:
    """Can a brand-new open file description lock byte 0 right now?"""
    fd = os.open(path, (os.O_RDWR if exclusive else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, _flock(fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    finally:
        os.close(fd)
    return True


def byte0_modes(pid: int, path: str) -> list[str]:
    """Modes ("exclusive"/"shared") of the byte-0 OFD locks on the open file
    descriptions of pid's fds that reach path's inode.

    /proc/PID/fdinfo/N lock lines read
    ``lock:\t1: OFDLCK  ADVISORY  WRITE -1 fd:01:1234 0 0`` (type, advisory,
    access, pid, device:inode, start, end).
    """
    out: list[str] = []
    for fd in _fds_on(pid, path):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("lock:"):
                fields = line.split(":", 2)[2].split()
                if fields[0] == "OFDLCK" and fields[5] == "0":
                    out.append("exclusive" if fields[2] == "WRITE" else "shared")
    return out


def has_open(pid: int, path: str) -> bool:
    """Whether pid has an fd on path's inode (observable from outside)."""
    return any(True for _fd in _fds_on(pid, path))


def _fds_on(pid: int, path: str) -> Iterator[str]:
    """pid's fds that reach path's inode (the tests' own /proc walk, apart from the product's)."""
    want = os.stat(path)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            yield fd


def wait_for(cond, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    """Poll for an observable event; the timeout only ends a hung test."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


def apt_install(*packages: str) -> str | None:
    """apt-get install the Debian packages that are missing (root only), as
    `make apt-test` does.  Returns None on success, else why not."""
    missing = [
        p
        for p in packages
        if "install ok installed"
        not in subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True
        ).stdout
    ]
    if not missing:
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"not root: please install {' '.join(missing)}"
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return f"apt-get install {' '.join(missing)} failed: {r.stderr.strip()[-300:]}"
    return None


def skip_unless_ci(why: str) -> NoReturn:
    """Skip a test whose requirement is missing -- except under CI=true, where
    every requirement is installed and a skip would hide a failure."""
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"CI must provide what this test needs: {why}")
    pytest.skip(why)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A loop device over an 8 MiB file (root); detached afterwards."""
    why = None
    if os.geteuid() != 0 or not shutil.which("losetup"):
        why = "needs root and losetup"
    else:
        backing = make_image(tmp_path / "loop-backing.img", 8 << 20)
        r = subprocess.run(["losetup", "--find", "--show", backing], capture_output=True, text=True)
        why = None if r.returncode == 0 else f"no loop device here: {r.stderr.strip()}"
    if why is not None:
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"CI runs as root with loop devices: {why}")
        pytest.skip(why)
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def make_image(path: Path, size: int = 1 << 20) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def run(
    cmd: list[str], env: dict[str, str] | None = None, **kw: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env or base_env(), timeout=60, **kw
    )  # type: ignore[call-overload,no-any-return]
