"""The real qemu-locked binary with the fake QEMU: real locks, real processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    FAKE_QEMU,
    QEMU_LOCKED,
    VM,
    base_env,
    lock_free,
    make_image,
    run,
    skip_unless_ci,
)


def test_exec_holds_the_lock_and_argv_is_unchanged(start, tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.img")
    args = ["-name", "guest=vm1", "-m", "64", "-drive", f"file={img},format=raw,if=virtio", "-S"]
    vm = start(*args)
    assert vm.started()
    assert vm.report["argv"][1:] == args
    assert vm.locks() == {img: ["WRITE"]}
    assert not lock_free(img, exclusive=False)
    # Only the lock fd is passed on: nothing else of ours leaks into QEMU.
    assert [fd["path"] for fd in vm.report["fds"]] == [img]


def test_sigpipe_and_sigxfsz_are_default_after_exec(tmp_path: Path) -> None:
    """CPython ignores SIGPIPE/SIGXFSZ and ignored signals survive exec; QEMU must not
    inherit that.  The fake QEMU is Python too (it ignores SIGPIPE itself), so the
    exec'd program here is /bin/sleep, its argument doubling as a (real) image file."""
    (tmp_path / "30").write_bytes(b"")
    proc = subprocess.Popen(
        [QEMU_LOCKED, "30"], cwd=tmp_path, env=base_env(QEMU_LOCKED_EMULATOR="/bin/sleep")
    )
    try:
        deadline = time.monotonic() + 20
        while not os.readlink(f"/proc/{proc.pid}/exe").endswith("sleep"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        sigign = int(
            next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigIgn:")), 16
        )
        assert not sigign & (1 << (signal.SIGPIPE - 1))
        assert not sigign & (1 << (signal.SIGXFSZ - 1))
        assert not lock_free(str(tmp_path / "30"))
    finally:
        proc.kill()
        proc.wait()


def test_second_start_is_refused_naming_the_holder(start, tmp_path: Path) -> None:
    img = make_image(tmp_path / "web.qcow2")
    first = start("-name", "guest=web", "-uuid", "5c2d", "-drive", f"file={img}")
    assert first.started()
    second = start("-name", "guest=other", "-drive", f"file={img}")
    assert not second.started()
    assert second.proc.returncode == 3
    err = second.stderr().splitlines()
    assert err == [
        f"qemu-locked: cannot write {img}: in use (writing) by pid {first.report['pid']}, guest 'web'"
    ]


@pytest.mark.parametrize(
    ("first", "second", "ok"),
    [("readonly=on", "readonly=on", True), ("readonly=on", "readonly=off", False),
     ("readonly=off", "readonly=on", False), ("readonly=off", "readonly=off", False)],
)  # fmt: skip
def test_shared_and_exclusive(start, tmp_path: Path, first: str, second: str, ok: bool) -> None:
    img = make_image(tmp_path / "s.img")
    a = start("-drive", f"file={img},format=raw,{first}")
    assert a.started()
    b = start("-drive", f"file={img},format=raw,{second}")
    assert b.started() is ok
    if ok:
        assert a.locks() == {img: ["READ"]} and b.locks() == {img: ["READ"]}
    else:
        assert b.proc.returncode == 3 and ": in use (" in b.stderr()


def test_share_rw_device_takes_a_shared_lock(start, tmp_path: Path) -> None:
    img = make_image(tmp_path / "cluster.img")
    args = [
        "-drive",
        f"file={img},format=raw,if=none,id=d0",
        "-device",
        "virtio-blk-pci,drive=d0,share-rw=on",
    ]
    a, b = start(*args), start(*args)
    assert a.started() and b.started()
    assert b.locks() == {img: ["READ"]}


def test_kill_9_frees_the_disk_at_once(start, tmp_path: Path) -> None:
    img = make_image(tmp_path / "k.img")
    vm = start("-drive", f"file={img}")
    assert vm.started()
    assert not lock_free(img)
    vm.kill(signal.SIGKILL)
    assert lock_free(img)
    again = start("-drive", f"file={img}")
    assert again.started()


def test_probe_line_execs_without_locks(start) -> None:
    probe = ["-S", "-no-user-config", "-nodefaults", "-nographic", "-machine", "none,accel=kvm:tcg",
             "-qmp", "unix:/nonexistent/qmp.monitor,server=on,wait=off"]  # fmt: skip
    vm = start(*probe)
    assert vm.started()
    assert vm.report["fds"] == [] and vm.report["argv"][1:] == probe


def test_all_or_nothing(start, tmp_path: Path) -> None:
    a, b = make_image(tmp_path / "a.img"), make_image(tmp_path / "b.img")
    holder = start("-name", "guest=holdsb", "-drive", f"file={b}")
    assert holder.started()
    vm = start("-drive", f"file={a}", "-drive", f"file={b}")
    assert not vm.started() and vm.proc.returncode == 3
    assert "guest 'holdsb'" in vm.stderr()
    assert lock_free(a)  # the free disk was not left locked by the refused start


def test_every_conflict_is_named(start, tmp_path: Path) -> None:
    a, b = make_image(tmp_path / "a.img"), make_image(tmp_path / "b.img")
    assert start("-name", "guest=ga", "-drive", f"file={a}").started()
    assert start("-name", "guest=gb", "-drive", f"file={b}").started()
    vm = start("-drive", f"file={a}", "-drive", f"file={b}")
    assert not vm.started()
    lines = vm.stderr().splitlines()
    assert len(lines) == 2 and "guest 'ga'" in "".join(lines) and "guest 'gb'" in "".join(lines)


def test_same_inode_is_locked_once_in_the_strongest_mode(start, tmp_path: Path) -> None:
    img = make_image(tmp_path / "real.img")
    link = tmp_path / "link.img"
    link.symlink_to(img)
    hard = tmp_path / "hard.img"
    os.link(img, hard)
    vm = start(
        "-drive", f"file={link},readonly=on", "-drive", f"file={hard},if=none,id=x", "-cdrom", img
    )
    assert vm.started()
    locked = [fd for fd in vm.report["fds"] if fd["locks"]]
    assert len(locked) == 1 and locked[0]["locks"][0]["mode"] == "WRITE"


def test_qcow2_header_backing_is_locked_shared(start, tmp_path: Path) -> None:
    if not shutil.which("qemu-img"):
        skip_unless_ci("qemu-img not installed (make test installs qemu-utils)")
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top)],
        check=True,
    )
    vm = start("-drive", f"file={top}")
    assert vm.started()
    assert vm.locks() == {str(top): ["WRITE"], str(base): ["READ"]}
    writer = start("-name", "guest=w", "-drive", f"file={base}")
    assert not writer.started() and "in use (sharing) by pid" in writer.stderr()


