"""Two sanlock daemons playing two hosts on one machine (see sanlock-notes.md).

Each host is a ``sanlock daemon`` with its own SANLOCK_RUN_DIR, no watchdog,
unprivileged mode and its own log.  The harness stops only the daemons it
started, by pid.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import apt_install

APT_PACKAGES = ("sanlock", "python3-sanlock")


def sanlock_installed() -> bool:
    return shutil.which("sanlock") is not None and any(
        Path("/usr/lib/python3/dist-packages").glob("sanlock.cpython-*.so")
    )


def install_sanlock() -> str | None:
    """apt-get install sanlock + python3-sanlock when missing (root only).
    Returns None on success, else why not."""
    return apt_install(*APT_PACKAGES)


class Host:
    """One simulated host: a sanlock daemon with its own run dir and name."""

    def __init__(self, base: Path, number: int) -> None:
        self.number = number
        self.name = f"host-{number}"
        self.dir = base / self.name
        self.run_dir = self.dir / "run"
        self.log = self.dir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["SANLOCK_RUN_DIR"] = str(self.run_dir)
        env["SANLOCK_PRIVILEGED"] = "0"
        env.update(extra)
        return env

    def start(self, timeout: float = 10) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(os.getgid()).gr_name
        cmd = [
            "sanlock", "daemon", "-D", "-w", "0", "-l", "0", "-h", "0",
            "-U", user, "-G", group, "-L", "-1", "-S", "-1", "-e", self.name,
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                close_fds=True,
            )
        sock = self.run_dir / "sanlock.sock"
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: sanlock daemon exited: {self.log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no socket after {timeout}s")
            time.sleep(0.02)

    def crash(self) -> None:
        """SIGKILL the daemon: the host "dies" (no watchdog: its VMs live on)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """Stop this daemon only (by pid).  A daemon with a joined lockspace
        ignores SIGTERM, so SIGKILL follows after a short grace."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(1)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@contextlib.contextmanager
def hosts(base: Path, count: int = 2) -> Iterator[list[Host]]:
    started: list[Host] = []
    try:
        for n in range(1, count + 1):
            h = Host(base, n)
            started.append(h)
            h.start()
        yield started
    finally:
        for h in started:
            h.stop()
