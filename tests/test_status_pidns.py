"""A holder in another PID namespace (a container, or another "host" sharing this
kernel, as in the two-host lab) is no local process this user cannot read: no
/proc entry here shows it at all.  `status` must still report the lock (a start
is refused), and neither it nor the refusal may send the operator to run
`status` as root, which could not name it either (issue 23)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QEMU_LOCKCTL, QEMU_LOCKED, base_env, make_image

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unshare --pid needs root")

NEW_PIDNS = ["unshare", "--pid", "--fork", "--mount-proc"]
HOLD = (
    "import os,sys,time; from qemu_locked.lock import ofd; "
    "fd=os.open(sys.argv[1], os.O_RDWR); assert ofd.try_lock(fd, True); "
    "print('held', flush=True); time.sleep(120)"
)
OTHER_PIDNS = "a process in another PID namespace on this machine"


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=base_env(FAKE_QEMU_EXIT="0"), capture_output=True,
                          text=True, timeout=60, cwd="/")  # fmt: skip


def hold(img: str, prefix: list[str] | None = None) -> subprocess.Popen[str]:
    argv = [*(prefix or []), sys.executable, "-c", HOLD, img]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "held\n"
    return p


@pytest.fixture
def held_here() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """An image held exclusive by a process of this (the initial) PID namespace, in
    a directory other users can reach (pytest's tmp_path is under a 0700 one)."""
    d = Path(tempfile.mkdtemp(prefix="qlk-pidns-"))
    d.chmod(0o755)
    img = make_image(d / "d.img")
    os.chmod(img, 0o644)
    holder = hold(img)
    yield img, holder
    holder.kill()
    holder.wait()
    shutil.rmtree(d)


def test_status_in_another_pid_namespace_says_held_elsewhere(
    held_here: tuple[str, subprocess.Popen[str]],
) -> None:
    img, _ = held_here
    r = run([*NEW_PIDNS, QEMU_LOCKCTL, "status", img])
    assert r.returncode == 0, r.stderr
    assert "no lock held" not in r.stdout
    assert "writing  elsewhere" in r.stdout, r.stdout
    assert f"1 elsewhere: locked by {OTHER_PIDNS}" in r.stdout, r.stdout
    assert "cannot read" not in r.stdout and "as root" not in r.stdout, r.stdout
    (row,) = json.loads(run([*NEW_PIDNS, QEMU_LOCKCTL, "status", "--json", img]).stdout)["locks"]
    assert row["state"] == "elsewhere" and row["mode"] == "exclusive" and row["pid"] is None
    assert row["held_by"].startswith(OTHER_PIDNS), row


def test_a_start_refused_across_pid_namespaces_says_so(
    held_here: tuple[str, subprocess.Popen[str]],
) -> None:
    img, _ = held_here
    r = run([*NEW_PIDNS, QEMU_LOCKED, "-drive", f"file={img}"])
    assert r.returncode == 3, r.stderr
    line = r.stderr.strip()
    assert f"cannot write {img}: in use (writing) by {OTHER_PIDNS}" in line, line
    assert "cannot read" not in line and "as root" not in line, line


def test_status_without_path_does_not_call_the_machine_free(
    held_here: tuple[str, subprocess.Popen[str]],
) -> None:
    """No path, nothing to name: still the kernel's lock is counted, not dropped."""
    img, _ = held_here
    st = os.stat(img)
    r = run([*NEW_PIDNS, QEMU_LOCKCTL, "status"])
    assert r.returncode == 0, r.stderr
    assert "no lock held" not in r.stdout, r.stdout
    assert "OFD locks at byte 0 on this machine whose holders no /proc entry here shows" in (
        r.stdout
    ), r.stdout
    out = json.loads(run([*NEW_PIDNS, QEMU_LOCKCTL, "status", "--json"]).stdout)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    assert {"device": device, "inode": st.st_ino, "mode": "exclusive"} in out["unlisted"], out


def test_a_holder_in_a_child_namespace_is_named_from_the_parent(tmp_path: Path) -> None:
    """The parent namespace sees its children's processes: there the pid is named."""
    img = make_image(tmp_path / "d.img")
    outer = hold(img, NEW_PIDNS)
    (inner,) = map(int, Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split())
    try:
        (row,) = json.loads(run([QEMU_LOCKCTL, "status", "--json", img]).stdout)["locks"]
        assert row["pid"] == inner and "state" not in row, row
    finally:
        # the namespace's init outlives unshare, and takes no signal but SIGKILL from here
        os.kill(inner, signal.SIGKILL)
        outer.kill()
        outer.wait()


def test_a_user_who_cannot_read_every_process_is_told_both_possibilities(
    held_here: tuple[str, subprocess.Popen[str]],
) -> None:
    """In a namespace of its own with a root process beside it, nobody cannot tell a
    local holder it may not read from one outside the namespace: it says both."""
    img, _ = held_here
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
              QEMU_LOCKCTL, "status", img]  # fmt: skip
    # pid 1 of the new namespace is a root python, whose fds nobody may not list
    beside = ["import subprocess,sys; r=subprocess.run(sys.argv[1:]); sys.exit(r.returncode)"]
    r = run([*NEW_PIDNS, sys.executable, "-c", *beside, *nobody])
    assert r.returncode == 0, r.stderr
    assert "writing  unidentified" in r.stdout, r.stdout
    assert (
        "1 unidentified: locked by a process this user cannot identify: a local one whose "
        "/proc entries it cannot read, or one in another PID namespace" in r.stdout
    ), r.stdout


