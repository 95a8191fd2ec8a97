"""A stand-in for qemu-system-* in tests and in ``make demo`` without QEMU.

Prints one JSON line: its argv, pid, and every inherited fd (beyond 0-2) with
the byte-0 locks its open file description carries (read from its own
/proc/self/fdinfo), then ``ready``; then waits for SIGTERM/SIGINT, or exits
at once with $FAKE_QEMU_EXIT.  With -daemonize it forks first, like QEMU,
and the parent exits once the child is ready.  $FAKE_QEMU_OUT names a file
that gets the same lines (stdout may belong to libvirt).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def inherited_fds() -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            with open(f"/proc/self/fdinfo/{fd}") as f:
                info = f.read()
        except OSError:
            continue
        locks = []
        for line in info.splitlines():
            if line.startswith("lock:"):
                parts = line.split()
                locks.append({"kind": parts[2], "mode": parts[4], "start": int(parts[7])})
        out.append({"fd": fd, "path": target, "locks": locks})
    return out


def main() -> None:
    with open("/proc/self/status") as f:
        sigign = next((ln.split()[1] for ln in f if ln.startswith("SigIgn:")), "")
    report = {"argv": sys.argv, "pid": os.getpid(), "fds": inherited_fds(), "sigign": sigign}
    daemonize = "-daemonize" in sys.argv[1:]
    if daemonize:
        r, w = os.pipe()
        if os.fork() > 0:
            os.close(w)
            os.read(r, 1)  # like QEMU: the parent returns once the child is up
            os._exit(0)
        os.close(r)
        os.setsid()
        report["pid"] = os.getpid()
        os.write(w, b"x")
        os.close(w)
    text = json.dumps(report) + "\nready\n"
    out_path = os.environ.get("FAKE_QEMU_OUT")
    if out_path:
        with open(out_path, "a") as f:
            f.write(text)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError:
        pass
    code = os.environ.get("FAKE_QEMU_EXIT")
    if code is not None:
        sys.exit(int(code))

    def _stop(*_: object) -> None:
        # A handler that only set a flag would not end time.sleep(): Python
        # resumes the sleep after the handler returns (PEP 475).
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
