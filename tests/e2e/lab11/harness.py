"""Host side of the libvirt 11 + QEMU 10 lab (Debian 13 tree, private namespaces).

    with Lab(repo=...) as lab:           # builds/reuses the cached tree, starts the daemons
        lab.virsh("define", "/images/x.xml")
        lab.path("/var/lib/libvirt/images")  # the same directory, seen from the host

The lab's own cgroup in every hierarchy (``<our cgroup>/qemu-locked-lab.PID``) becomes the
root of its cgroup namespace, so libvirt's ``/machine`` tree lands inside it, never in the
host's ``/machine`` (a second libvirtd there would collide by name).  The package is copied
to /opt/qemu-locked/src in the tree (readable by libvirt-qemu whatever the checkout's
permissions); /usr/local/bin/qemu-locked runs it with the tree's python3 (the start path
needs nothing beyond the standard library).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from e2e.lab11 import rootfs

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]

LOCKSPACE_MODE = 0o2770  # as qemu-lockctl lockspace init makes it (admin.lockspace.DIR_MODE)
SRC_IN_TREE = "/opt/qemu-locked/src"
LAUNCHER = f"""#!/usr/bin/python3 -IS
# qemu-locked inside the lab: the repo bound read-only at {SRC_IN_TREE}
import sys
sys.path.insert(0, "{SRC_IN_TREE}")
from qemu_locked.start.wrapper import main
main()
"""
CONFIG = 'emulator = "/usr/bin/qemu-system-x86_64"\n'


def _tree_gid(root: Path, group: str) -> int:
    for line in (root / "etc/group").read_text().splitlines():
        parts = line.split(":")
        if parts[0] == group:
            return int(parts[2])
    raise LabError(f"no group {group} in the tree")


class LabError(Exception):
    pass


def _write_if_changed(path: Path, text: str, mode: int) -> None:
    """A new ctime on the emulator makes libvirt re-probe it: rewrite only on change."""
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.rename(path)


def _cgroup_places() -> list[tuple[str, str]]:
    """(mount point, our place) for every hierarchy we are in, read once (the file
    changes under us as we move)."""
    mounts: dict[str, str] = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            fstype, _src, opts = right.split()[:3]
            if fstype == "cgroup2":
                mounts.setdefault("", left.split()[4])
            elif fstype == "cgroup":
                for o in opts.split(","):
                    if o not in ("rw", "ro") and not o.startswith("release_agent"):
                        mounts[o] = left.split()[4]
    out = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _hid, ctrls, place = line.split(":", 2)
        key = ctrls.split(",")[0] if ctrls else ""
        if key in mounts:
            out.append((mounts[key], place.rstrip("/")))
    return out


class Lab:
    """``host``/``binds``/``blocks``/``net_of``: a host of the two-host lab
    (hosts.py): its hostname, host directories over tree paths (its own libvirt
    state, the shared storage), block devices in its /dev ((name, major, minor,
    group): the LUNs both hosts see), and the lab whose network namespace it joins
    (both reach each other's libvirtd and QEMU on 127.0.0.1, and nothing else)."""

    def __init__(self, repo: Path = REPO, cache: Path = rootfs.CACHE, host: str = "",
                 binds: tuple[tuple[str, str], ...] = (),
                 blocks: tuple[tuple[str, int, int, str], ...] = (), net_of: Lab | None = None,
                 ) -> None:  # fmt: skip
        self.repo = repo
        self.cache = cache
        self.host, self.binds, self.blocks, self.net_of = host, binds, blocks, net_of
        self.root = Path()
        self.proc: subprocess.Popen[str] | None = None
        self.cgroups: list[Path] = []
        self.host_pid = 0

    # ------------------------------------------------------------------ set-up
    def _prepare_tree(self) -> None:
        r = self.root
        init = r / "usr/local/sbin/qemu-locked-lab-init"
        init.parent.mkdir(parents=True, exist_ok=True)
        _write_if_changed(init, (HERE / "lab_init.py").read_text(), 0o755)
        _write_if_changed(r / "usr/local/bin/qemu-locked", LAUNCHER, 0o755)
        (r / "etc/qemu-locked").mkdir(exist_ok=True)
        _write_if_changed(r / "etc/qemu-locked/qemu-locked.toml", CONFIG, 0o644)
        # what `qemu-lockctl lockspace init` makes: block devices need their device lease
        space = r / "var/lib/qemu-locked/lockspace"
        space.mkdir(parents=True, exist_ok=True)
        os.chown(space, 0, _tree_gid(r, "libvirt-qemu"))
        space.chmod(LOCKSPACE_MODE)
        for f in (r / "etc/libvirt/qemu/networks/autostart").glob("*.xml"):
            f.unlink()  # never autostart a network
        src = r / SRC_IN_TREE.lstrip("/")
        if src.exists():
            shutil.rmtree(src)
        shutil.copytree(
            self.repo / "qemu_locked", src / "qemu_locked",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )  # fmt: skip
        for d in [src, *src.rglob("*")]:
            d.chmod(0o755 if d.is_dir() else 0o644)
        for d in (src.parent, src.parent.parent):
            d.chmod(0o755)

    def _enter_cgroups(self) -> list[tuple[str, str]]:
        if not Path("/proc/self/ns/cgroup").exists():
            raise LabError("kernel without cgroup namespaces")
        places = _cgroup_places()
        # One per lab, even two labs of one test process named alike (two pairs of
        # hosts): a shared cgroup would give their libvirtds one /machine tree.
        name = f"qemu-locked-lab{'-' + self.host if self.host else ''}.{os.getpid()}.{id(self):x}"
        for mnt, place in places:
            d = Path(mnt + place) / name
            d.mkdir(exist_ok=True)
            self.cgroups.append(d)
            if (d / "cpuset.cpus").exists():
                (d / "cpuset.cpus").write_text((Path(mnt + place) / "cpuset.cpus").read_text())
                (d / "cpuset.mems").write_text((Path(mnt + place) / "cpuset.mems").read_text())
            (d / "cgroup.procs").write_text(str(os.getpid()))
        return places

    def _leave_cgroups(self, places: list[tuple[str, str]]) -> None:
        for mnt, place in places:
            (Path(mnt + place) / "cgroup.procs").write_text(str(os.getpid()))

    def start(self) -> Lab:
        if os.geteuid() != 0:
            raise LabError("the lab needs root")
        if _is_cgroup2_only():
            raise LabError("pure cgroup v2 host: not supported (see the README)")
        self.root = rootfs.build(self.cache)
        if self.net_of is None:  # the second host of a pair finds the tree ready
            self._prepare_tree()
        pidfile = self.cache / f"lab{'-' + self.host if self.host else ''}.pid"
        net = ["--net"] if self.net_of is None else []
        join = (
            ["nsenter", f"--net=/proc/{self.net_of.host_pid}/ns/net", "--"] if self.net_of else []
        )
        host = ["--host", self.host] if self.host else []
        binds = [a for src, dst in self.binds for a in ("--bind", f"{src}:{dst}")]
        binds += [a for b in self.blocks for a in ("--blk", ":".join(map(str, b)))]
        cmd = [
            *join, "unshare", "--mount", "--pid", "--ipc", "--uts", "--cgroup", *net, "--fork",
            "--propagation", "private", "--",
            sys.executable, str(HERE / "nsinit.py"), "lab", str(self.root), str(pidfile),
            *host, *binds, "--",
        ]  # fmt: skip
        places = self._enter_cgroups()
        try:
            # the cgroup namespace is rooted where unshare runs: in our new cgroups
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/"
            )
        finally:
            self._leave_cgroups(places)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise LabError(f"the lab did not come up (see {self.root}/var/log/qemu-locked-lab)")
        self.host_pid = int(pidfile.read_text())
        return self

    def stop(self) -> int:
        rc = 0
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            rc = self.proc.wait(timeout=60)
            self.proc = None
        for d in reversed(self.cgroups):
            for _ in range(50):  # rmdir is EBUSY for a moment after the last task left
                for sub in sorted(d.rglob("*"), key=lambda p: -len(p.parts)):
                    if sub.is_dir():
                        try:
                            sub.rmdir()
                        except OSError:
                            pass
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
        self.cgroups = []
        return rc

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ use
    @property
    def uri(self) -> str:
        return f"qemu:///system?socket=/proc/{self.host_pid}/root/run/libvirt/libvirt-sock"

    def path(self, tree_path: str) -> Path:
        """A path inside the running lab, as the host sees it."""
        return self.root / tree_path.lstrip("/")

    def virsh_cmd(self) -> list[str]:
        return [shutil.which("virsh") or "/usr/bin/virsh", "-q", "-c", self.uri]

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([*self.virsh_cmd(), *args], capture_output=True, text=True, timeout=120)
        if check and p.returncode != 0:
            raise LabError(f"virsh {' '.join(args)}: {p.stderr.strip()}")
        return p

    def _enter(self) -> list[str]:
        return ["nsenter", "-t", str(self.host_pid), "-m", "-p", "-u", "-i", "-n", "-C", "-r", "-w"]

    def run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        """A command inside the lab (its namespaces and root)."""
        return subprocess.run(
            [*self._enter(), *cmd], capture_output=True, text=True, timeout=120
        )  # fmt: skip

    def spawn(self, *cmd: str, out: IO[bytes]) -> subprocess.Popen[bytes]:
        """A daemon inside the lab, in the foreground of a process of ours: it ends
        with the lab's pid namespace at the latest."""
        return subprocess.Popen([*self._enter(), *cmd], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip

    def path_in_ns(self, path: str) -> Path:
        """A path in the lab's own mounts (/run, /dev), as the host reaches it."""
        return Path(f"/proc/{self.host_pid}/root{path}")


def _is_cgroup2_only() -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return not any(" - cgroup " in line for line in f)
