"""The Debian 13 root filesystem for the libvirt 11 + QEMU 10 lab: built once, cached.

The tree is built under ``<cache>/trixie.partial`` and renamed to ``<cache>/trixie`` only
when every step succeeded, so an interrupted build is never taken for a cached one.
Nothing here runs libvirt: apt's maintainer scripts run in a private mount and pid
namespace with only ``/proc`` and a tmpfs ``/run`` mounted, and the tree's own static
``/dev`` from debootstrap (binding the host ``/dev`` let systemd-tmpfiles regroup the
host's ``/dev/kvm``: shared/reference/libvirt11-chroot/README.md, obstacle 2).

Usage: python3 rootfs.py [--rebuild] [CACHE_DIR]
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
CACHE = Path("/var/cache/qemu-locked-lab")
SUITE = "trixie"
# python3: the in-tree init and qemu-locked itself (libvirt runs it as the emulator);
# python3-typer, -lxml, -portalocker: qemu-lockctl on each host of the two-host lab;
# libvirt-daemon-lock, -plugin-lockd: virtlockd and its plugin, libvirt's own lock manager there
# (the anchor).
PACKAGES = (
    "libvirt-daemon-system",
    "libvirt-clients",
    "libvirt-daemon-lock",
    "libvirt-daemon-plugin-lockd",
    "qemu-system-x86",
    "qemu-utils",
    "tini",
    "procps",
    "python3",
    "python3-typer",
    "python3-lxml",
    "python3-portalocker",
    "sanlock",  # the two-host lab: a sanlock daemon per host
    "python3-sanlock",
)
STAMP = "qemu-locked-lab.json"


def log(msg: str) -> None:
    sys.stderr.write(f"[lab11] {msg}\n")


def host_mirror() -> str:
    """The Debian mirror the host itself uses (deb822 or one-line sources)."""
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.exists():
        for line in deb822.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1].rstrip("/")
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "/debian" in parts[1]:
                return parts[1].rstrip("/")
    return "http://deb.debian.org/debian"


def write_sources(root: Path, mirror: str, suite: str) -> None:
    """The tree's apt sources: the suite, its updates and its security archive."""
    security = mirror.rsplit("/debian", 1)[0] + "/debian-security"
    (root / "etc/apt/sources.list").write_text(
        f"deb {mirror} {suite} main\n"
        f"deb {mirror} {suite}-updates main\n"
        f"deb {security} {suite}-security main\n"
    )


def install_packages(root: Path, packages: tuple[str, ...], logfile: Path) -> None:
    """apt-get install in the tree, in a private mount+pid namespace (nsinit.py apt)."""
    nsinit = Path(__file__).resolve().parent / "nsinit.py"
    unshare = ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "--"]
    run_logged([*unshare, sys.executable, str(nsinit), "apt", str(root), *packages], logfile)


def tree_facts(root: Path) -> tuple[list[str], str]:
    """(package=version of everything installed, the tree's size in bytes)."""
    versions = subprocess.run(
        ["chroot", str(root), "dpkg-query", "-W", "-f=${Package}=${Version}\n"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    size = subprocess.run(
        ["du", "-sxb", str(root)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    return versions, size


def cached(cache: Path = CACHE) -> Path | None:
    """The finished tree, or None when it has to be built."""
    root = cache / SUITE
    stamp = root / "etc" / STAMP
    if not stamp.exists():
        return None
    data = json.loads(stamp.read_text())
    if tuple(data.get("packages", ())) != PACKAGES:
        return None
    return root


def run_logged(cmd: list[str], logfile: Path) -> None:
    with logfile.open("ab") as out:
        out.write(("\n$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}, see {logfile}")


def built_once(
    cache: Path, cached: Callable[[], T | None], make: Callable[[], T], rebuild: bool
) -> T:
    """What ``cached()`` finds, else ``make()``'s, one builder at a time (a
    second one waits, then finds the first one's work)."""
    done = cached()
    if done is not None and not rebuild:
        return done
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".build-lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a lock file of ours, never an image
        done = cached()
        if done is not None and not rebuild:
            return done
        return make()


def build(cache: Path = CACHE, *, rebuild: bool = False) -> Path:
    """The cached tree, built first when missing (one builder at a time)."""
    return built_once(cache, lambda: cached(cache), lambda: _build(cache), rebuild)


def _build(cache: Path) -> Path:
    t0 = time.monotonic()
    partial = cache / (SUITE + ".partial")
    logfile = cache / "build.log"
    if partial.exists():
        shutil.rmtree(partial)
    logfile.write_bytes(b"")
    if shutil.which("debootstrap") is None:
        log("installing debootstrap on the host")
        run_logged(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "debootstrap"], logfile
        )
    mirror = host_mirror()
    log(f"debootstrap --variant=minbase {SUITE} {partial} {mirror}")
    run_logged(["debootstrap", "--variant=minbase", SUITE, str(partial), mirror], logfile)
    t_boot = time.monotonic() - t0
    write_sources(partial, mirror, SUITE)
    policy = partial / "usr/sbin/policy-rc.d"  # no service starts while apt runs
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    log("apt-get install " + " ".join(PACKAGES) + " (private mount+pid namespace)")
    install_packages(partial, PACKAGES, logfile)
    versions, size = tree_facts(partial)
    elapsed = time.monotonic() - t0
    (partial / "etc" / STAMP).write_text(
        json.dumps(
            {
                "packages": PACKAGES,
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "debootstrap_seconds": round(t_boot, 1),
                "build_seconds": round(elapsed, 1),
                "size_bytes": int(size),
                "versions": [
                    v for v in versions if v.split("=")[0] in PACKAGES or "libvirt-daemon=" in v
                ],
            },
            indent=1,
        )
    )
    final = cache / SUITE
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    log(f"built {final} in {elapsed:.0f} s ({int(size) / 1e6:.0f} MB)")
    return final


if __name__ == "__main__":
    args = sys.argv[1:]
    rebuild = "--rebuild" in args
    rest = [a for a in args if a != "--rebuild"]
    print(build(Path(rest[0]) if rest else CACHE, rebuild=rebuild))