@pytest.mark.parametrize(
    "kind", ["missing", "dir", "fifo", "socket", "chardev", "loop", "noperm", "newline", "long"]
)
def test_unusable_disk_paths(tmp_path: Path, kind: str) -> None:
    p = tmp_path / "x"
    if kind == "dir":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
    elif kind == "chardev":
        p = Path("/dev/null")
    elif kind == "loop":
        p.symlink_to(tmp_path / "y")
        (tmp_path / "y").symlink_to(p)
    elif kind == "noperm":
        make_image(p)
        p.chmod(0)
    elif kind == "newline":
        p = tmp_path / "a\nb.img"
    elif kind == "long":
        p = tmp_path / ("d" * 255) / ("e" * 255) / "x"
        p = Path(str(p) + "/f" * 1800)
    before = sorted(os.listdir(tmp_path))
    # Root bypasses permissions: the permission case runs as 'nobody', like libvirt-qemu.
    as_user = {"user": 65534} if kind == "noperm" and os.geteuid() == 0 else {}
    if as_user:
        os.chmod(tmp_path, 0o711)
    r = run([QEMU_LOCKED, "-drive", f"file={str(p).replace(',', ',,')},format=raw"], **as_user)
    assert r.returncode == 1, r.stderr  # as QEMU itself exits on an image it cannot open
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qemu-locked: ")
    assert r.stdout == ""  # the emulator never ran
    assert sorted(os.listdir(tmp_path)) == before  # nothing created
    if kind == "fifo":
        assert stat.S_ISFIFO(os.stat(p).st_mode)


