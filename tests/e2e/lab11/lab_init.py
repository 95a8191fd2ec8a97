"""The lab's init, run by the tree's python3 under tini (PID 1 of the lab's pid namespace).

Starts virtlogd and libvirtd (pinned to CPU 0: no re-probe of every emulator when the host
CPU set seems to change), prints ``ready`` on stdout once libvirtd answers, then runs the
command given, or waits until stdin is closed.  Afterwards: every running domain is
destroyed, the daemons get SIGTERM (SIGKILL after 10 s), and its exit status is the
command's.  When it exits, the kernel kills whatever is left in the namespace.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

STATE = "/run/qemu-locked-lab"
LOGS = "/var/log/qemu-locked-lab"


def say(msg: str) -> None:
    sys.stderr.write(f"[lab-init] {msg}\n")
    sys.stderr.flush()


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", *args], capture_output=True, text=True, check=False)


def start_daemons() -> None:
    for d in (STATE, LOGS, "/run/libvirt", "/run/lock"):
        os.makedirs(d, exist_ok=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=False, capture_output=True)
    env = dict(os.environ, LIBVIRT_LOG_OUTPUTS=f"3:file:{LOGS}/libvirtd.log")
    subprocess.run(["virtlogd", "-d", "-p", f"{STATE}/virtlogd.pid"], check=True)
    if os.path.exists("/etc/libvirt/lab-lockd"):  # lock_manager = "lockd" on this host
        subprocess.run(["virtlockd", "-d", "-p", f"{STATE}/virtlockd.pid"], check=True)
    # A host of the two-host lab listens on TCP (its libvirtd.conf says where).
    listen = ["--listen"] if os.path.exists("/etc/libvirt/lab-listen") else []
    subprocess.run(
        ["taskset", "-c", "0", "libvirtd", "-d", *listen, "-p", f"{STATE}/libvirtd.pid"],
        check=True,
        env=env,
    )
    for _ in range(300):
        if virsh("list").returncode == 0:
            return
        time.sleep(0.05)
    raise SystemExit(f"libvirtd does not answer, see {LOGS}/libvirtd.log")


def stop(pidfile: str) -> None:
    try:
        with open(pidfile, encoding="ascii") as f:
            pid = int(f.read())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.1)
    say(f"{pidfile}: still running 10 s after SIGTERM, SIGKILL")
    os.kill(pid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    os.environ["LIBVIRT_DEFAULT_URI"] = "qemu:///system"
    os.chdir("/root")
    start_daemons()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if argv:
        rc = subprocess.run(argv, check=False).returncode
    else:
        sys.stdin.read()  # the harness closes our stdin when it is done
        rc = 0
    for name in virsh("list", "--name").stdout.split():
        virsh("destroy", name)
    stop(f"{STATE}/libvirtd.pid")
    stop(f"{STATE}/virtlockd.pid")
    stop(f"{STATE}/virtlogd.pid")
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
