"""The aalab boot image: Debian 12 with its cloud kernel, AppArmor, libvirt and QEMU.

Built once into ``/var/cache/qemu-locked-lab/aa-bookworm/`` in two stages, each with its
own stamp so that an interrupted build is never taken for a finished one:

``tree/``
    ``debootstrap --variant=minbase bookworm`` + the packages, installed by lab11's
    ``nsinit.py apt`` (private mount+pid namespace, policy-rc.d 101, never the host /dev).
    Built under ``tree.partial/`` and renamed when done; keyed by the package list.
``root.img``, ``vmlinuz``, ``initrd.img``, ``image.json``
    The guest init baked into the tree as /sbin/qlab-init, then ``mkfs.ext4 -d`` (sparse).
    ``image.json`` is removed first and written last, keyed by the package list and the
    init's digest: editing guest_init.py costs one mkfs (~20 s), not a new debootstrap.

One builder at a time (``.build-lock``, a lock file of ours).

Usage: cd tests && python3 -m e2e.aalab.image [--rebuild]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e.lab11 import rootfs

CACHE = Path("/var/cache/qemu-locked-lab/aa-bookworm")
SUITE = "bookworm"
PACKAGES = (
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "apparmor",
    "libvirt-daemon-system",
    "libvirt-clients",
    "qemu-system-x86",
    "qemu-utils",
    # the runtime dependencies of qemu-locked's .deb: `dpkg -i` must work offline in the VM
    "python3",
    "python3-lxml",
    "python3-portalocker",
    "python3-typer",
    "procps",
    "util-linux",
    "kmod",
    "e2fsprogs",
)
HOST_TOOLS = {
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "qemu-system-x86_64": "qemu-system-x86",
}
# Loaded by the initramfs from this list: without udev in the tree nothing coldplugs them.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "ext4")
GUEST_INIT = Path(__file__).resolve().parent / "guest_init.py"
INIT_IN_GUEST = "/sbin/qlab-init"
TREE_STAMP = "etc/qemu-locked-aalab.json"
# Room for what a scenario writes (dpkg -i, images); writes land in QEMU's snapshot overlay.
HEADROOM = 2 << 30
VERSIONS_OF = ("linux-image-", "libvirt-daemon", "qemu-system-x86", "apparmor", "python3")


@dataclass(frozen=True)
class Paths:
    root_img: Path
    kernel: Path
    initrd: Path
    stamp: dict[str, Any]


def log(msg: str) -> None:
    sys.stderr.write(f"[aalab] {msg}\n")
    sys.stderr.flush()


def _digest() -> str:
    return hashlib.sha256(GUEST_INIT.read_bytes()).hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.rename(path)


def _tree_ok(cache: Path) -> dict[str, Any] | None:
    stamp = _read_json(cache / "tree" / TREE_STAMP)
    if stamp is None or tuple(stamp.get("packages", ())) != PACKAGES:
        return None
    return stamp


def cached(cache: Path = CACHE) -> Paths | None:
    """The finished image, or None when (part of) it has to be built."""
    stamp = _read_json(cache / "image.json")
    if stamp is None or tuple(stamp.get("packages", ())) != PACKAGES:
        return None
    if stamp.get("init_sha256") != _digest():
        return None
    paths = Paths(cache / "root.img", cache / "vmlinuz", cache / "initrd.img", stamp)
    if not all(p.is_file() for p in (paths.root_img, paths.kernel, paths.initrd)):
        return None
    return paths


def build(cache: Path = CACHE, *, rebuild: bool = False) -> Paths:
    """The cached image, built first when missing or stale (one builder at a time)."""

    def make() -> Paths:
        logfile = cache / "build.log"
        logfile.write_bytes(b"")
        host_tools(logfile)
        tree = _tree_ok(cache)
        if tree is None or rebuild:
            tree = _build_tree(cache, logfile)
        return _build_image(cache, tree, logfile)

    return rootfs.built_once(cache, lambda: cached(cache), make, rebuild)


def host_tools(logfile: Path) -> None:
    """apt-get install what the lab needs on the host and is missing."""
    missing = sorted(
        {
            pkg
            for tool, pkg in HOST_TOOLS.items()
            if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()
        }
    )
    if not missing:
        return
    log("installing on the host: " + " ".join(missing))
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    try:
        rootfs.run_logged(install, logfile)
    except RuntimeError:  # stale package lists
        rootfs.run_logged(["apt-get", "update", "-q"], logfile)
        rootfs.run_logged(install, logfile)


def for_tests(cache: Path = CACHE) -> Paths:
    """The image for a pytest fixture: skip (fail under CI=true) when it cannot be had."""
    import pytest

    why = None
    if os.geteuid() != 0:
        why = "needs root (debootstrap, the image cache in /var/cache)"
    elif os.uname().machine != "x86_64":
        why = f"the lab boots an amd64 kernel; this is {os.uname().machine}"
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"under CI=true the AppArmor lab must run: {why}")
        pytest.skip(why)
    cache.mkdir(parents=True, exist_ok=True)
    host_tools(cache / "host-apt.log")
    return build(cache)


def _build_tree(cache: Path, logfile: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    partial, final = cache / "tree.partial", cache / "tree"
    if partial.exists():
        shutil.rmtree(partial)
    mirror = rootfs.host_mirror()
    log(f"debootstrap --variant=minbase {SUITE} {partial} {mirror}")
    rootfs.run_logged(["debootstrap", "--variant=minbase", SUITE, str(partial), mirror], logfile)
    t_debootstrap = time.monotonic() - t0
    rootfs.write_sources(partial, mirror, SUITE)
    # Stays in the image: a .deb installed in the VM (no systemd there) starts no service.
    policy = partial / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    modules = partial / "etc/initramfs-tools/modules"
    modules.parent.mkdir(parents=True, exist_ok=True)
    modules.write_text("".join(m + "\n" for m in INITRAMFS_MODULES))
    log("apt-get install " + " ".join(PACKAGES) + " (private mount+pid namespace)")
    t1 = time.monotonic()
    rootfs.install_packages(partial, PACKAGES, logfile)
    t_packages = time.monotonic() - t1
    # libvirtd would try to start the default NAT network at every boot (no dnsmasq here).
    for xml in (partial / "etc/libvirt/qemu/networks/autostart").glob("*.xml"):
        xml.unlink()
    versions, size = rootfs.tree_facts(partial)
    stamp: dict[str, Any] = {
        "packages": list(PACKAGES),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "debootstrap_seconds": round(t_debootstrap, 1),
        "packages_seconds": round(t_packages, 1),
        "tree_bytes": int(size),
        "versions": sorted(v for v in versions if v.startswith(VERSIONS_OF)),
    }
    _write_json(partial / TREE_STAMP, stamp)
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    log(f"tree built in {time.monotonic() - t0:.0f} s ({int(size) / 1e6:.0f} MB)")
    return stamp


def _newest(tree: Path, pattern: str) -> Path:
    found = sorted((tree / "boot").glob(pattern))
    if not found:
        raise RuntimeError(f"no /boot/{pattern} in {tree}: the kernel package did not install")
    return found[-1]


def _build_image(cache: Path, tree_stamp: dict[str, Any], logfile: Path) -> Paths:
    t0 = time.monotonic()
    (cache / "image.json").unlink(missing_ok=True)
    tree = cache / "tree"
    init = tree / INIT_IN_GUEST.lstrip("/")
    init.write_bytes(GUEST_INIT.read_bytes())
    init.chmod(0o755)
    (tree / "etc/hostname").write_text("aalab\n")
    for name, pattern in (("vmlinuz", "vmlinuz-*"), ("initrd.img", "initrd.img-*")):
        tmp = cache / (name + ".partial")
        shutil.copyfile(_newest(tree, pattern), tmp)
        tmp.rename(cache / name)
    size = int(tree_stamp["tree_bytes"]) + HEADROOM
    size = -(-size // (256 << 20)) * (256 << 20)
    img = cache / "root.img.partial"
    img.unlink(missing_ok=True)
    log(f"mkfs.ext4 -d {tree} ({size >> 20} MiB, sparse)")
    rootfs.run_logged(
        ["mkfs.ext4", "-q", "-F", "-L", "aalab-root", "-d", str(tree), str(img), f"{size >> 10}k"],
        logfile,
    )
    img.rename(cache / "root.img")
    stamp = dict(tree_stamp)
    stamp.update(
        init_sha256=_digest(),
        kernel=_newest(tree, "vmlinuz-*").name,
        mkfs_seconds=round(time.monotonic() - t0, 1),
        image_bytes=size,
        image_allocated_bytes=os.stat(cache / "root.img").st_blocks * 512,
    )
    _write_json(cache / "image.json", stamp)
    log(f"image made in {stamp['mkfs_seconds']} s")
    paths = cached(cache)
    if paths is None:
        raise RuntimeError(f"{cache}: the image just built is not usable")
    return paths


if __name__ == "__main__":
    built = build(rebuild="--rebuild" in sys.argv[1:])
    print(json.dumps({k: str(v) for k, v in vars(built).items() if k != "stamp"}, indent=1))
    print(json.dumps(built.stamp, indent=1))
