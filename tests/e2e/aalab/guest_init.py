#!/usr/bin/python3 -u
"""PID 1 of the aalab guest (baked into the image as /sbin/qlab-init; stdlib only).

PID 1 forks one worker and only reaps: daemonised QEMUs and libvirtd are re-parented to
it and must not linger as zombies, and reaping in the worker would steal the exit status
of subprocess.run's own children.  Whatever happens (a failed step, an exception, the
``qlab.timeout=`` deadline from the kernel command line) PID 1 ends with sync and a power
off: if it exited the kernel would panic.

The worker writes one JSON line per step to /dev/ttyS1 (the second serial port, which
the host reads from its own file, never mixed with kernel messages on ttyS0):
``{"step": NAME, "ok": BOOL, "seconds": S, "uptime": U, "data": {...}, "error": TEXT}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = "/dev/ttyS1"
PAYLOAD_DEV = "/dev/vdb"
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LC_ALL": "C.UTF-8",
    "LIBVIRT_DEFAULT_URI": "qemu:///system",
    "QLAB_RESULTS": RESULTS,
    "QLAB_OUT": "/payload/out",
    "PYTHONPATH": "/payload",
}
TAIL = 3000
_port: dict[str, int] = {}  # the results port, opened once


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def emit(record: dict[str, Any]) -> None:
    if "fd" not in _port:
        try:
            _port["fd"] = os.open(RESULTS, os.O_WRONLY | os.O_NOCTTY)
        except OSError as exc:
            print(f"qlab-init: cannot open {RESULTS}: {exc}", flush=True)
            return
    record.setdefault("uptime", round(uptime(), 2))
    # One write() per line: the payload's steps write to the same port.
    os.write(_port["fd"], (json.dumps(record) + "\n").encode())
    print(f"qlab-init: {record['step']} ok={record.get('ok')}", flush=True)


def sh(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        errors="replace",
        env=ENV,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


class Fail(Exception):
    pass


def step(name: str, fn: Callable[[], dict[str, Any] | None]) -> bool:
    t0 = time.monotonic()
    record: dict[str, Any] = {"step": name, "ok": True, "data": {}}
    try:
        record["data"] = fn() or {}
    except Exception as exc:
        record.update(ok=False, error=f"{type(exc).__name__}: {exc}"[-TAIL:])
    record["seconds"] = round(time.monotonic() - t0, 2)
    emit(record)
    return bool(record["ok"])


def is_mount(path: str) -> bool:
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    return any(line.split()[1] == path for line in lines)


def mount(fstype: str, target: str, opts: str = "", source: str | None = None) -> None:
    if os.path.exists("/proc/self/mounts") and is_mount(target):
        return  # the initramfs moved /dev, /proc, /sys and /run here already
    os.makedirs(target, exist_ok=True)
    argv = ["mount", "-t", fstype, *(["-o", opts] if opts else []), source or fstype, target]
    r = sh(argv)
    if r.returncode != 0:
        raise Fail(f"{' '.join(argv)}: {r.stderr.strip()}")


def boot_facts() -> dict[str, Any]:
    sec = Path("/sys/kernel/security")
    return {
        "boot_to_init": round(uptime(), 2),
        "kernel": os.uname().release,
        "cmdline": Path("/proc/cmdline").read_text().strip(),
        "lsm": (sec / "lsm").read_text().strip() if (sec / "lsm").exists() else None,
        "apparmor_enabled": Path("/sys/module/apparmor/parameters/enabled").read_text().strip(),
        "ptrace_scope": Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip(),
    }


def mounts() -> dict[str, Any]:
    mount("proc", "/proc", "nosuid,nodev,noexec")
    mount("sysfs", "/sys", "nosuid,nodev,noexec")
    mount("devtmpfs", "/dev", "mode=0755,nosuid", "udev")
    mount("securityfs", "/sys/kernel/security", "nosuid,nodev,noexec")
    mount("devpts", "/dev/pts", "gid=5,mode=620,ptmxmode=000")
    mount("tmpfs", "/dev/shm", "nosuid,nodev,mode=1777")
    mount("tmpfs", "/run", "nosuid,nodev,mode=0755")
    mount("tmpfs", "/tmp", "nosuid,nodev,mode=1777")
    mount("cgroup2", "/sys/fs/cgroup", "nosuid,nodev,noexec,nsdelegate")
    for d in ("/run/lock", "/run/libvirt", "/var/log/libvirt"):
        os.makedirs(d, exist_ok=True)
    # Every audit line must reach dmesg: kauditd prints through printk_ratelimit().
    Path("/proc/sys/kernel/printk_ratelimit").write_text("0\n")
    sh(["hostname", "aalab"])
    return boot_facts()


def payload() -> dict[str, Any]:
    mount("ext4", "/payload", "rw", PAYLOAD_DEV)
    os.makedirs("/payload/out", exist_ok=True)
    return {"files": sorted(os.listdir("/payload"))}


def profile_files() -> list[str]:
    skip = (".dpkg-new", ".dpkg-old", ".dpkg-dist", ".dpkg-bak", ".dpkg-remove", "~")
    base = Path("/etc/apparmor.d")
    disabled = {p.name for p in (base / "disable").glob("*")}
    return [
        str(p)
        for p in sorted(base.iterdir())
        if p.is_file() and not p.name.endswith(skip) and p.name not in {"README", *disabled}
    ]


def apparmor() -> dict[str, Any]:
    files = profile_files()
    # As apparmor.service does, minus the cache: the root disk is a throw-away snapshot.
    r = sh(["apparmor_parser", "--replace", "--", *files], timeout=600)
    loaded = Path("/sys/kernel/security/apparmor/profiles").read_text().splitlines()
    names = sorted(line.rsplit(" (", 1)[0] for line in loaded)
    info = {"files": [Path(f).name for f in files], "profiles": names, "out": r.stderr[-TAIL:]}
    if r.returncode != 0:
        raise Fail(f"apparmor_parser exited {r.returncode}: {r.stderr[-TAIL:]}")
    if "libvirtd" not in names:
        raise Fail(f"no libvirtd profile loaded; loaded: {names}")
    return info


def pid_label(pidfile: str) -> str:
    pid = Path(pidfile).read_text().strip()
    return Path(f"/proc/{pid}/attr/current").read_text().strip()


def daemons() -> dict[str, Any]:
    # In libvirtd.conf, not LIBVIRT_LOG_OUTPUTS: virt-aa-helper inherits that variable and
    # its profile denies it the log file (a denial of the harness, not of the product).
    with open("/etc/libvirt/libvirtd.conf", "a", encoding="utf-8") as conf:
        conf.write('\nlog_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n')
    for argv in (["virtlogd", "-d"], ["libvirtd", "-d"]):
        r = subprocess.run(argv, env=ENV, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise Fail(f"{argv[0]} exited {r.returncode}: {r.stderr[-TAIL:]}")
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < 180:
        r = sh(["virsh", "-c", "qemu:///system", "version"], timeout=60)
        if r.returncode == 0:
            return {
                "ready_after": round(time.monotonic() - t0, 2),
                "version": r.stdout.strip(),
                "libvirtd_label": pid_label("/run/libvirtd.pid"),
            }
        last = r.stderr
        time.sleep(0.5)
    raise Fail(f"libvirtd does not answer after 180 s: {last[-TAIL:]}")


def run_payload() -> dict[str, Any]:
    run = Path("/payload/run")
    if not run.exists():
        raise Fail("no /payload/run")
    # stdout/stderr stay on the console: the host shows its tail on failure.
    r = subprocess.run([str(run)], env=ENV, cwd="/payload", stdin=subprocess.DEVNULL, check=False)
    if r.returncode != 0:
        raise Fail(f"/payload/run exited {r.returncode}")
    return {"returncode": r.returncode}


def save_logs() -> dict[str, Any]:
    dest = Path("/payload/out/guest-logs")
    dest.mkdir(parents=True, exist_ok=True)
    for src in ("/var/log/libvirt",):
        if os.path.isdir(src):
            sh(["cp", "-a", src, str(dest)])
    (dest / "dmesg.txt").write_text(sh(["dmesg"]).stdout)
    return {}


def worker() -> int:
    ok = step("mounts", mounts)
    ok = ok and step("payload", payload)
    ok = ok and step("apparmor", apparmor)
    ok = ok and step("daemons", daemons)
    ok = ok and step("run", run_payload)
    if is_mount("/payload"):
        step("logs", save_logs)
    return 0 if ok else 1


def timeout_from_cmdline() -> float:
    for word in Path("/proc/cmdline").read_text().split():
        if word.startswith("qlab.timeout="):
            return float(word.split("=", 1)[1])
    return 900.0


def poweroff() -> None:
    os.sync()
    try:
        Path("/proc/sysrq-trigger").write_text("o\n")
    except OSError as exc:
        print(f"qlab-init: sysrq poweroff: {exc}", flush=True)
    while True:  # never return: PID 1 exiting is a kernel panic
        time.sleep(60)


def pid1() -> None:
    try:
        if not is_mount("/proc"):
            os.makedirs("/proc", exist_ok=True)
            subprocess.run(["mount", "-t", "proc", "proc", "/proc"], check=False)
        start = uptime()
        emit({"step": "init", "ok": True, "seconds": 0, "data": {"boot_to_init": start}})
        deadline = time.monotonic() + timeout_from_cmdline() - start
        child = os.fork()
        if child == 0:
            os.setsid()
            try:
                code = worker()
            except BaseException as exc:
                emit({"step": "worker", "ok": False, "error": repr(exc)})
                code = 2
            os._exit(code)
        status = None
        while status is None:
            if time.monotonic() > deadline:
                emit({"step": "timeout", "ok": False, "error": "qlab.timeout reached"})
                if is_mount("/payload"):
                    step("logs", save_logs)  # what libvirt was doing while it hung
                break
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == child:
                status = os.waitstatus_to_exitcode(st)
            elif pid == 0:
                time.sleep(0.2)
        emit({"step": "poweroff", "ok": status == 0, "data": {"worker_status": status}})
    except BaseException as exc:
        print(f"qlab-init: {exc!r}", flush=True)
    finally:
        poweroff()


if __name__ == "__main__":
    if os.getpid() == 1:
        pid1()
    else:
        sys.exit(worker())
