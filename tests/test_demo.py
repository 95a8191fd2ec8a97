"""`make demo` is part of the product: it must show the refusal and succeed."""

from __future__ import annotations

import subprocess
import sys


def test_demo_refuses_the_second_vm_and_names_the_first() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "qemu_locked.demo"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "qemu-locked: " in r.stdout and "guest 'alpha'" in r.stdout
    assert "exit code 3" in r.stdout and "demo done" in r.stdout