def test_lockspace_records_name_the_holder_across_pid_namespaces(start, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The lockspace backend's own probe (the record and its slot lock) names what
    /proc cannot: the guest, its pid there and its host."""
    space = tmp_path / "lockspace"
    space.mkdir()
    img = make_image(tmp_path / "d.img")
    env = base_env(QEMU_LOCKED_BACKEND="lockspace", QEMU_LOCKED_LOCKSPACE_DIR=str(space),
                   QEMU_LOCKED_HOST_NAME="hostA")  # fmt: skip
    vm = start("-name", "guest=on-a", "-drive", f"file={img}", env=env)
    assert vm.started()
    env["QEMU_LOCKED_HOST_NAME"] = "hostB"
    r = subprocess.run([*NEW_PIDNS, QEMU_LOCKCTL, "status", "--json", img], env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["locks"]
    assert [(x["guest"], x["host"], x["state"]) for x in rows] == [("on-a", "hostA", "held")], rows
    vm.kill()
    r = subprocess.run([*NEW_PIDNS, QEMU_LOCKCTL, "status", "--json", img], env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert [x["state"] for x in json.loads(r.stdout)["locks"]] == ["stale"], r.stdout


def test_a_stale_record_does_not_hide_a_holder_elsewhere(start, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A record left by a dead VM is no answer for the image: a process of another
    PID namespace holding it now is reported as well."""
    space = tmp_path / "lockspace"
    space.mkdir()
    img = make_image(tmp_path / "d.img")
    env = base_env(QEMU_LOCKED_BACKEND="lockspace", QEMU_LOCKED_LOCKSPACE_DIR=str(space))
    vm = start("-name", "guest=gone", "-drive", f"file={img}", env=env)
    assert vm.started()
    vm.kill()
    holder = hold(img)
    try:
        r = subprocess.run([*NEW_PIDNS, QEMU_LOCKCTL, "status", "--json", img], env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        states = sorted(x["state"] for x in json.loads(r.stdout)["locks"])
        assert states == ["elsewhere", "stale"], r.stdout
    finally:
        holder.kill()
        holder.wait()


def test_a_posix_lock_holder_is_named_not_called_hidden(tmp_path: Path) -> None:
    """A POSIX lock on byte 0 refuses an OFD lock too: status names its holder
    (it had called it "a local process whose /proc entries this user cannot read")."""
    img = make_image(tmp_path / "d.img")
    code = ("import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0); print('held', flush=True); "
            "time.sleep(120)")  # fmt: skip
    p = subprocess.Popen([sys.executable, "-c", code, img], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "held\n"
        (row,) = json.loads(run([QEMU_LOCKCTL, "status", "--json", img]).stdout)["locks"]
        assert (row["pid"], row["mode"], "state" in row) == (p.pid, "exclusive", False), row
        r = run([QEMU_LOCKED, "-drive", f"file={img}"])
        assert r.returncode == 3 and f"by pid {p.pid} (python" in r.stderr, r.stderr
    finally:
        p.kill()
        p.wait()
