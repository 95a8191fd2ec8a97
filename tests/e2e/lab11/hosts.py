"""Two libvirt 11.3 hosts on one machine (issue 22), from lab11's Debian 13 tree.

Each host is a lab of its own (harness.Lab): its own mount, pid, ipc, UTS (hostname
host-a / host-b) and cgroup namespaces, its own libvirtd and virtlogd, its own
libvirt configuration and state (/etc/libvirt, /var/lib/libvirt, /var/log/libvirt:
host directories bound over the tree's), and its own host UUID.  What they share, as
two hosts on one storage do: the images directory and qemu-locked's lockspace (bind
mounts of one host directory: a filesystem whose locks reach both, like NFSv4), and
one network namespace of their own (the second host joins the first's), where each
libvirtd listens on its own TCP port on 127.0.0.1 and QEMU migrates on its own port
range: nothing reaches the machine's network.  Everything is made under ``work`` and
gone with it; the daemons go with their namespaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
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
            if self.lockd:
                f.write('lock_manager = "lockd"\n')
        if self.lockd:
            (etc / "lab-lockd").touch()
            with (etc / "qemu-lockd.conf").open("a") as f:
                f.write(f'\nauto_disk_leases = 1\nrequire_lease_for_disks = 1\n'
                        f'file_lockspace_dir = "{LOCKD_FILES}"\n')  # fmt: skip
        state = d / "var-lib-libvirt"
        shutil.copytree(root / "var/lib/libvirt", state, symlinks=True)
        logs = d / "var-log-libvirt"
        logs.mkdir(parents=True)
        shutil.copystat(root / "var/log/libvirt", logs)
        return (
            (str(etc), "/etc/libvirt"),
            (str(state), "/var/lib/libvirt"),
            (str(logs), "/var/log/libvirt"),
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
        first = None
        for host in PORTS:
            lab = Lab(host=host, binds=self._host_dirs(root, host), net_of=first)
            self.hosts[host] = lab.start()
            first = first or lab
        return self

    def lockctl(self, host: str, backend: str, *args: str) -> subprocess.CompletedProcess[str]:
        """qemu-lockctl as that host's admin runs it (its namespaces, its tree)."""
        return self.hosts[host].run("env", f"QEMU_LOCKED_BACKEND={backend}", *LOCKCTL, *args)

    def stop(self) -> None:
        for lab in reversed(list(self.hosts.values())):
            lab.stop()
        self.hosts = {}

    def __enter__(self) -> TwoHosts:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
