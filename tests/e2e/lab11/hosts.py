"""Two libvirt 11.3 hosts on one machine (issue 22), from lab11's Debian 13 tree.

Each host is a lab of its own (harness.Lab): its own mount, pid, ipc, UTS (hostname
host-a / host-b) and cgroup namespaces, its own libvirtd and virtlogd, its own
libvirt configuration and state (/etc/libvirt, /var/lib/libvirt, /var/log/libvirt:
host directories bound over the tree's), and its own host UUID.  What they share, as
two hosts on one storage do: the images directory and qemu-locked's lockspace (bind
mounts of one host directory: a filesystem whose locks reach both, like NFSv4), and
one network namespace of their own (the second host joins the first's), where each
libvirtd listens on its own TCP port on 127.0.0.1 and QEMU migrates on its own port
range: nothing reaches the machine's network.  Two loop devices play the LUNs both
hosts see (a node in each host's /dev): ``/dev/qlk-disk``, a disk for VMs, and
``/dev/qlk-sanlock``, sanlock's lockspace and lease area, with a sanlock daemon per
host (host ids 1 and 2, no watchdog).  Everything is made under ``work`` and gone
with it (the loop devices detached); the daemons go with their namespaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from e2e.lab11 import rootfs
from e2e.lab11.harness import LOCKSPACE_MODE, Lab, _tree_gid

IMAGES = "/var/lib/libvirt/images/shared"  # in each host's tree
LOCKSPACE = "/var/lib/qemu-locked/lockspace"
LOCKD_FILES = "/var/lib/libvirt/lockd/files"  # virtlockd's leases (lock_manager = "lockd")
LOCKCTL = ("python3", "-c", "import sys; sys.path.insert(0, '/opt/qemu-locked/src'); "
           "from qemu_locked.admin.cli import main; main()")  # fmt: skip
PORTS = {"host-a": 16509, "host-b": 16510}
MIGRATION_PORTS = {"host-a": (49152, 49171), "host-b": (49200, 49219)}
HOST_IDS = {"host-a": 1, "host-b": 2}  # sanlock host ids
BLOCK_DISK = "/dev/qlk-disk"  # in each host's /dev: one loop device, a LUN for VMs
SANLOCK_DEV = "/dev/qlk-sanlock"  # the lockspace, then the lease area
SANLOCK_SLOTS = 32


class TwoHosts:
    """``lockd``: libvirt's own lock manager instead (virtlockd on each host, its
    leases in one shared directory), the anchor qemu-locked is compared with."""

    def __init__(self, work: Path, lockd: bool = False) -> None:
        self.work = work
        self.lockd = lockd
        self.images = work / "shared-images"
        self.lockspace = work / "shared-lockspace"
        self.lockd_files = work / "shared-lockd"
        self.hosts: dict[str, Lab] = {}
        self.loops: dict[str, str] = {}  # /dev path in the hosts -> the machine's loop device
        self.sanlocks: list[subprocess.Popen[bytes]] = []

    def uri(self, host: str) -> str:
        """How one libvirtd reaches the other (virsh migrate --p2p)."""
        return f"qemu+tcp://127.0.0.1:{PORTS[host]}/system"

    def _host_dirs(self, root: Path, host: str) -> tuple[tuple[str, str], ...]:
        d = self.work / host
        etc = d / "etc-libvirt"
        shutil.copytree(root / "etc/libvirt", etc, symlinks=True)
        (etc / "lab-listen").touch()
        with (etc / "libvirtd.conf").open("a") as f:
            f.write(f'\nlisten_tls = 0\nlisten_tcp = 1\nlisten_addr = "127.0.0.1"\n'
                    f'tcp_port = "{PORTS[host]}"\nauth_tcp = "none"\n'
                    f'host_uuid = "{uuid.uuid4()}"\n')  # fmt: skip
        low, high = MIGRATION_PORTS[host]
        with (etc / "qemu.conf").open("a") as f:
            f.write(f"\nmigration_port_min = {low}\nmigration_port_max = {high}\n")
            # libvirt gives QEMU a /dev of its own with the domain's devices and these:
            # the wrapper reads sanlock's lockspace (the holders' names) in there.
            f.write('cgroup_device_acl = ["/dev/null", "/dev/full", "/dev/zero", "/dev/random", '
                    '"/dev/urandom", "/dev/ptmx", "/dev/kvm", "/dev/userfaultfd", '
                    f'"{SANLOCK_DEV}"]\n')  # fmt: skip
            if self.lockd:
                f.write('lock_manager = "lockd"\n')
        if self.lockd:
            (etc / "lab-lockd").touch()
            with (etc / "qemu-lockd.conf").open("a") as f:
                f.write(f'\nauto_disk_leases = 1\nrequire_lease_for_disks = 1\n'
                        f'file_lockspace_dir = "{LOCKD_FILES}"\n')  # fmt: skip
        # this host's qemu-locked settings: its sanlock host id
        conf = d / "etc-qemu-locked"
        conf.mkdir()
        (conf / "qemu-locked.toml").write_text(
            f'emulator = "/usr/bin/qemu-system-x86_64"\nsanlock_lockspace = "qlk"\n'
            f'sanlock_path = "{SANLOCK_DEV}"\nsanlock_host_id = {HOST_IDS[host]}\n'
            "sanlock_io_timeout = 2\n"
        )  # fmt: skip
        conf.chmod(0o755)
        (conf / "qemu-locked.toml").chmod(0o644)
        state = d / "var-lib-libvirt"
        shutil.copytree(root / "var/lib/libvirt", state, symlinks=True)
        logs = d / "var-log-libvirt"
        logs.mkdir(parents=True)
        shutil.copystat(root / "var/log/libvirt", logs)
        return (
            (str(etc), "/etc/libvirt"),
            (str(state), "/var/lib/libvirt"),
            (str(logs), "/var/log/libvirt"),
            (str(conf), "/etc/qemu-locked"),
            (str(self.images), IMAGES),  # after /var/lib/libvirt: on top of it
            (str(self.lockspace), LOCKSPACE),
            (str(self.lockd_files), LOCKD_FILES),
        )

    def start(self) -> TwoHosts:
        root = rootfs.build(rootfs.CACHE)
        self.images.mkdir(parents=True)
        self.images.chmod(0o755)
        self.lockspace.mkdir()
        os.chown(self.lockspace, 0, _tree_gid(root, "libvirt-qemu"))
        self.lockspace.chmod(LOCKSPACE_MODE)
        self.lockd_files.mkdir(mode=0o700)
        blocks = (self._lun(BLOCK_DISK, 32, "disk"), self._lun(SANLOCK_DEV, SANLOCK_SLOTS + 2,
                                                              "libvirt-qemu"))  # fmt: skip
        first = None
        for host in PORTS:
            lab = Lab(host=host, binds=self._host_dirs(root, host), blocks=blocks, net_of=first)
            self.hosts[host] = lab.start()
            first = first or lab
        if not self.lockd:
            self._start_sanlock()
        return self

    def _lun(self, node: str, mib: int, group: str) -> tuple[str, int, int, str]:
        """A loop device over a sparse file: (its name in /dev, major, minor, group)."""
        backing = self.work / f"lun-{Path(node).name}.img"
        with backing.open("wb") as f:
            f.truncate(mib << 20)
        dev = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
        self.loops[node] = dev
        rdev = os.stat(dev).st_rdev
        return (Path(node).name, os.major(rdev), os.minor(rdev), group)

    def _start_sanlock(self) -> None:
        """A sanlock daemon in each host (no watchdog, its name its hostname), the
        lockspace written once from host A, then joined by both at once."""
        for host, lab in self.hosts.items():
            log = (self.work / host / "sanlock.log").open("ab")
            self.sanlocks.append(lab.spawn(
                "env", "SANLOCK_PRIVILEGED=0", "sanlock", "daemon", "-D", "-w", "0", "-l", "0",
                "-h", "0", "-U", "root", "-G", "libvirt-qemu", "-e", host, out=log))  # fmt: skip
            log.close()
            sock = lab.path_in_ns("/run/sanlock/sanlock.sock")
            deadline = time.monotonic() + 10
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        r = self.lockctl("host-a", "sanlock", "sanlock", "init", "--slots", str(SANLOCK_SLOTS))
        assert r.returncode == 0, r.stderr
        with ThreadPoolExecutor(2) as pool:
            joins = list(pool.map(lambda h: self.lockctl(h, "sanlock", "sanlock", "join"),
                                  self.hosts))  # fmt: skip
        for r in joins:
            assert r.returncode == 0, r.stderr

    def lockctl(self, host: str, backend: str, *args: str) -> subprocess.CompletedProcess[str]:
        """qemu-lockctl as that host's admin runs it (its namespaces, its tree)."""
        return self.hosts[host].run("env", f"QEMU_LOCKED_BACKEND={backend}", *LOCKCTL, *args)

    def stop(self) -> None:
        for lab in reversed(list(self.hosts.values())):
            lab.stop()  # the sanlock daemons end with their pid namespaces
        for p in self.sanlocks:
            p.wait(30)
        self.hosts, self.sanlocks = {}, []
        for dev in self.loops.values():
            subprocess.run(["losetup", "-d", dev], check=False)
        self.loops = {}

    def __enter__(self) -> TwoHosts:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
