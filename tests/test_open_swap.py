"""A disk path swapped for a character device between the type check and the
open must never be opened (opening a device can have side effects).

The swap is made deterministic: right after qemu-locked first looks at the
path (stat or an O_PATH open), the test renames a character device node over
it.  inotify tells whether the device node was then opened (an O_PATH open is
not an open of the device and raises no IN_OPEN).
"""

from __future__ import annotations

import ctypes
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_image, skip_unless_ci
from fail_closed import env_for

_SWAP = """
import os, sys
path, node = sys.argv[1], sys.argv[2]
del sys.argv[1:3]
done = []
real_stat, real_open = os.stat, os.open
def swap_after(result):
    if not done:
        done.append(1)
        os.rename(node, path)
    return result
def stat(p, *a, **k):
    r = real_stat(p, *a, **k)
    return swap_after(r) if p == path else r
def open_(p, flags, *a, **k):
    r = real_open(p, flags, *a, **k)
    return swap_after(r) if p == path else r
os.stat, os.open = stat, open_
try:
    from qemu_locked.start.wrapper import main
except ImportError:
    from qemu_locked.wrapper import main
main()
"""

_IN_OPEN = 0x20
_IN_NONBLOCK = os.O_NONBLOCK


@pytest.mark.parametrize("fmt", ["raw", "probed"])
def test_device_swapped_in_is_never_opened(tmp_path: Path, fmt: str) -> None:
    if os.geteuid() != 0:
        skip_unless_ci("mknod needs root")
    img = make_image(tmp_path / "d.img")
    node = tmp_path / "dev"
    os.mknod(node, 0o666 | 0o020000, os.makedev(1, 3))  # a /dev/null node: harmless to open
    libc = ctypes.CDLL(None, use_errno=True)
    ifd = libc.inotify_init1(_IN_NONBLOCK)
    assert ifd >= 0
    try:
        assert libc.inotify_add_watch(ifd, str(node).encode(), _IN_OPEN) >= 0
        drive = f"file={img}" + (",format=raw" if fmt == "raw" else "")
        r = subprocess.run([sys.executable, "-c", _SWAP, img, str(node), "-drive", drive],
                           env=env_for(None, FAKE_QEMU_EXIT="0"), capture_output=True, text=True,
                           timeout=60)  # fmt: skip
        assert os.path.exists(img) and not node.exists()  # the swap happened
        # locked the inode it checked, or refused (a DiskError: QEMU's own exit 1 in the drop-in)
        assert r.returncode in (0, 1), r.stderr
        ready, _w, _x = select.select([ifd], [], [], 0)
        opened = os.read(ifd, 4096) if ready else b""
        assert opened == b"", "the character device was opened"
    finally:
        os.close(ifd)
