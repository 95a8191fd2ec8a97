"""Inside the lab's fresh namespaces (mount, pid, ipc, uts, cgroup, net): build the tree's
mounts, pivot_root into it and exec tini + the in-tree init.

Called by nsinit.py as PID 1 of the new pid namespace, still on the host's root.  Every
mount is made in the private mount namespace, so none reaches the host; /dev is a tmpfs of
our own with fresh nodes (a chown/chmod by libvirt or systemd-tmpfiles on them can never
reach the host's nodes), and devpts is a new instance.
"""

from __future__ import annotations

import os
import stat

from nsinit import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    mount,
    pivot_root,
    sethostname,
    umount,
)

DEV_NODES = (
    ("null", 1, 3, 0o666),
    ("zero", 1, 5, 0o666),
    ("full", 1, 7, 0o666),
    ("random", 1, 8, 0o666),
    ("urandom", 1, 9, 0o666),
    ("tty", 5, 0, 0o666),
    ("ptmx", 5, 2, 0o666),
)
IGNORED_CGROUP_OPTS = {
    "rw",
    "ro",
    "relatime",
    "noatime",
    "nosuid",
    "nodev",
    "noexec",
    "clone_children",
}


def _group_id(root: str, name: str) -> int:
    with open(f"{root}/etc/group", encoding="utf-8") as f:
        for line in f:
            parts = line.split(":")
            if parts[0] == name:
                return int(parts[2])
    raise LookupError(f"group {name} not in the tree")


def _cgroup_mounts() -> list[tuple[str, str, str]]:
    """(target, fstype, options) of every cgroup hierarchy mounted on the host."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            target = left.split()[4]
            fstype, _src, opts = right.split()[:3]
            if fstype in ("cgroup", "cgroup2"):
                out.append((target, fstype, opts))
    return out


def _mount_cgroups(root: str, hierarchies: list[tuple[str, str, str]]) -> None:
    base = f"{root}/sys/fs/cgroup"
    mount("cgroup_root", base, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=1m")
    for target, fstype, opts in hierarchies:
        name = target.rstrip("/").rsplit("/", 1)[-1]
        where = f"{base}/{name}"
        os.makedirs(where, exist_ok=True)
        if fstype == "cgroup2":
            mount("cgroup2", where, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            continue
        keep = [o for o in opts.split(",") if o not in IGNORED_CGROUP_OPTS]
        if keep and all(o.startswith("name=") for o in keep):
            keep.insert(0, "none")  # a named hierarchy without controllers
        # inside the cgroup namespace a fresh mount shows our own cgroup as its root
        mount("cgroup", where, "cgroup", MS_NOSUID | MS_NODEV | MS_NOEXEC, ",".join(keep))


def _make_dev(root: str, blocks: list[tuple[str, ...]]) -> None:
    dev = f"{root}/dev"
    mount("dev", dev, "tmpfs", MS_NOSUID, "mode=0755,size=4m")
    for name, major, minor, group in blocks:  # the shared storage's block devices
        os.mknod(f"{dev}/{name}", stat.S_IFBLK | 0o660, os.makedev(int(major), int(minor)))
        os.chown(f"{dev}/{name}", 0, _group_id(root, group))
        os.chmod(f"{dev}/{name}", 0o660)
    for name, major, minor, mode in DEV_NODES:
        os.mknod(f"{dev}/{name}", stat.S_IFCHR | mode, os.makedev(major, minor))
        os.chmod(f"{dev}/{name}", mode)
    if os.path.exists("/dev/kvm"):
        os.mknod(f"{dev}/kvm", stat.S_IFCHR | 0o660, os.makedev(10, 232))
        os.chown(f"{dev}/kvm", 0, _group_id(root, "kvm"))  # the tree's kvm group
        os.chmod(f"{dev}/kvm", 0o660)
    for sub in ("pts", "shm", "mqueue"):
        os.mkdir(f"{dev}/{sub}")
    mount(
        "devpts",
        f"{dev}/pts",
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    )
    mount("shm", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("mqueue", f"{dev}/mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.symlink("/proc/self/fd", f"{dev}/fd")
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"{dev}/{name}")


def enter_lab(root: str, pidfile: str, argv: list[str]) -> None:
    """argv: [--host NAME] [--bind SRC:DST]... [--blk NAME:MAJOR:MINOR:GROUP]... --
    init args.  Never returns.

    ``--host``: the lab's hostname (a host of the two-host lab); ``--bind``: a
    host directory put over DST in the tree, in this mount namespace only (a
    host's own libvirt state, or the storage both hosts share); ``--blk``: a
    block device node in the lab's /dev (a LUN both hosts see), group GROUP."""
    hostname, binds, blocks = "qemu-locked-lab", [], []
    while argv and argv[0] in ("--host", "--bind", "--blk"):
        if argv[0] == "--host":
            hostname = argv[1]
        elif argv[0] == "--bind":
            binds.append(tuple(argv[1].split(":", 1)))
        else:
            blocks.append(tuple(argv[1].split(":")))
        argv = argv[2:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    with open("/proc/self/stat", encoding="ascii") as f:
        host_pid = f.read().split()[0]  # the host's /proc is still mounted here: host pid
    with open(pidfile, "w", encoding="ascii") as f:
        f.write(host_pid + "\n")
    sethostname(hostname)
    hierarchies = _cgroup_mounts()  # before our own mounts add copies
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    mount(root, root, None, MS_BIND)  # a mount point, as pivot_root wants
    for src, dst in binds:
        os.makedirs(f"{root}{dst}", exist_ok=True)
        mount(src, f"{root}{dst}", None, MS_BIND)
    mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("/sys", f"{root}/sys", None, MS_BIND)
    mount(
        "none",
        f"{root}/sys",
        None,
        MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
    )
    _mount_cgroups(root, hierarchies)
    _make_dev(root, blocks)
    mount("run", f"{root}/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64m")
    mount("tmp", f"{root}/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    os.makedirs(f"{root}/.oldroot", exist_ok=True)
    os.chdir(root)
    pivot_root(".", ".oldroot")
    os.chdir("/")
    umount("/.oldroot", MNT_DETACH)
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C",
        "HOME": "/root",
    }
    env["TERM"] = os.environ.get("TERM", "dumb")
    os.execve(
        "/usr/bin/tini",
        ["tini", "-g", "--", "/usr/bin/python3", "/usr/local/sbin/qemu-locked-lab-init", *argv],
        env,
    )
