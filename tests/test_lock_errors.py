"""Lock errors other than contention are the filesystem's, not ours: ENOLCK
(NFSv3 without lockd), EINVAL / EOPNOTSUPP (some FUSE filesystems) end the
start with exit 5 and one line naming the path and its filesystem type.

The kernel gives these only on filesystems a test cannot set up here, so the
errno is injected into fcntl() (see fail_closed.INJECT); nothing else is faked.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import make_image
from fail_closed import config, env_for, injected


def fs_type(path: str) -> str:
    """The filesystem type of path, from /proc/self/mountinfo (longest mount point)."""
    real = os.path.realpath(path)
    best, kind = "", ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _sep, right = line.partition(" - ")
            point = left.split()[4].replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, right.split()[0]
    return kind


@pytest.mark.parametrize("err", ["ENOLCK", "EINVAL", "EOPNOTSUPP"])
@pytest.mark.parametrize("backend", ["direct", "lockspace"])
def test_filesystem_lock_errors_are_backend_errors(tmp_path: Path, err: str, backend: str) -> None:
    img = make_image(tmp_path / "d.img")
    (tmp_path / "ls").mkdir()
    env = env_for(
        config(tmp_path, backend=backend, lockspace_dir=str(tmp_path / "ls")), FAKE_QEMU_EXIT="0"
    )
    r = subprocess.run(
        injected("all", err, "-name", "guest=g", "-drive", f"file={img}"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 5, r.stdout + r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("qemu-locked: ")
    kind = fs_type(str(tmp_path))
    assert f"({kind})" in line, line
    assert str(tmp_path) in line, line  # the image, or the lease file standing for it
    assert os.strerror(getattr(__import__("errno"), err)) in line
