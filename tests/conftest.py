"""Shared test helpers: the installed commands, and VMs under qemu-locked that
run the fake QEMU and report (through a ready handshake) what they inherited."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from stress.support import stress_sessionfinish, tally  # noqa: F401 - the stress suite's fixture

from qemu_locked.lock import ofd, procfs


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


def lock_free(path: str, exclusive: bool = True) -> bool:
    """Can a brand-new open file description lock byte 0 right now?"""
    fd = os.open(path, os.O_RDWR if exclusive else os.O_RDONLY)
    try:
        return ofd.try_lock(fd, exclusive)
    finally:
        os.close(fd)


def byte0_modes(pid: int, path: str) -> list[str]:
    """Modes of the byte-0 OFD locks a process holds on path ("exclusive"/"shared")."""
    locks = procfs.fd_locks(pid).get(path, [])
    return [mode for kind, mode, start in locks if start == 0 and kind == "OFDLCK"]


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
