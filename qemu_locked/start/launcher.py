"""Install the ``qemu-locked`` launcher with the interpreter flags it is written for.

pip rewrites a script's ``#!python -IS`` line to ``#!/venv/bin/python`` and
drops the flags; the script still works, but pays for site.py (~3.5 ms) on
every VM start and honours PYTHON* variables.  ``python -m qemu_locked.launcher
DEST`` writes it again with ``-IS``; ``make`` runs it for the project venv.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SOURCE = Path(__file__).parents[1] / "scripts" / "qemu-locked"


def write(dest: str, python: str = sys.executable) -> None:
    body = SOURCE.read_text().split("\n", 1)[1]
    tmp = f"{dest}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o755)
    try:
        os.write(fd, f"#!{python} -IS\n{body}".encode())
        os.fchmod(fd, 0o755)
    finally:
        os.close(fd)
    os.replace(tmp, dest)


def main() -> None:
    dests = sys.argv[1:] or [os.path.join(os.path.dirname(sys.executable), "qemu-locked")]
    for dest in dests:
        write(dest)


if __name__ == "__main__":
    main()
