"""Helpers for the fail-closed tests (issue 13): real processes, real files.

The only fault injection is :data:`INJECT`: an errno the kernel gives only on
filesystems a test cannot set up here (NFSv3 without lockd, FUSE).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import QEMU_LOCKED, base_env, wait_for

REAL_QEMU = "/usr/bin/qemu-system-x86_64"


def env_for(config: Path | None = None, **extra: str) -> dict[str, str]:
    env = base_env(**extra)
    if config is not None:
        env["QEMU_LOCKED_CONFIG"] = str(config)
    return env


def config(tmp: Path, **keys: object) -> Path:
    path = tmp / "qemu-locked.toml"
    lines = []
    for k, v in keys.items():
        lines.append(
            f"{k} = "
            + (
                ("true" if v else "false")
                if isinstance(v, bool)
                else str(v)
                if isinstance(v, (int, float))
                else f'"{v}"'
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


class FakeVM:
    """qemu-locked + fake QEMU; ``ready()`` waits for the stub's handshake in its out file."""

    def __init__(
        self, tmp: Path, name: str, args: list[str], env: dict[str, str], stdio: bool = True
    ) -> None:
        self.out = tmp / f"{name}.out"
        self.err = tmp / f"{name}.err"
        env = dict(env, FAKE_QEMU_OUT=str(self.out))
        argv = [QEMU_LOCKED, *args] if stdio else without_stdio(QEMU_LOCKED, *args)
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )

    def ready(self) -> bool:
        """True once the stub said ``ready``; False if qemu-locked exited instead."""
        wait_for(lambda: self._said_ready() or self.proc.poll() is not None, "ready or exit")
        return self._said_ready()

    def _said_ready(self) -> bool:
        return self.out.exists() and "\nready\n" in self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


_CLOSE_STDIO = (
    "import os, sys\nfor fd in (0, 1, 2):\n    os.close(fd)\nos.execv(sys.argv[1], sys.argv[1:])\n"
)


def without_stdio(*argv: str) -> list[str]:
    """argv that runs ``argv`` with fds 0, 1 and 2 closed."""
    return [sys.executable, "-c", _CLOSE_STDIO, *argv]


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


# Runs the wrapper in-process with fcntl.fcntl wrapped, to inject an errno the
# kernel gives only on filesystems a test cannot set up (NFSv3 without lockd,
# FUSE).  argv: WHERE ("keeper": only in processes forked after start; "all")
# ERRNO-or-exception-name, then QEMU's arguments.  Nothing else is changed.
INJECT = """
import errno, fcntl, os, sys
where, what = sys.argv[1], sys.argv[2]
del sys.argv[1:3]
start_pid = os.getpid()
real = fcntl.fcntl
def fake(fd, cmd, arg=0):
    if cmd in (37, 38) and (where == "all" or os.getpid() != start_pid):
        if what.startswith("E"):
            raise OSError(getattr(errno, what), os.strerror(getattr(errno, what)))
        raise RuntimeError("injected")
    return real(fd, cmd, arg)
fcntl.fcntl = fake
try:
    from qemu_locked.start.wrapper import main
except ImportError:
    from qemu_locked.wrapper import main
main()
"""


def injected(where: str, what: str, *qemu_args: str) -> list[str]:
    """argv running qemu-locked with an injected fcntl failure (see INJECT)."""
    return [sys.executable, "-c", INJECT, where, what, *qemu_args]
