"""Hole 3: -incoming with -daemonize (real QEMU 7.2).

The migration keeper waited on the pid QEMU had before it daemonized; that
parent exits once the daemon is up, and the keeper stopped as if the VM had
died, so the lock the source still held was never taken.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import QEMU_LOCKCTL, QEMU_LOCKED, byte0_modes, wait_for
from fail_closed import REAL_QEMU, alive, env_for, qemu_img

if not os.path.exists(REAL_QEMU):
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI: qemu-system-x86_64 must be installed (make test installs it)")
    pytest.skip("qemu-system-x86_64 not installed", allow_module_level=True)


def _port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def _pid_in(pidfile: Path) -> int:
    try:
        return int(pidfile.read_text())
    except (OSError, ValueError):
        return 0


@contextmanager
def source_and_daemonized_destination(
    tmp_path: Path, **env_extra: str
) -> Iterator[tuple[str, subprocess.Popen[bytes], int, Path]]:
    """A "source" (``qemu-lockctl run`` holding the image until killed), then a
    daemonizing ``-incoming`` QEMU under qemu-locked: (image, source, daemon pid,
    the wrapper's stderr).  Kills both at the end."""
    img = str(tmp_path / "vm.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    env = env_for(
        None, QEMU_LOCKED_EMULATOR=REAL_QEMU, QEMU_LOCKED_DOMAIN_LEASE="false", **env_extra
    )
    ready = tmp_path / "holder.ready"
    holder = subprocess.Popen([QEMU_LOCKCTL, "run", "--disk", img, "--", "/usr/bin/python3", "-c",
                               f"open({str(ready)!r}, 'w').close(); import time; time.sleep(600)"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    pidfile = tmp_path / "qemu.pid"
    log = tmp_path / "wrapper.err"
    daemon = 0
    try:
        wait_for(lambda: ready.exists() or holder.poll() is not None, "the holder to start")
        assert holder.poll() is None
        # stderr to a file: the keeper keeps QEMU's stderr, a pipe would not reach EOF
        r = subprocess.run(
            [QEMU_LOCKED, "-name", "guest=dst", "-machine", "none", "-display", "none", "-nodefaults",
             "-daemonize", "-pidfile", str(pidfile), "-incoming", f"tcp:127.0.0.1:{_port()}",
             "-drive", f"file={img},if=none,format=qcow2,id=d0"],
            env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"), timeout=60)  # fmt: skip
        assert r.returncode == 0, log.read_text()
        daemon = int(pidfile.read_text())
        yield img, holder, daemon, log
    finally:
        holder.kill()
        holder.wait()
        daemon = daemon or _pid_in(pidfile)
        if daemon and alive(daemon):
            os.kill(daemon, signal.SIGKILL)


def test_daemonized_incoming_takes_the_lock_once_the_source_lets_go(tmp_path: Path) -> None:
    with source_and_daemonized_destination(tmp_path) as (img, holder, daemon, _log):
        assert byte0_modes(daemon, img) == []  # the source still has it
        holder.send_signal(signal.SIGTERM)
        holder.wait(30)
        wait_for(
            lambda: byte0_modes(daemon, img) == ["exclusive"], "the daemon to hold the disk", 30
        )


def test_daemonized_incoming_timeout_applies_the_action(tmp_path: Path) -> None:
    """The source never lets go: the daemonized VM is killed (the default action)."""
    with source_and_daemonized_destination(tmp_path, QEMU_LOCKED_INCOMING_WAIT="1") as (
        img,
        _holder,
        daemon,
        log,
    ):
        wait_for(lambda: not alive(daemon), "the daemonized VM to be killed", 30)
        wait_for(lambda: "killing the VM" in log.read_text(), "the keeper's line")
        assert log.read_text().startswith(f"qemu-locked: cannot write {img} after ")
