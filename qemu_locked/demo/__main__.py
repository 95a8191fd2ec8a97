"""``make demo``: two VMs share one disk image under qemu-locked.  The first
runs, the second is refused with the holder named; once the first stops, the
second starts.  Uses the real qemu-system-x86_64 when installed, else the
bundled fake QEMU (and says which)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qemu_locked.lock import procfs

BIN = Path(sys.executable).parent
QEMU_LOCKED = str(BIN / "qemu-locked")


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def holds_lock(pid: int, path: str) -> bool:
    """Whether the process holds a byte-0 lock on path (read from its fdinfo)."""
    return any(start == 0 for _k, _m, start in procfs.fd_locks(pid).get(path, []))


def start(name: str, image: str, emulator: str, real: bool) -> subprocess.Popen[str]:
    args = [QEMU_LOCKED, "-name", f"guest={name}", "-m", "64", "-display", "none", "-nodefaults"]
    if real:
        args += ["-accel", "tcg", "-S"]
    args += ["-drive", f"file={image},if=virtio"]
    # The demo's own config (a lockspace in its temporary directory), so it
    # neither depends on nor leaves anything in this host's qemu-locked set-up.
    config = os.path.join(os.path.dirname(image), "qemu-locked.toml")
    env = dict(os.environ, QEMU_LOCKED_EMULATOR=emulator, QEMU_LOCKED_CONFIG=config)
    say(f"$ QEMU_LOCKED_CONFIG={config} QEMU_LOCKED_EMULATOR={emulator} {shlex.join(args)}")
    return subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def wait_running(proc: subprocess.Popen[str], image: str) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if holds_lock(proc.pid, image):
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def main() -> int:
    qemu = shutil.which("qemu-system-x86_64")
    real = qemu is not None
    emulator = qemu or str(BIN / "qemu-locked-fake-qemu")
    what = (
        "real QEMU, TCG" if real else "the bundled fake QEMU: qemu-system-x86_64 is not installed"
    )
    say(f"emulator: {emulator} ({what})")
    with tempfile.TemporaryDirectory(prefix="qemu-locked-demo-") as tmp:
        image = os.path.join(tmp, "shared-disk.qcow2")
        os.mkdir(os.path.join(tmp, "lockspace"))
        with open(os.path.join(tmp, "qemu-locked.toml"), "w") as f:
            f.write(f'lockspace_dir = "{tmp}/lockspace"\n')
        if shutil.which("qemu-img"):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "64M"], check=True)
        else:
            with open(image, "wb") as f:
                f.truncate(64 << 20)
        say(f"disk image: {image}\n")
        say("# 1. VM 'alpha' starts on the disk:")
        alpha = start("alpha", image, emulator, real)
        if not wait_running(alpha, image):
            say("alpha did not start: " + (alpha.stderr.read() if alpha.stderr else ""))
            return 1
        say(f"   alpha runs as pid {alpha.pid} and holds the disk lock\n")
        say("# 2. VM 'beta' is given the same disk:")
        beta = start("beta", image, emulator, real)
        _out, err = beta.communicate(timeout=60)
        say("   " + err.strip().replace("\n", "\n   "))
        say(f"   beta refused before QEMU ran (exit code {beta.returncode})\n")
        say("# 3. alpha stops (here: kill -9); the lock dies with it and beta can start:")
        alpha.kill()
        alpha.wait()
        beta = start("beta", image, emulator, real)
        ok = wait_running(beta, image)
        say(f"   beta {'runs as pid ' + str(beta.pid) if ok else 'failed to start'}")
        beta.terminate()
        beta.wait(timeout=30)
        result = 0 if ok and _refused(err) else 1
    say("\ndemo " + ("done" if result == 0 else "FAILED"))
    return result


def _refused(err: str) -> bool:
    return "qemu-locked: " in err and "guest 'alpha'" in err


if __name__ == "__main__":
    raise SystemExit(main())
