"""Boot the aalab image under QEMU TCG with a payload disk and collect what it reports.

    payload = Payload(tmp_path / "payload")
    payload.add_file("qemu-locked.deb", deb)          # lands in /payload in the guest
    payload.set_run(SCRIPT)                           # /payload/run, started by the init
    result = boot(payload, timeout=600)
    assert result.ok, result.explain()
    result.step("start")["data"]["pid"]

The guest sees the payload as /dev/vdb mounted at /payload (read-write); whatever it leaves
in /payload/out (the init adds guest-logs/: libvirt's logs and dmesg) is copied back to
``result.out`` with debugfs, so nothing is loop-mounted on the host.  The root disk is
opened with snapshot=on: the cached image is never written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e.aalab import image

HERE = Path(__file__).resolve().parent
GUEST_HELPER = HERE / "guest.py"
QEMU = "qemu-system-x86_64"
APPEND = (
    "root=/dev/vda rw console=ttyS0 apparmor=1 security=apparmor init=/sbin/qlab-init "
    "panic=-1 fsck.mode=skip"
)
# The guest powers itself off this long before the host kills QEMU, so a hung scenario
# still reports which step it was in.
GUEST_MARGIN = 30.0


class Payload:
    """A directory that becomes the guest's /payload disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "out").mkdir(exist_ok=True)
        shutil.copyfile(GUEST_HELPER, root / "guest.py")

    def add_file(self, name: str, source: Path, mode: int | None = None) -> Path:
        dest = self.root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        dest.chmod(mode if mode is not None else source.stat().st_mode & 0o7777)
        return dest

    def add_text(self, name: str, text: str, mode: int = 0o644) -> Path:
        dest = self.root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        dest.chmod(mode)
        return dest

    def set_run(self, script: str) -> Path:
        """/payload/run: the init executes it (give it a #! line) after libvirtd is up."""
        return self.add_text("run", script, 0o755)


@dataclass
class Result:
    returncode: int | None  # QEMU's; None when it was killed at the timeout
    timed_out: bool
    seconds: float
    console: str
    results: list[dict[str, Any]]
    workdir: Path
    out: Path
    noise: list[str] = field(default_factory=list)  # lines on the results port that were not JSON

    def step(self, name: str) -> dict[str, Any] | None:
        """The last result line of that step."""
        found = [r for r in self.results if r.get("step") == name]
        return found[-1] if found else None

    def data(self, name: str) -> dict[str, Any]:
        rec = self.step(name)
        return dict(rec.get("data") or {}) if rec else {}

    def passed(self, name: str) -> dict[str, Any]:
        """The data of a step that must have passed (an assertion naming it otherwise)."""
        rec = self.step(name)
        assert rec is not None, f"the guest never reported step {name!r}\n{self.explain()}"
        assert rec["ok"], f"step {name!r} failed: {rec.get('error')}\n{self.explain()}"
        return dict(rec.get("data") or {})

    @property
    def ok(self) -> bool:
        """Every step passed and the init got as far as powering off."""
        return (
            not self.timed_out
            and self.step("poweroff") is not None
            and all(r.get("ok") for r in self.results)
        )

    def summary(self) -> str:
        lines = []
        for r in self.results:
            mark = "ok  " if r.get("ok") else "FAIL"
            lines.append(
                f"{mark} {r.get('step')!s:<24} {r.get('seconds', '')!s:>7} s  up {r.get('uptime')}"
            )
            if not r.get("ok") and r.get("error"):
                lines.extend("       " + e for e in str(r["error"]).splitlines()[-15:])
        return "\n".join(lines)

    def console_tail(self, lines: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-lines:])

    def explain(self, lines: int = 60) -> str:
        """For assertion messages: the steps, then the end of the console."""
        head = f"QEMU exit {self.returncode}, timed out: {self.timed_out}, {self.seconds:.0f} s"
        return (
            f"{head}; workdir {self.workdir}\n--- steps ---\n{self.summary() or '(none)'}\n"
            f"--- console (last {lines} lines) ---\n{self.console_tail(lines)}"
        )


