"""`qemu-lockctl status --watch`: refreshes until Ctrl-C, which ends it with exit 0
and no traceback; the screen is cleared on a terminal only (issue 23)."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
from pathlib import Path

from conftest import QEMU_LOCKCTL, base_env, make_image

CLEAR = "\033[H\033[2J"


def watch(*args: str, stdout: int = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen([QEMU_LOCKCTL, "status", "--watch", "--interval", "0.1", *args],
                            env=base_env(), stdout=stdout, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def interrupted(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    return proc.returncode, err


def test_watch_into_a_pipe_refreshes_without_clearing(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img")
    proc = watch(img)
    assert proc.stdout is not None
    heads = []
    while len(heads) < 2:  # two refreshes seen
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        assert CLEAR not in line
        if line.startswith("every 0.1s: qemu-lockctl status  "):
            heads.append(line)
        else:
            assert line in ("\n", "no lock held\n"), line
    assert interrupted(proc) == (0, "")


def test_watch_on_a_terminal_clears_the_screen(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img")
    master, slave = pty.openpty()
    try:
        proc = watch(img, stdout=slave)
        os.close(slave)
        seen = ""
        while seen.count(CLEAR) < 2:
            seen += os.read(master, 4096).decode()
        assert f"{CLEAR}every 0.1s: qemu-lockctl status  " in seen, seen
        assert "no lock held" in seen
        assert interrupted(proc) == (0, "")
    finally:
        os.close(master)


def test_watch_json_is_one_object_per_line(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img")
    proc = watch("--json", img)
    assert proc.stdout is not None
    for _ in range(2):
        assert json.loads(proc.stdout.readline()) == {"locks": [], "unlisted": []}
    assert interrupted(proc) == (0, "")