def test_emulator_not_found_and_not_executable(tmp_path: Path) -> None:
    r = run([QEMU_LOCKED, "-m", "64"], env=base_env(QEMU_LOCKED_EMULATOR=str(tmp_path / "nope")))
    assert r.returncode == 127 and r.stderr.startswith("qemu-locked: emulator ")
    noexec = tmp_path / "noexec"
    noexec.write_text("#!/bin/false\n")
    r = run([QEMU_LOCKED, "-m", "64"], env=base_env(QEMU_LOCKED_EMULATOR=str(noexec)))
    assert r.returncode == 126 and len(r.stderr.splitlines()) == 1


def test_never_execs_itself(tmp_path: Path) -> None:
    r = run([QEMU_LOCKED, "-m", "64"], env=base_env(QEMU_LOCKED_EMULATOR=QEMU_LOCKED))
    assert r.returncode == 127 and "qemu-locked itself" in r.stderr


def test_invoked_under_the_emulator_name_finds_the_next_one(tmp_path: Path) -> None:
    """A qemu-system-x86_64 symlink to qemu-locked first on PATH execs the real one after it."""
    front, real = tmp_path / "front", tmp_path / "real"
    front.mkdir()
    real.mkdir()
    (front / "qemu-system-x86_64").symlink_to(QEMU_LOCKED)
    (real / "qemu-system-x86_64").symlink_to(FAKE_QEMU)
    img = make_image(tmp_path / "d.img")
    env = base_env(PATH=f"{front}:{real}:/usr/bin:/bin", FAKE_QEMU_EXIT="0")
    env.pop("QEMU_LOCKED_EMULATOR")
    r = run([str(front / "qemu-system-x86_64"), "-drive", f"file={img}"], env=env)
    assert r.returncode == 0, r.stderr
    assert '"argv": ["' + str(real / "qemu-system-x86_64") in r.stdout
    assert f'"path": "{img}"' in r.stdout


def test_dpkg_divert_layout(tmp_path: Path) -> None:
    """qemu-locked installed under the real name, the real binary diverted to NAME.real."""
    d = tmp_path / "bin"
    d.mkdir()
    (d / "qemu-system-x86_64").symlink_to(QEMU_LOCKED)
    (d / "qemu-system-x86_64.real").symlink_to(FAKE_QEMU)
    env = base_env(PATH="/usr/bin:/bin", FAKE_QEMU_EXIT="0")
    env.pop("QEMU_LOCKED_EMULATOR")
    r = run([str(d / "qemu-system-x86_64"), "-version"], env=env)
    assert r.returncode == 0 and '"-version"' in r.stdout


def test_config_file_emulator_and_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'emulator = "{FAKE_QEMU}"\n')
    env = base_env(QEMU_LOCKED_CONFIG=str(cfg), FAKE_QEMU_EXIT="7")
    env.pop("QEMU_LOCKED_EMULATOR")
    assert (
        run([QEMU_LOCKED, "-m", "1"], env=env).returncode == 7
    )  # QEMU's own exit code passes through
    cfg.write_text('emulatr = "/x"\n')
    r = run([QEMU_LOCKED, "-m", "1"], env=env)
    assert r.returncode == 2 and r.stderr == f"qemu-locked: {cfg}: emulatr: unknown key\n"


def test_bad_argument_is_refused_before_qemu(tmp_path: Path) -> None:
    r = run([QEMU_LOCKED, "-m", "64", "-drive"])
    assert r.returncode == 1  # QEMU's own status for a bad command line
    assert r.stderr == "qemu-locked: -drive: requires an argument\n"
    assert r.stdout == ""


def test_help_passes_through(start) -> None:
    vm = start("--help")
    assert vm.started() and vm.report["argv"][1:] == ["--help"]


def test_refusal_while_vm_runs_under_vm_helper(tmp_path: Path) -> None:
    """The VM helper itself: a process that exits early reports started() False."""
    vm = VM(["-drive", f"file={tmp_path / 'absent.img'}"])
    assert not vm.started() and vm.proc.returncode == 1