def _ext4_from_dir(src: Path, img: Path, size: int) -> None:
    img.unlink(missing_ok=True)
    # No journal: the guest only syncs before powering off, and debugfs on the host reads
    # the blocks in place (it does not replay a journal).
    argv = ["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", "payload", "-d", str(src),
            str(img), f"{size >> 10}k"]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"mkfs.ext4 -d {src}: {r.stderr.strip()}")


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _copy_out(img: Path, dest: Path) -> None:
    """/out of the payload image into dest (best effort: a broken image means no files)."""
    subprocess.run(
        ["debugfs", "-R", f"rdump /out {dest.parent}", str(img)],
        capture_output=True,
        check=False,
    )
    dest.mkdir(parents=True, exist_ok=True)


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""


def parse_results(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    results, noise = [], []
    for line in text.splitlines():
        line = line.strip("\r\n\x00 ")
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            noise.append(line)
            continue
        if isinstance(rec, dict):
            results.append(rec)
        else:
            noise.append(line)
    return results, noise


def qemu_argv(
    paths: image.Paths,
    payload_img: Path,
    console: Path,
    results: Path,
    *,
    guest_timeout: float,
    accel: str = "tcg",
) -> list[str]:
    return [
        QEMU,
        "-accel", accel,
        "-cpu", "max",
        "-m", "3072",
        "-smp", "2",
        "-nodefaults",
        "-kernel", str(paths.kernel),
        "-initrd", str(paths.initrd),
        "-append", f"{APPEND} qlab.timeout={guest_timeout:.0f}",
        "-drive", f"file={paths.root_img},format=raw,if=virtio,snapshot=on",
        "-drive", f"file={payload_img},format=raw,if=virtio",
        "-nic", "none",
        "-display", "none",
        "-monitor", "none",
        "-no-reboot",
        "-serial", f"file:{console}",
        "-serial", f"file:{results}",
    ]  # fmt: skip


def boot(
    payload: Payload | Path,
    *,
    timeout: float = 900.0,
    workdir: Path | None = None,
    paths: image.Paths | None = None,
    accel: str = "tcg",
) -> Result:
    """Boot the guest with this payload; returns when it powers off or at the timeout.

    accel="kvm" where /dev/kvm works: the guest's own domains stay TCG (type='qemu').
    """
    root = payload.root if isinstance(payload, Payload) else payload
    if not (root / "guest.py").exists():
        Payload(root)  # the helper and out/ even for a bare directory
    paths = paths or image.build()
    work = workdir or Path(tempfile.mkdtemp(prefix="aalab-"))
    work.mkdir(parents=True, exist_ok=True)
    payload_img, console, results = work / "payload.img", work / "console.log", work / "results.log"
    for f in (console, results):
        f.unlink(missing_ok=True)
    size = -(-(_dir_bytes(root) * 2 + (256 << 20)) // (1 << 20)) << 20
    _ext4_from_dir(root, payload_img, size)
    argv = qemu_argv(
        paths,
        payload_img,
        console,
        results,
        guest_timeout=max(timeout - GUEST_MARGIN, 30),
        accel=accel,
    )
    (work / "qemu.argv").write_text(json.dumps(argv) + "\n")
    t0 = time.monotonic()
    # snapshot=on puts the root disk's overlay in TMPDIR: keep it next to our other files.
    env = dict(os.environ, TMPDIR=str(work))
    with (work / "qemu.log").open("wb") as qlog:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT, env=env
        )
        timed_out = False
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out, rc = True, None
            os.kill(proc.pid, signal.SIGKILL)  # only the QEMU we started
            proc.wait()
    seconds = time.monotonic() - t0
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    _copy_out(payload_img, out)
    recs, noise = parse_results(_read(results))
    text = _read(console)
    if rc not in (0, None):
        text += f"\n--- qemu exited {rc} ---\n" + _read(work / "qemu.log")
    return Result(rc, timed_out, seconds, text, recs, work, out, noise)
