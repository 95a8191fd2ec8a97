"""Hole 1: one inode is one lock on a host, whatever name reaches it.

The lockspace (and sanlock) backends key leases by path; a hard link or a bind
mount is a second path to the same inode.  These run the installed binaries on
real files; the bind mount lives in a private mount namespace (unshare -m).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from conftest import QEMU_LOCKCTL, QEMU_LOCKED, byte0_modes, make_image, skip_unless_ci
from fail_closed import FakeVM, config, env_for


def _lockspace_env(tmp: Path) -> dict[str, str]:
    (tmp / "ls").mkdir()
    return env_for(config(tmp, backend="lockspace", lockspace_dir=str(tmp / "ls")))


def test_lockspace_hard_link_is_the_same_disk(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img")
    os.link(img, tmp_path / "d2.img")
    env = _lockspace_env(tmp_path)
    one = FakeVM(tmp_path, "one", ["-name", "guest=one", "-drive", f"file={img}"], env)
    try:
        assert one.ready(), one.stderr()
        two = subprocess.run(
            [QEMU_LOCKED, "-name", "guest=two", "-drive", f"file={tmp_path}/d2.img"],
            env=dict(env, FAKE_QEMU_EXIT="0"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert two.returncode == 3, two.stdout + two.stderr
        assert ": in use (writing) by" in two.stderr and "guest 'one'" in two.stderr
        # the image's own byte 0 is what made them meet: VM one holds it
        assert byte0_modes(one.proc.pid, img) == ["exclusive"]
    finally:
        one.kill()


def _can_unshare() -> str | None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return "needs root and unshare"
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    return None if r.returncode == 0 else "no mount namespaces here"


# Inside a private mount namespace: bind-mount the image's directory at a second
# place, then become qemu-locked on the image's name there.
_IN_NAMESPACE = """
import os, subprocess, sys
src, dst, ql = sys.argv[1:4]
subprocess.run(["mount", "--bind", src, dst], check=True)
os.execv(ql, [ql, *sys.argv[4:]])
"""


def test_lockspace_bind_mount_is_the_same_disk(tmp_path: Path) -> None:
    why = _can_unshare()
    if why is not None:
        skip_unless_ci(why)
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "other").mkdir()
    img = make_image(src / "d.img")
    env = _lockspace_env(tmp_path)
    one = FakeVM(tmp_path, "one", ["-name", "guest=one", "-drive", f"file={img}"], env)
    try:
        assert one.ready(), one.stderr()
        two = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "--", "/usr/bin/python3", "-c",
             _IN_NAMESPACE, str(src), str(tmp_path / "other"), QEMU_LOCKED,
             "-name", "guest=two", "-drive", f"file={tmp_path}/other/d.img"],
            env=dict(env, FAKE_QEMU_EXIT="0"), capture_output=True, text=True, timeout=60)  # fmt: skip
        assert two.returncode == 3, two.stdout + two.stderr
        assert "guest 'one'" in two.stderr
    finally:
        one.kill()


def test_shared_filesystem_key_ignores_where_it_is_mounted() -> None:
    """Across hosts: one NFS export mounted at different places, whole or a
    subdirectory of it, or bind-mounted, gives one lease key for one file.
    (Pure: the mounts are described, as /proc/self/mountinfo would.)"""
    from qemu_locked.lock.keys import shared_file_key
    from qemu_locked.lock.mounts import Mount, inside

    host_a = Mount("/mnt/a", "/", "nfs4", "srv:/export", "0:50")
    host_b = Mount("/var/lib/libvirt/images", "/", "nfs", "srv:/export/vms/", "0:61")
    host_c = Mount("/images", "/vms", "nfs4", "srv:/export", "0:70")  # a bind mount of vms/
    keys = {
        shared_file_key(m, inside(m, path), 0)
        for m, path in ((host_a, "/mnt/a/vms/web.qcow2"),
                        (host_b, "/var/lib/libvirt/images/web.qcow2"),
                        (host_c, "/images/web.qcow2"))
    }  # fmt: skip
    assert keys == {"fs:nfs:srv:/export/vms/web.qcow2"}
    local = Mount("/", "/", "ext4", "/dev/vda", "254:0")
    assert inside(local, "/var/lib/x.img") == "/var/lib/x.img"


def test_doctor_names_how_files_are_keyed(tmp_path: Path) -> None:
    """doctor, with a name-keyed backend, says how files under --path are keyed."""
    (tmp_path / "ls").mkdir()
    env = env_for(config(tmp_path, backend="lockspace", lockspace_dir=str(tmp_path / "ls")))
    r = subprocess.run([QEMU_LOCKCTL, "doctor", "--json", "--path", str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    import json

    keyed = [f for f in json.loads(r.stdout)["findings"] if f["check"] == "file keys"]
    assert any(f["message"].startswith(f"{tmp_path}: on a host-local filesystem") for f in keyed)
